"""Command line: outputs, report, overview, and bad input that writes nothing."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import oblique_image, write_tiny_model

from EOIRRegistrationLib.cli import register as register_cli
from EOIRRegistrationLib.core.errors import InputError, OutputError
from EOIRRegistrationLib.engine import optimise

ENGINE_DIR = Path(__file__).resolve().parents[2] / "EOIRRegistration"


@pytest.fixture
def files(tmp_path):
    fixed = oblique_image(size=(40, 36, 24), spacing=(1.6, 1.3, 3.0), origin=(-31.0, 12.5, -7.0),
                          angles=(0.1, -0.2, 0.15), seed=3)
    moving = oblique_image(size=(36, 40, 30), spacing=(1.9, 1.2, 2.2), origin=(-33.0, 10.0, -9.0),
                           angles=(-0.05, 0.1, -0.2), seed=4)
    labels = sitk.Cast(sitk.BinaryThreshold(moving, 0.5, 10.0, 5, 0), sitk.sitkUInt8)
    paths = {k: str(tmp_path / f"{k}.nii.gz") for k in ("fixed", "moving", "labels")}
    for k, img in zip(paths, (fixed, moving, labels)):
        sitk.WriteImage(img, paths[k])
    paths["model"] = write_tiny_model(tmp_path / "tiny.pt", 0.05, description="test model")
    return paths


def run(argv):
    return register_cli.main([str(a) for a in argv])


def test_register_writes_every_output_and_a_consistent_report(files, tmp_path, capsys):
    out = tmp_path / "out"
    # the fixture's two random images share no structure: state the contrast; --network runs
    # the network before the optimisation (by default it does not)
    code = run([files["fixed"], files["moving"], "--output-dir", out, "--model", files["model"],
                "--moving-labels", files["labels"], "--init", "affine", "--contrast", "same",
                "--network", "--quiet"])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"displacement.nii", "warped.nii.gz", "jacobian.nii", "folding.nii.gz",
                     "warped_labels.nii.gz", "affine.tfm", "report.json", "overview.png"}
    report = json.loads((out / "report.json").read_text())
    affine = sitk.AffineTransform(sitk.ReadTransform(str(out / "affine.tfm")))
    a = np.asarray(report["initial_matrix_lps"])
    np.testing.assert_allclose(np.reshape(affine.GetMatrix(), (3, 3)), a[:3, :3], atol=1e-9)
    np.testing.assert_allclose(affine.GetTranslation(), a[:3, 3], atol=1e-6)
    jac = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii")))
    assert report["model"]["name"] == "tiny" and report["device"] == "cpu"
    assert report["quality"]["jacobian_min"] == pytest.approx(float(jac.min()), rel=1e-5)
    assert report["quality"]["folding_percent"] == pytest.approx(100 * np.mean(jac <= 0))
    for stage in ("reading inputs", "registering", "resampling", "writing outputs", "total"):
        assert report["seconds"][stage] >= 0
    assert report["contrast"]["requested"] == "same" and report["contrast"]["used"] == "same"
    assert report["network"] is True
    default = optimise.PRESETS["default"]
    assert report["refinement"] == {"similarity": "lncc", "preset": "default",
                                    "scales_mm": list(default.scales_mm),
                                    "iterations": list(default.iterations)}
    assert report["method"].startswith("same contrast") and "LNCC" in report["method"]
    # The overview of the real run: the full figure (3 views x 5 columns at 90 dpi), not blank;
    # what it shows, and where, is checked in test_overview.py.
    import matplotlib.image
    png = matplotlib.image.imread(str(out / "overview.png"))
    assert png.shape[:2] == (945, 1530) and png[..., :3].std() > 0.1
    assert "folding" in capsys.readouterr().out
    # NIfTI displacement vectors (intent 1006), what Slicer loads without a warning; the
    # peers' reading of it is in test_interop.py.
    assert (out / "displacement.nii").read_bytes()[68:70] == (1006).to_bytes(2, "little")
    # The displacement file is a transform SimpleITK applies to reproduce warped.nii.gz.
    field = sitk.Cast(sitk.ReadImage(str(out / "displacement.nii")), sitk.sitkVectorFloat64)
    fixed, moving = sitk.ReadImage(files["fixed"]), sitk.ReadImage(files["moving"])
    ref = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(
        field), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    assert np.abs(ref - warped).max() < 1e-4 * np.abs(ref).max()


def test_existing_output_is_kept_without_overwrite(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert run([files["fixed"], files["moving"], "--output-dir", out, "--model",
                files["model"], "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert run([files["fixed"], files["moving"], "--output-dir", out, "--model",
                files["model"], "--quiet", "--overwrite", "--no-png"]) == 0
    assert (out / "keep.txt").read_text() == "user data"
    assert (out / "displacement.nii").exists()


def test_an_input_named_like_an_output_in_the_folder_is_refused_even_with_overwrite(files, tmp_path,
                                                                                  capsys):
    # The swap replaces the folder's files of this command's names: such an input was lost.
    out = tmp_path / "out"
    out.mkdir()
    inside = out / "warped.nii.gz"
    inside.write_bytes(Path(files["fixed"]).read_bytes())
    link = tmp_path / "link.nii.gz"
    link.symlink_to(inside)
    sitk.WriteTransform(sitk.TranslationTransform(3, (1.0, 0.0, 0.0)), str(out / "affine.tfm"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for argv, role in (([inside, files["moving"]], "fixed image"),
                       ([files["fixed"], link], "moving image"),
                       ([files["fixed"], files["moving"], "--moving-labels", inside], "moving label map"),
                       ([files["fixed"], files["moving"], "--initial-transform", out / "affine.tfm"],
                        "initial transform")):
        assert run([*argv, "--output-dir", out, "--model", files["model"], "--quiet",
                    "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert f"the {role} " in err and "a file this command writes: it would be replaced" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the user's other files in the folder, inputs among them, are kept by a run
    kept = out / "fixed_copy.nii.gz"
    kept.write_bytes(Path(files["fixed"]).read_bytes())
    inside.unlink()
    assert run([kept, files["moving"], "--output-dir", out, "--model", files["model"], "--quiet",
                "--overwrite", "--no-png"]) == 0
    assert kept.read_bytes() == Path(files["fixed"]).read_bytes()


def _bad_inputs(tmp_path, files):
    text = tmp_path / "notes.nii.gz"
    text.write_text("this is not an image")
    flat = tmp_path / "flat2d.nii.gz"
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkFloat32) + 1.0, str(flat))
    four = tmp_path / "four_d.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(2, 8, 8, 8).astype(np.float32),
                                           isVector=False), str(four))
    nan = tmp_path / "nan.mha"  # the NIfTI writer would replace the NaN
    arr = np.random.rand(8, 8, 8).astype(np.float32)
    arr[2, 3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(nan))
    const = tmp_path / "const.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 8), np.float32)), str(const))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(Path(files["model"]).read_bytes()[:300])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    return [
        (["missing.nii.gz", files["moving"]], "not found"),
        ([text, files["moving"]], "cannot read"),
        ([flat, files["moving"]], "2D"),
        ([files["fixed"], four], "4D"),
        ([files["fixed"], nan], "NaN"),
        ([const, files["moving"]], "constant"),
        ([files["fixed"], files["moving"], "--model", corrupt], "not a readable"),
        ([files["fixed"], files["moving"], "--model", foreign], "not an EOIRRegistration model"),
        ([files["fixed"], files["moving"], "--model", "no-such-model"], "no bundled model"),
    ]


def test_bad_input_gets_a_clear_error_and_writes_nothing(files, tmp_path, capsys):
    for argv, message in _bad_inputs(tmp_path, files):
        out = tmp_path / "never"
        model = [] if "--model" in argv else ["--model", files["model"]]
        code = run([*argv, "--output-dir", out, *model, "--quiet"])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert message in err, (message, err)
        assert not out.exists(), argv
        assert not list(tmp_path.glob(".never.partial-*"))


def test_module_entry_point_runs_register_and_models(files, tmp_path):
    out = tmp_path / "via_module"
    env = {"PYTHONPATH": str(ENGINE_DIR), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "EOIRRegistrationLib", "register", files["fixed"],
                           files["moving"], "--output-dir", str(out), "--model", files["model"],
                           "--no-png"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "displacement.nii").exists()
    assert "[100.0%]" in proc.stderr  # progress lines
    proc = subprocess.run([sys.executable, "-m", "EOIRRegistrationLib", "nonsense"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_the_dispatcher_runs_each_command_and_explains_its_usage(capsys, monkeypatch):
    """``python -m EOIRRegistrationLib`` (cli.main.main) in process: a known command runs that
    command's own main with the remaining arguments; none or an unknown one prints the usage."""
    from EOIRRegistrationLib.cli import main as cli_main

    assert cli_main.main([]) == 2 and "usage" in capsys.readouterr().err
    assert cli_main.main(["--help"]) == 0
    usage = capsys.readouterr().err
    assert all(name in usage for name in ("register", "train", "models", "demo"))
    calls = []
    monkeypatch.setattr(register_cli, "main", lambda argv: calls.append(argv) or 7)
    assert cli_main.main(["register", "f", "m", "--output-dir", "o"]) == 7
    assert calls == [["f", "m", "--output-dir", "o"]]
    assert cli_main.main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed and all({"name", "path", "card"} <= set(entry) for entry in listed)


