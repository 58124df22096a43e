"""``displacement.nii`` as the project writes it (``cli.files.write_displacement``), used as-is by
the tools users take it to: SimpleITK, ANTsPy, greedy and Slicer (slicer-core), and read raw by a
RAS-based reader (nibabel) through the README's conversion.

One small case: a smooth asymmetric phantom defined in LPS millimetres, sampled on an oblique,
anisotropic fixed grid and on a different oblique moving grid, and a known smooth displacement
(LPS mm on the fixed grid, resampling direction: fixed x -> moving x + d(x), vanishing at the
border so that Slicer's hardening keeps the grid). The project's warped image is the engine's own
resampler (``core.geometry``, what ``engine.pipeline`` writes to ``warped.nii.gz``); each tool must
reproduce it from the file (correlation > 0.999 inside the fixed foreground). The same file with
x and y of the vectors negated, the mistake this format invites, gives a correlation below 0.9.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from EOIRRegistrationLib.cli.files import NIFTI_INTENT_DISPVECT, write_displacement
from EOIRRegistrationLib.core import geometry

README = Path(__file__).resolve().parents[2] / "README.md"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
MIN_CORRELATION = 0.999
# Blobs (centre LPS mm, sigma mm, weight): distinct sizes and weights, no symmetry.
BLOBS = [((-6.0, 4.0, 2.0), 5.0, 1.0), ((7.0, -3.0, -4.0), 3.5, 0.7),
         ((1.0, 8.0, 6.0), 3.0, 0.5), ((-2.0, -7.0, 7.0), 4.0, 0.35)]


def centred_grid(size, spacing, versor_axis, angle) -> sitk.Image:
    """An empty oblique grid whose centre is the LPS origin (the phantom's centre)."""
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetDirection(sitk.VersorTransform(versor_axis, angle).GetMatrix())
    half = np.asarray(spacing) * (np.asarray(size) - 1) / 2
    image.SetOrigin(tuple(-(np.reshape(image.GetDirection(), (3, 3)) @ half)))
    return image


def physical_points(image: sitk.Image) -> np.ndarray:
    """(k, j, i, 3) LPS mm of every voxel centre."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in reversed(image.GetSize())],
                          indexing="ij")
    index = np.stack([i, j, k], axis=-1)
    m = np.reshape(image.GetDirection(), (3, 3)) @ np.diag(image.GetSpacing())
    return index @ m.T + np.asarray(image.GetOrigin())


def phantom_on(image: sitk.Image) -> sitk.Image:
    p = physical_points(image)
    values = sum(w * np.exp(-np.sum((p - c) ** 2, axis=-1) / (2 * s ** 2)) for c, s, w in BLOBS)
    out = sitk.GetImageFromArray((100.0 * values).astype(np.float32))
    out.CopyInformation(image)
    return out


def known_displacement(fixed: sitk.Image) -> sitk.Image:
    """Smooth LPS-mm field on the fixed grid, up to ~4 mm, zero on the border faces."""
    p = physical_points(fixed)
    d = np.stack([4.5 * np.sin(p[..., 1] / 7.0), -3.75 * np.cos(p[..., 2] / 6.0),
                  3.0 * np.sin((p[..., 0] + p[..., 1]) / 8.0)], axis=-1)
    k, j, i = np.meshgrid(*[np.linspace(0.0, np.pi, n) for n in reversed(fixed.GetSize())],
                          indexing="ij")
    field = sitk.GetImageFromArray(d * (np.sin(i) * np.sin(j) * np.sin(k))[..., None] ** 0.5,
                                   isVector=True)
    field.CopyInformation(fixed)
    return field


def engine_warp(moving: sitk.Image, fixed: sitk.Image, displacement: sitk.Image) -> sitk.Image:
    """The engine's resampler, as ``engine.pipeline`` makes ``warped.nii.gz``."""
    disp, _ = geometry.displacement_from_image(displacement)
    fixed_grid = geometry.Grid.from_image(fixed)
    warped = geometry.sample_through_like_itk(geometry.image_to_tensor(moving, torch.float64),
                                              geometry.Grid.from_image(moving), fixed_grid,
                                              displacement=disp)
    return geometry.tensor_to_image(warped[0, 0], fixed_grid)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interop")
    fixed = phantom_on(centred_grid((40, 36, 28), (1.3, 1.1, 1.9), (0.2, 0.4, 0.9), 0.35))
    moving = phantom_on(centred_grid((44, 44, 36), (1.25, 1.2, 1.6), (0.7, -0.2, 0.3), -0.3))
    displacement = known_displacement(fixed)
    paths = {name: folder / f"{name}.nii.gz" for name in ("fixed", "moving", "warped")}
    paths["displacement"] = folder / "displacement.nii"
    sitk.WriteImage(fixed, str(paths["fixed"]))
    sitk.WriteImage(moving, str(paths["moving"]))
    write_displacement(displacement, paths["displacement"])
    warped = engine_warp(moving, fixed, displacement)
    sitk.WriteImage(warped, str(paths["warped"]))
    # The same file with x and y of the vectors negated (as a reader that skipped the RAS -> LPS
    # conversion would see it).
    mirrored = sitk.GetImageFromArray(sitk.GetArrayFromImage(displacement) * [-1.0, -1.0, 1.0],
                                      isVector=True)
    mirrored.CopyInformation(fixed)
    paths["mirrored"] = folder / "mirrored.nii"
    write_displacement(mirrored, paths["mirrored"])
    fixed_array = sitk.GetArrayFromImage(fixed)
    return {"folder": folder, "paths": {k: str(v) for k, v in paths.items()}, "fixed": fixed,
            "moving": moving, "displacement": displacement,
            "warped": sitk.GetArrayFromImage(sitk.ReadImage(str(paths["warped"]))),
            "foreground": fixed_array > 0.1 * fixed_array.max()}


def correlation(case, array: np.ndarray) -> float:
    m = case["foreground"]
    return float(np.corrcoef(array[m], case["warped"][m])[0, 1])


def assert_reproduces_warped(case, array: np.ndarray) -> None:
    assert correlation(case, array) > MIN_CORRELATION
    m = case["foreground"]
    assert np.abs(array - case["warped"])[m].max() < 1e-3 * case["warped"][m].max()


def read_on_fixed_grid(case, path) -> np.ndarray:
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    assert image.GetSize() == case["fixed"].GetSize()
    np.testing.assert_allclose(image.GetOrigin(), case["fixed"].GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), case["fixed"].GetDirection(), atol=1e-5)
    return sitk.GetArrayFromImage(image)


