"""Inputs that would give a wrong answer with exit 0 are refused before any work, through the
engine (``register``: the Python API and Slicer) and the command line (non-zero exit, a one-line
reason, the output folder untouched): truncated files, NaN hidden by ITK's NIfTI reader, images
or labels that do not overlap, fractional labels. Partial overlaps are warnings in the result."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import smooth_blobs, write_tiny_model

from EOIRRegistrationLib.cli import register as register_cli
from EOIRRegistrationLib.core.errors import InputError
from EOIRRegistrationLib.core.nifti_data import data_problem
from EOIRRegistrationLib.engine import checks
from EOIRRegistrationLib.engine.pipeline import register
from EOIRRegistrationLib.engine.result import RegistrationResult

ENGINE_DIR = Path(__file__).resolve().parents[2] / "EOIRRegistration"


def _moved(image, offset_mm):
    out = sitk.Image(image)
    out.SetOrigin(tuple(np.add(image.GetOrigin(), offset_mm)))
    return out


def _with_values(image, arr):
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out


def _truncate(path: Path, keep: float):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.fixture(scope="module")
def zero_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model") / "zero.pt", 0, (4.0, 4.0, 4.0))


@pytest.fixture
def pair():
    fixed, fixed_labels = smooth_blobs(0)
    moving, moving_labels = smooth_blobs(0, (2.0, -1.5, 1.0))
    return fixed, moving, fixed_labels, moving_labels


# -- the files: what ITK's NIfTI reader hides ------------------------------------------------


def test_itk_nifti_reader_hides_truncation_and_nan_which_data_problem_finds(tmp_path):
    """The premise, on this SimpleITK: a cut .nii/.nii.gz reads with zeros, NaN/Inf read as 0."""
    arr = np.random.default_rng(0).uniform(1, 2, (12, 14, 16)).astype(np.float32)
    arr[3, 4, 5], arr[6, 7, 8] = np.nan, -np.inf
    for name in ("a.nii", "a.nii.gz", "a.hdr", "a.img.gz"):
        path = tmp_path / name
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
        read = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        assert np.isfinite(read).all() and read[3, 4, 5] == 0 and read[6, 7, 8] == 0
        assert data_problem(str(path)) == ("contains 2 NaN or infinite values (ITK's NIfTI "
                                           "reader would read them as 0)")
    clean = np.nan_to_num(arr, nan=1.5, neginf=1.5)
    for name, data in (("b.nii", "b.nii"), ("b.nii.gz", "b.nii.gz"), ("b.hdr", "b.img")):
        sitk.WriteImage(sitk.GetImageFromArray(clean), str(tmp_path / name))
        assert data_problem(str(tmp_path / name)) is None
        _truncate(tmp_path / data, 0.6)
        read = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name)))
        assert read.shape == arr.shape and (read[-1] == 0).all()  # filled with zeros
        assert data_problem(str(tmp_path / name)).startswith(
            f"is truncated: the header promises {arr.size * 4} bytes of voxel data")
    path = tmp_path / "c.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray((clean * 1000).astype(np.int16)), str(path))
    path.write_bytes(path.read_bytes()[:-20])  # the gzip trailer (8 bytes) and a few voxels
    assert "is truncated" in data_problem(str(path))


# -- the engine (Python API and Slicer) -------------------------------------------------------


def test_images_that_do_not_overlap_are_refused_before_any_work(pair, zero_model):
    fixed, moving, _, _ = pair
    far = _moved(moving, (10_000.0, 0.0, 0.0))  # 10 m away
    stages = []
    with pytest.raises(InputError, match=r"do not overlap as given \(no initial alignment\).*"
                                         r"centres 10000 mm apart"):
        register(fixed, far, model=zero_model, initial_alignment="none",
                 progress=lambda stage, fraction: stages.append(stage))
    assert "registering" not in stages and "refining" not in stages


def test_a_sheared_grid_is_refused_and_a_rounded_rotation_kept(pair, zero_model, tmp_path):
    fixed, moving, _, _ = pair
    sheared = sitk.Image(fixed)
    sheared.SetDirection((1.0, 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))  # det 1, not a rotation
    # why: the NIfTI writer turns the direction into a rotation, so the outputs, written on the
    # fixed grid, would lie elsewhere (this run used to exit 0 with them)
    sitk.WriteImage(sheared, str(tmp_path / "sheared.nii.gz"))
    written = sitk.ReadImage(str(tmp_path / "sheared.nii.gz"))
    assert not np.allclose(written.GetDirection(), sheared.GetDirection(), atol=0.01)
    for images, role in (((sheared, moving), "fixed image"), ((fixed, sheared), "moving image")):
        with pytest.raises(InputError, match=f"{role} has a direction matrix whose axes are not "
                                             r"orthonormal \(D\^T D differs from the identity by 0.3"):
            register(*images, model=zero_model, initial_alignment="none")
    rounded = sitk.Image(fixed)  # a rotation stored with 6 digits, as image headers do
    c, s = np.cos(0.3), np.sin(0.3)
    rounded.SetDirection(tuple(np.round([c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0], 6)))
    assert checks.check_image(rounded, "fixed image") is rounded


def test_an_intensity_window_outside_an_images_intensities_is_refused(pair, zero_model):
    # Clamped to such a window the image is constant: the run registered a blank image, exit 0.
    fixed, moving, _, _ = pair
    high = float(sitk.GetArrayViewFromImage(moving).max())
    for window, role in ((((5000.0, 6000.0), (0.0, 1.0)), "fixed"), (((0.0, 1.0), (-3.0, -1.0)), "moving")):
        with pytest.raises(InputError, match=f"the {role} image's intensity window .* lies outside its "
                                             "intensities .*: the image would be constant"):
            register(fixed, moving, model=zero_model, initial_alignment="none", intensity_window=window)
    register(fixed, moving, model=zero_model, initial_alignment="none", refine_iterations=0,
             intensity_window=((0.0, 1.0), (0.5 * high, 2 * high)))  # overlapping windows are taken


def test_a_partial_overlap_is_a_warning_in_the_result(pair, zero_model, tmp_path):
    fixed, moving, _, _ = pair
    half = _moved(moving, (40.0, 0.0, 0.0))  # 64 mm wide images, 40 mm apart
    result = register(fixed, half, model=zero_model, initial_alignment="none", contrast="same",
                      refine_iterations=0)
    assert len(result.warnings) == 1
    assert result.warnings[0].startswith("only 38 % of the fixed image's field of view lies "
                                         "inside the moving image as given")
    assert "WARNING: only 38 %" in result.summary()
    assert result.describe()["warnings"] == result.warnings
    result.save(tmp_path)  # the Slicer worker's hand-over keeps them
    assert RegistrationResult.load(tmp_path).warnings == result.warnings


def test_overlap_fraction_agrees_with_itk_resampling(pair):
    """The lattice fraction against ITK: a constant image resampled through the matrix is
    nonzero exactly where the fixed voxel maps inside the moving image."""
    fixed, moving, _, _ = pair
    a = np.eye(4)
    a[:3, :3] = np.reshape(sitk.Euler3DTransform((0, 0, 0), 0.2, -0.1, 0.3).GetMatrix(), (3, 3))
    a[:3, 3] = (25.0, -10.0, 14.0)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(a[:3, :3].ravel().tolist())
    tx.SetTranslation(a[:3, 3].tolist())
    ones = sitk.Image(moving.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(moving)
    itk = sitk.GetArrayFromImage(sitk.Resample(ones, fixed, tx, sitk.sitkLinear, 0.0))
    grid = checks.Grid.from_image(fixed)  # 32^3: the lattice is every voxel
    fraction = checks.inside_fraction(checks._moved(checks._lattice(grid), a),
                                      checks.Grid.from_image(moving))
    assert 0.2 < fraction < 0.8
    assert fraction == pytest.approx(float((itk > 0).mean()), abs=2e-3)


def test_fractional_labels_are_refused_and_whole_float_labels_kept(pair, zero_model):
    fixed, moving, _, moving_labels = pair
    arr = sitk.GetArrayFromImage(moving_labels).astype(np.float32)
    fractional = _with_values(moving_labels, np.where(arr > 0, arr + 0.5, 0).astype(np.float32))
    with pytest.raises(InputError, match=r"moving label map has non-integer values "
                                         r"\(1\.5, 2\.5, 3\.5, \.\.\.\).*merge labels"):
        register(fixed, moving, model=zero_model, moving_labels=fractional)
    whole = _with_values(moving_labels, arr)
    result = register(fixed, moving, model=zero_model, moving_labels=whole,
                      initial_alignment="none", contrast="same", refine_iterations=0)
    assert set(np.unique(sitk.GetArrayFromImage(result.warped_labels))) == {0, 1, 2, 3, 4}


def test_labels_outside_the_fixed_field_of_view_or_their_image_are_refused(pair, zero_model):
    fixed, moving, _, moving_labels = pair
    # labels that belong to the moving image but lie outside the fixed grid after the alignment
    far_moving, far_labels = _moved(moving, (70.0, 0, 0)), _moved(moving_labels, (70.0, 0, 0))
    a = np.eye(4)
    with pytest.raises(InputError, match="no labelled voxel of the moving label map lies inside "
                                         "the fixed image's field of view"):
        checks.check_labels_on(far_labels, fixed, "moving label map", "fixed image", a, "")
    assert checks.check_labels_on(far_labels, far_moving, "moving label map", "moving image") == []
    # labels of another image (another origin) than the moving one
    with pytest.raises(InputError, match="no labelled voxel of the moving label map lies inside "
                                         "the moving image's field of view"):
        register(fixed, moving, model=zero_model, moving_labels=far_labels)
    # partly outside: a warning
    shifted = _moved(moving_labels, (-40.0, 0, 0))
    result = register(fixed, _moved(moving, (-40.0, 0, 0)), model=zero_model,
                      moving_labels=shifted, initial_alignment="none", contrast="same",
                      refine_iterations=0)
    assert any(w.startswith("only ") and "moving label map's labelled voxels lie inside the "
               "fixed image's field of view" in w for w in result.warnings), result.warnings


# -- the command line: non-zero exit, the reason, nothing written -----------------------------


def _write(image, path):
    sitk.WriteImage(image, str(path))
    return str(path)


def _cli_cases(tmp_path, pair):
    fixed, moving, fixed_labels, moving_labels = pair
    f = _write(fixed, tmp_path / "fixed.nii.gz")
    m = _write(moving, tmp_path / "moving.nii.gz")
    cases = []
    for ext in ("nii.gz", "nii", "nrrd", "mha"):
        path = tmp_path / f"cut.{ext}"
        _write(moving, path)
        _truncate(path, 0.5)
        message = "is truncated" if "nii" in ext else "cannot read moving image"
        cases.append(([f, str(path)], message))
    nan = sitk.GetArrayFromImage(moving)
    nan[5, 6, 7] = np.nan
    for ext in ("nii.gz", "nii"):  # NaN read as 0 by ITK: found in the raw data
        cases.append(([f, _write(_with_values(moving, nan), tmp_path / f"nan.{ext}")],
                      "contains 1 NaN or infinite values (ITK's NIfTI reader would read them"))
    cases.append(([f, _write(_with_values(moving, nan), tmp_path / "nan.nrrd")],
                  "moving image contains NaN or infinite values"))
    far = _write(_moved(moving, (10_000.0, 0, 0)), tmp_path / "far.nii.gz")
    cases.append(([f, far, "--init", "none"], "do not overlap as given"))
    arr = sitk.GetArrayFromImage(moving_labels).astype(np.float32)
    halves = _write(_with_values(moving_labels, np.where(arr > 0, arr + 0.5, 0).astype(np.float32)),
                    tmp_path / "halves.nii.gz")
    cases.append(([f, m, "--moving-labels", halves], "moving label map has non-integer values"))
    cases.append(([f, m, "--moving-labels", m, "--fixed-labels", halves],
                  "fixed label map has non-integer values"))
    outside = _write(_moved(moving_labels, (90.0, 0, 0)), tmp_path / "outside.nii.gz")
    cases.append(([f, m, "--moving-labels", outside],
                  "no labelled voxel of the moving label map lies inside the moving image's"))
    # a moving image twice as wide as the fixed one, labelled only where the fixed one is not
    wide = sitk.Resample(moving, [64, 32, 32], sitk.Transform(), sitk.sitkLinear, (-64.0, 0, 0),
                         (2.0, 2.0, 2.0))
    box = np.zeros((32, 32, 64), np.uint8)
    box[8:24, 8:24, 4:24] = 3  # x from -56 to -18 mm: the fixed grid spans 0 to 62 mm
    cases.append(([f, _write(wide, tmp_path / "wide.nii.gz"), "--init", "none", "--moving-labels",
                   _write(_with_values(wide, box), tmp_path / "box.nii.gz")],
                  "no labelled voxel of the moving label map lies inside the fixed image's field "
                  "of view as given (no initial alignment)"))
    return cases


def test_the_command_line_refuses_each_bad_input_and_leaves_the_output_folder(pair, tmp_path,
                                                                              zero_model, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "warped.nii.gz").write_bytes(b"an earlier result")
    for argv, message in _cli_cases(tmp_path, pair):
        code = register_cli.main([*argv, "--output-dir", str(out), "--model", zero_model,
                                  "--overwrite", "--quiet", "--no-png"])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert message in err, (message, err)
        assert err.startswith("eoir-register: error: ") and err.count("\n") == 1, err
        assert [p.name for p in out.iterdir()] == ["warped.nii.gz"], argv
        assert (out / "warped.nii.gz").read_bytes() == b"an earlier result"
        assert not list(tmp_path.glob(".out.partial-*"))


def test_the_module_entry_point_refuses_a_truncated_file_without_creating_the_output(
        pair, tmp_path, zero_model):
    fixed, moving, _, _ = pair
    f = _write(fixed, tmp_path / "fixed.nii.gz")
    m = _write(moving, tmp_path / "moving.nii.gz")
    _truncate(Path(m), 0.5)
    out = tmp_path / "never"
    env = {"PYTHONPATH": str(ENGINE_DIR), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "EOIRRegistrationLib", "register", f, m,
                           "--output-dir", str(out), "--model", zero_model],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert f"eoir-register: error: moving image {m} is truncated" in proc.stderr
    assert not out.exists()


def test_warnings_reach_report_json_and_the_printed_summary(pair, tmp_path, zero_model, capsys):
    fixed, moving, _, _ = pair
    f = _write(fixed, tmp_path / "fixed.nii.gz")
    m = _write(_moved(moving, (40.0, 0, 0)), tmp_path / "moving.nii.gz")
    out = tmp_path / "out"
    assert register_cli.main([f, m, "--output-dir", str(out), "--model", zero_model, "--init",
                              "none", "--contrast", "same", "--refine", "0", "--quiet",
                              "--no-png"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["warnings"]) == 1 and report["warnings"][0].startswith("only 38 %")
    assert f"WARNING: {report['warnings'][0]}" in capsys.readouterr().out