def test_initial_alignment_options_write_the_affine_and_refuse_bad_files(files, tmp_path, capsys):
    out = tmp_path / "aligned"
    assert run([files["fixed"], files["moving"], "--output-dir", out, "--model", files["model"],
                "--init", "affine", "--no-png", "--quiet"]) == 0
    affine = sitk.ReadTransform(str(out / "affine.tfm"))
    report = json.loads((out / "report.json").read_text())
    assert report["initial_alignment"] == "affine"
    m = np.asarray(report["initial_matrix_lps"])
    point = (3.0, -4.0, 5.0)
    assert np.allclose(affine.TransformPoint(point), m[:3, :3] @ point + m[:3, 3], atol=1e-6)
    bad = tmp_path / "bad.tfm"
    bad.write_text("not a transform")
    assert run([files["fixed"], files["moving"], "--output-dir", tmp_path / "never", "--model",
                files["model"], "--initial-transform", bad, "--quiet"]) == 2
    assert "cannot read the initial transform" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    assert run([files["fixed"], files["moving"], "--output-dir", tmp_path / "given", "--model",
                files["model"], "--initial-transform", out / "affine.tfm", "--no-png",
                "--quiet"]) == 0
    again = json.loads((tmp_path / "given" / "report.json").read_text())
    assert np.allclose(again["initial_matrix_lps"], m, atol=1e-9)
    assert again["initial_alignment"] == "given"