def test_case_is_a_real_deformation(case):
    """The check can fail: without the field, or with x and y mirrored, the warp is far off."""
    assert case["foreground"].mean() > 0.05
    on_fixed = sitk.Resample(case["moving"], case["fixed"], sitk.Transform(), sitk.sitkLinear, 0.0)
    assert correlation(case, sitk.GetArrayFromImage(on_fixed)) < 0.9
    mirrored = sitk.ReadImage(case["paths"]["mirrored"], sitk.sitkVectorFloat64)
    wrong = sitk.Resample(case["moving"], case["fixed"], sitk.DisplacementFieldTransform(mirrored),
                          sitk.sitkLinear, 0.0)
    assert correlation(case, sitk.GetArrayFromImage(wrong)) < 0.9


# ---------------------------------------------------------------------------------------------
# the file
# ---------------------------------------------------------------------------------------------

def test_header_is_nifti_displacement_vectors_with_ras_vectors(case):
    """Intent 1006 (NIFTI_INTENT_DISPVECT), float32, and on disk the vectors in RAS, the NIfTI
    world frame (as Slicer writes them); read raw by nibabel, independent of ITK."""
    import nibabel

    raw = Path(case["paths"]["displacement"]).read_bytes()
    assert struct.unpack("<i", raw[:4])[0] == 348 and raw[344:348] == b"n+1\0"
    assert struct.unpack("<h", raw[68:70])[0] == NIFTI_INTENT_DISPVECT == 1006
    assert struct.unpack("<h", raw[70:72])[0] == 16  # DT_FLOAT32
    image = nibabel.load(case["paths"]["displacement"])
    assert image.header.get_intent()[0] == "displacement vector"  # nibabel's name for 1006
    vectors = np.asarray(image.dataobj)  # (i, j, k, 1, 3)
    assert vectors.shape == (*case["fixed"].GetSize(), 1, 3)
    lps = sitk.GetArrayFromImage(case["displacement"])  # (k, j, i, 3)
    np.testing.assert_allclose(vectors[:, :, :, 0, :].transpose(2, 1, 0, 3), lps @ LPS_TO_RAS,
                               atol=1e-5)