def test_refinement_with_mind_runs_from_the_command_line(files, tmp_path):
    out = tmp_path / "mind"
    assert run([files["fixed"], files["moving"], "--output-dir", out, "--model", files["model"],
                "--init", "none", "--refine", "3", "--refine-similarity", "mind", "--no-png",
                "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["initial_alignment"] == "none" and "refining" in report["seconds"]


def test_no_network_runs_the_refinement_alone_and_needs_it(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert run([files["fixed"], files["moving"], "--output-dir", out, "--model", files["model"],
                "--no-network", "--refine", "0", "--quiet", "--no-png"]) == 2
    assert "is the whole registration" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # nothing written
    assert run([files["fixed"], files["moving"], "--output-dir", out, "--model", files["model"],
                "--no-network", "--refine", "3", "--refine-similarity", "mind", "--quiet",
                "--no-png"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["network"] is False and "registering" not in report["seconds"]
    assert report["seconds"]["refining"] >= 0


def test_inverted_contrast_is_detected_and_reported(tmp_path, capsys):
    """--contrast auto on a pair whose moving image is the fixed one with inverted intensities:
    the MIND-SSC refinement alone runs with its own default steps, and the report says why."""
    from EOIRRegistrationLib.training.phantom import make_phantom_pair

    pair = make_phantom_pair(seed=4, shape=(32, 32, 32), spacing=(2.0, 2.0, 2.0))
    inverted = sitk.Cast(sitk.InvertIntensity(sitk.Cast(pair.moving, sitk.sitkFloat32), 1000.0),
                         sitk.sitkFloat32) * sitk.Cast(pair.moving_labels > 0, sitk.sitkFloat32)
    paths = {}
    for name, image in (("fixed", pair.fixed), ("moving", inverted)):
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(image, paths[name])
    model = write_tiny_model(tmp_path / "tiny.pt", 0.05)
    out = tmp_path / "out"
    assert run([paths["fixed"], paths["moving"], "--output-dir", out, "--model", model,
                "--init", "none", "--refine", "2", "--no-png"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["contrast"]["requested"] == "auto" and report["contrast"]["used"] == "different"
    assert report["contrast"]["correlation"] < 0
    assert report["network"] is False and "registering" not in report["seconds"]
    assert report["refinement"] == {"similarity": "mind", "preset": "default",
                                    "scales_mm": list(optimise.MIND_PRESETS["default"].scales_mm),
                                    "iterations": [*optimise.MIND_PRESETS["default"].iterations[:-1], 2]}
    printed = capsys.readouterr().out
    assert "different contrasts" in printed and "[auto]" in printed
    # the same pair with --contrast same: the LNCC optimisation, as asked (without the network,
    # which by default runs only alone or before the MIND-SSC refinement)
    assert run([paths["fixed"], paths["moving"], "--output-dir", out, "--model", model,
                "--init", "none", "--refine", "2", "--contrast", "same", "--no-png",
                "--overwrite", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["contrast"]["used"] == "same" and report["network"] is False
    assert report["refinement"]["similarity"] == "lncc"
    # different contrasts without refinement leave nothing to register with
    assert run([paths["fixed"], paths["moving"], "--output-dir", tmp_path / "none", "--model",
                model, "--contrast", "different", "--refine", "0", "--quiet"]) == 2
    assert "is the whole registration" in capsys.readouterr().err


def test_a_rerun_with_overwrite_leaves_no_stale_output(files, tmp_path):
    """A first run with an affine start and labels, then one without either, into the same
    folder: the second run's folder holds only its own files (and the user's); the Jacobian an
    earlier version wrote compressed is not left beside the new one."""
    out = tmp_path / "out"
    assert run([files["fixed"], files["moving"], "--output-dir", out, "--model", files["model"],
                "--moving-labels", files["labels"], "--init", "affine", "--contrast", "same",
                "--refine", "0", "--quiet", "--no-png"]) == 0
    assert {"affine.tfm", "warped_labels.nii.gz"} <= {p.name for p in out.iterdir()}
    (out / "notes.txt").write_text("user data")
    (out / "jacobian.nii").rename(out / "jacobian.nii.gz")  # as an earlier version named it
    assert run([files["fixed"], files["moving"], "--output-dir", out, "--model", files["model"],
                "--init", "none", "--contrast", "same", "--refine", "0", "--quiet", "--no-png",
                "--overwrite"]) == 0
    assert {p.name for p in out.iterdir()} == {"displacement.nii", "warped.nii.gz",
                                               "jacobian.nii", "folding.nii.gz",
                                               "report.json", "notes.txt"}


def test_output_folder_replaces_the_named_files_all_or_nothing(tmp_path):
    """cli.outputfolder.OutputFolder: the files named by the command but not written this time
    are removed, any other file is kept; a writer that fails leaves the folder as it was; the
    run leaves nothing beside the folder (staging, lock)."""
    from EOIRRegistrationLib.cli.outputfolder import OutputFolder

    out = tmp_path / "out"
    out.mkdir()
    for name, text in (("a.txt", "old a"), ("b.txt", "old b"), ("notes.txt", "user data")):
        (out / name).write_text(text)
    names = ("a.txt", "b.txt", "c.txt")

    def writer(text):
        return lambda path: Path(path).write_text(text)

    def broken(path):
        raise OSError("disk full")

    with pytest.raises(OutputError, match="disk full; nothing was changed"):
        with OutputFolder(out, True, names) as folder:
            folder.commit({"a.txt": writer("new a"), "c.txt": broken})
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "a.txt": "old a", "b.txt": "old b", "notes.txt": "user data"}
    with OutputFolder(out, True, names) as folder:
        folder.commit({"a.txt": writer("new a"), "c.txt": writer("new c")})
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        "a.txt": "new a", "c.txt": "new c", "notes.txt": "user data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(InputError, match="--overwrite"):
        with OutputFolder(out, False, ("a.txt",)):
            pass
    with OutputFolder(out, True, ("a.txt",)), OutputFolder(tmp_path / "new", False, ("a.txt",)):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_command_line_keeps_freed_memory_on_glibc(files, tmp_path, monkeypatch):
    """eoir-register sets glibc's allocator so large tensors are not page-faulted in anew
    (allocator.py); where there is no glibc the settings are skipped, not an error."""
    import ctypes
    import sys as system

    from EOIRRegistrationLib.engine import allocator

    calls = []
    monkeypatch.setattr(register_cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert run([files["fixed"], files["moving"], "--output-dir", tmp_path / "o", "--model",
                files["model"], "--contrast", "same", "--refine", "0", "--quiet",
                "--no-png"]) == 0
    assert calls == [1]
    if system.platform.startswith("linux") and "glibc" in " ".join(
            __import__("platform").libc_ver()):
        assert allocator.keep_freed_memory() is True
    monkeypatch.setattr(ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    assert allocator.keep_freed_memory() is False
    monkeypatch.setattr(system, "platform", "darwin")
    assert allocator.keep_freed_memory() is False


def test_inverse_fixed_labels_and_masks_from_the_command_line(files, tmp_path, capsys):
    fixed, moving = sitk.ReadImage(files["fixed"]), sitk.ReadImage(files["moving"])
    fixed_labels = sitk.Cast(sitk.BinaryThreshold(fixed, 0.5, 10.0, 5, 0), sitk.sitkUInt8)
    paths = {name: str(tmp_path / f"{name}.nii.gz") for name in ("fl", "fm", "mm")}
    sitk.WriteImage(fixed_labels, paths["fl"])
    sitk.WriteImage(sitk.Cast(fixed > -1, sitk.sitkUInt8), paths["fm"])  # everything
    sitk.WriteImage(sitk.Cast(moving > 0.3, sitk.sitkUInt8), paths["mm"])
    out = tmp_path / "out"
    base = [files["fixed"], files["moving"], "--output-dir", out, "--model", files["model"],
            "--contrast", "same", "--refine", "2", "--no-png", "--quiet"]
    # fixed labels alone give the Dice only: the inversion is not done unasked
    assert run(base + ["--fixed-labels", paths["fl"], "--moving-labels", files["labels"]]) == 0
    assert not {"inverse_displacement.nii", "fixed_labels_in_moving.nii.gz"} & {
        p.name for p in out.iterdir()}
    assert "mean_after" in json.loads((out / "report.json").read_text())["dice"]
    capsys.readouterr()
    # with --inverse they are carried into the moving space
    assert run(base + ["--fixed-labels", paths["fl"], "--moving-labels", files["labels"],
                       "--fixed-mask", paths["fm"], "--moving-mask", paths["mm"], "--inverse",
                       "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"inverse_displacement.nii", "fixed_labels_in_moving.nii.gz"} <= names
    inverse = sitk.ReadImage(str(out / "inverse_displacement.nii"))
    assert inverse.GetPixelID() == sitk.sitkVectorFloat32
    for image in (inverse, sitk.ReadImage(str(out / "fixed_labels_in_moving.nii.gz"))):
        assert image.GetSize() == moving.GetSize()
        np.testing.assert_allclose(image.GetOrigin(), moving.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), moving.GetDirection(), atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["masks"] == ["fixed", "moving"] and report["options"]["inverse"] is True
    assert report["inverse"]["mean_residual_mm"] < 1e-4
    assert "moving point y maps to fixed point" in report["inverse"]["convention"]
    carried = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "fixed_labels_in_moving.nii.gz")))
    on_moving = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(files["labels"]), moving,
                                                     sitk.Transform(), sitk.sitkNearestNeighbor))
    dice = 2 * np.sum((carried == 5) & (on_moving == 5)) / ((carried == 5).sum() + (on_moving == 5).sum())
    assert report["dice"]["mean_after_in_moving_space"] == pytest.approx(dice)
    assert "carried into the moving space" in capsys.readouterr().out
    # --inverse alone; a re-run leaves no stale labels of the earlier run
    assert run(base + ["--inverse", "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "inverse_displacement.nii" in names and "fixed_labels_in_moving.nii.gz" not in names
    assert run(base + ["--overwrite"]) == 0
    assert "inverse_displacement.nii" not in {p.name for p in out.iterdir()}
    # an unreadable mask: a clear error, nothing written
    empty = tmp_path / "empty"
    assert run(base[:2] + ["--output-dir", empty] + base[4:] + ["--moving-mask",
                                                               tmp_path / "none.nii.gz"]) == 2
    assert "moving mask file not found" in capsys.readouterr().err and not empty.exists()


def test_inputs_read_together_report_the_first_bad_one_in_argument_order(files, tmp_path):
    """cli.files.read_images reads in threads: the error still names the first failing input in
    the order given (fixed, then moving, then the others), whichever thread failed first; the
    images come back in that order."""
    from EOIRRegistrationLib.cli.files import read_images
    missing = str(tmp_path / "missing.nii.gz")
    with pytest.raises(InputError, match="^fixed image file not found"):
        read_images([(missing, "fixed image"), (missing, "moving image")])
    with pytest.raises(InputError, match="^moving image file not found"):
        read_images([(files["fixed"], "fixed image"), (missing, "moving image"),
                     (missing, "fixed mask")])
    fixed, none, moving = read_images([(files["fixed"], "fixed image"), (None, "labels"),
                                       (files["moving"], "moving image")])
    assert none is None
    assert fixed.GetSize() == sitk.ReadImage(files["fixed"]).GetSize()
    assert np.array_equal(sitk.GetArrayViewFromImage(moving),
                          sitk.GetArrayViewFromImage(sitk.ReadImage(files["moving"])))