def test_readme_conversion_for_ras_tools_matches_nibabel(case, monkeypatch):
    """The README's snippet, executed as written: SimpleITK's LPS view of the file turned into
    RAS vectors and a voxel -> RAS matrix equals nibabel's RAS view of the same file."""
    import nibabel

    text = README.read_text()
    marker = text.index("<!-- snippet: ras-conversion")
    snippet = re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)
    monkeypatch.chdir(Path(case["paths"]["displacement"]).parent)
    names = {}
    exec(snippet, names)
    lps = sitk.GetArrayFromImage(case["displacement"])
    np.testing.assert_allclose(names["d_lps"], lps, atol=1e-5)
    image = nibabel.load(case["paths"]["displacement"])
    np.testing.assert_allclose(names["vox_to_ras"], image.affine, atol=1e-4)
    vectors = np.asarray(image.dataobj)[:, :, :, 0, :].transpose(2, 1, 0, 3)
    np.testing.assert_allclose(names["d_ras"], vectors, atol=1e-6)
    # and the plain ITK copy: intent 1007 (NIFTI_INTENT_VECTOR), LPS vectors on disk
    plain = Path(case["paths"]["displacement"]).parent / "displacement_lps.nii"
    assert struct.unpack("<h", plain.read_bytes()[68:70])[0] == 1007
    np.testing.assert_allclose(np.asarray(nibabel.load(plain).dataobj)[:, :, :, 0, :].transpose(
        2, 1, 0, 3), lps, atol=1e-5)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_written_field_reads_back_unchanged_in_simpleitk(case, tmp_path, suffix):
    path = tmp_path / f"field{suffix}"
    write_displacement(case["displacement"], path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    back = sitk.ReadImage(str(path))
    assert back.GetPixelID() == sitk.sitkVectorFloat32
    assert back.GetMetaData("intent_code") == "1006"
    np.testing.assert_allclose(sitk.GetArrayFromImage(back),
                               sitk.GetArrayFromImage(case["displacement"]), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), case["fixed"].GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), case["fixed"].GetDirection(), atol=1e-5)
    np.testing.assert_allclose(back.GetSpacing(), case["fixed"].GetSpacing(), atol=1e-6)
    # A field read from such a file (its metadata says intent 1006) is written the same way.
    write_displacement(back, tmp_path / f"again{suffix}")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"again{suffix}"))),
                                  sitk.GetArrayFromImage(back))


def test_intent_code_alone_over_lps_vectors_would_be_misread(case, tmp_path):
    """Why the writer stores RAS vectors: ITK converts intent-1006 vectors from RAS to LPS on
    reading, so setting the intent code over ITK's LPS vectors mirrors x and y silently."""
    path = tmp_path / "naive.nii"
    sitk.WriteImage(sitk.Cast(case["displacement"], sitk.sitkVectorFloat32), str(path))
    raw = bytearray(path.read_bytes())
    raw[68:70] = struct.pack("<h", 1006)
    path.write_bytes(bytes(raw))
    lps = sitk.GetArrayFromImage(case["displacement"])
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(path))),
                               lps * [-1.0, -1.0, 1.0], atol=1e-5)


@pytest.mark.parametrize("bad", ["field.nrrd", "field.mha"])
def test_writer_refuses_a_path_that_is_not_nifti(case, tmp_path, bad):
    with pytest.raises(ValueError, match="NIfTI path"):
        write_displacement(case["displacement"], tmp_path / bad)
    assert not any(tmp_path.iterdir())


def test_writer_refuses_a_scalar_image(case, tmp_path):
    with pytest.raises(ValueError, match="3-vectors"):
        write_displacement(case["fixed"], tmp_path / "field.nii")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# the tools
# ---------------------------------------------------------------------------------------------

def test_simpleitk_displacement_field_transform_reproduces_warped(case):
    field = sitk.ReadImage(case["paths"]["displacement"], sitk.sitkVectorFloat64)
    warped = sitk.Resample(case["moving"], case["fixed"], sitk.DisplacementFieldTransform(field),
                           sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    assert_reproduces_warped(case, sitk.GetArrayFromImage(warped))
    np.testing.assert_allclose(sitk.GetArrayFromImage(warped), case["warped"], atol=1e-3)


def test_ants_apply_transforms_reproduces_warped(case, tmp_path):
    """ANTs takes an ITK displacement field (LPS, resampling direction) as a transform file."""
    import ants

    fixed = ants.image_read(case["paths"]["fixed"])
    moving = ants.image_read(case["paths"]["moving"])
    out = ants.apply_transforms(fixed=fixed, moving=moving,
                                transformlist=[case["paths"]["displacement"]],
                                interpolator="linear")
    ants.image_write(out, str(tmp_path / "ants.nii.gz"))
    assert_reproduces_warped(case, read_on_fixed_grid(case, tmp_path / "ants.nii.gz"))
    wrong = ants.apply_transforms(fixed=fixed, moving=moving,
                                  transformlist=[case["paths"]["mirrored"]], interpolator="linear")
    ants.image_write(wrong, str(tmp_path / "wrong.nii.gz"))
    assert correlation(case, read_on_fixed_grid(case, tmp_path / "wrong.nii.gz")) < 0.9


def test_greedy_reslice_reproduces_warped(case, tmp_path):
    """greedy -rm MOVING OUT -r WARP: the warp maps reference (fixed) points to moving points."""
    from picsl_greedy import Greedy3D

    out = tmp_path / "greedy_warped.nii.gz"
    with open(tmp_path / "greedy.log", "w") as log:
        Greedy3D().execute(f"-d 3 -threads 1 -rf {case['paths']['fixed']} "
                           f"-rm {case['paths']['moving']} {out} "
                           f"-r {case['paths']['displacement']}", out=log, err=log)
    assert_reproduces_warped(case, read_on_fixed_grid(case, out))


def test_slicer_reads_the_file_as_a_grid_transform_without_warning(case, tmp_path):
    """Slicer's transform storage node reads the file (no message to the user, nothing in VTK's
    output), and hardenTransform of a volume under it gives the project's warped image."""
    import slicer
    import vtk

    from EOIRRegistrationLib.slicer import bridge

    scene, app_logic = bridge.createStandaloneScene()

    def read(path):
        """The node, the storage node's user messages and what VTK printed meanwhile."""
        node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
        storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
        storage.SetFileName(path)
        captured, previous = vtk.vtkStringOutputWindow(), vtk.vtkOutputWindow.GetInstance()
        vtk.vtkOutputWindow.SetInstance(captured)
        try:
            assert storage.ReadData(node) == 1
        finally:
            vtk.vtkOutputWindow.SetInstance(previous)
        messages = storage.GetUserMessages()
        return node, [messages.GetNthMessageText(i)
                      for i in range(messages.GetNumberOfMessages())], captured.GetOutput()

    # The capture works: a plain ITK vector file (intent 1007) is warned about, in both places.
    plain = str(tmp_path / "plain.nii")
    sitk.WriteImage(sitk.Cast(case["displacement"], sitk.sitkVectorFloat32), plain)
    _, messages, printed = read(plain)
    assert any("'1006'" in m for m in messages) and "'1006'" in printed
    transform, messages, printed = read(case["paths"]["displacement"])
    assert messages == [] and printed == ""

    back = bridge.gridTransformNodeToDisplacement(transform)  # RAS in the scene -> LPS
    np.testing.assert_allclose(sitk.GetArrayFromImage(back),
                               sitk.GetArrayFromImage(case["displacement"]), atol=1e-5)
    # Hardening resamples a volume in its own grid; a moving volume on the fixed grid (the moving
    # image resampled there first) keeps it, so the result compares voxel by voxel.
    moving = sitk.Resample(case["moving"], case["fixed"], sitk.Transform(), sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    expected = sitk.GetArrayFromImage(engine_warp(moving, case["fixed"], case["displacement"]))
    node = bridge.imageToVolumeNode(moving, scene, "moving")
    node.SetAndObserveTransformNodeID(transform.GetID())
    transform_logic = slicer.vtkSlicerTransformLogic()
    transform_logic.SetMRMLScene(scene)
    transform_logic.hardenTransform(node)
    assert node.GetParentTransformNode() is None
    hardened = bridge.volumeNodeToImage(node)
    assert hardened.GetSize() == case["fixed"].GetSize()
    np.testing.assert_allclose(hardened.GetOrigin(), case["fixed"].GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(hardened.GetDirection(), case["fixed"].GetDirection(), atol=1e-5)
    hardened_array = sitk.GetArrayFromImage(hardened)
    m = case["foreground"]
    assert np.corrcoef(hardened_array[m], expected[m])[0, 1] > MIN_CORRELATION
    np.testing.assert_allclose(hardened_array, expected, atol=1e-2 * expected.max())
