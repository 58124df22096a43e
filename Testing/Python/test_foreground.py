"""The foreground box (engine/foreground.py), the sub-grids and slabs it rests on (core/geometry),
and the slab-by-slab full-resolution stages of the pipeline, each against an independent
implementation or the whole-grid path."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import oblique_image

from EOIRRegistrationLib.core import geometry
from EOIRRegistrationLib.engine import filters, foreground
from EOIRRegistrationLib.engine import pipeline as pipeline_module
from EOIRRegistrationLib.engine.pipeline import register


def body_in_air(shift_mm=(0.0, 0.0, 0.0), size=(64, 64, 40), spacing=(3.0, 3.0, 3.0), seed=0):
    """A CT-like volume (HU): an elliptic body (soft tissue 40, a bone rod 700, a dark
    lung-like blob) in air (-1000), the anatomy shifted by ``shift_mm`` (LPS) plus a smooth
    bump, noise 10 HU."""
    origin = tuple(-0.5 * (n - 1) * s for n, s in zip(size, spacing))
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    k, j, i = np.meshgrid(*(np.arange(n) for n in reversed(size)), indexing="ij")
    x, y, z = (o + s * idx for o, s, idx in zip(origin, spacing, (i, j, k)))
    bump = 4.0 * np.exp(-((x - 10) ** 2 + (y + 5) ** 2 + z ** 2) / (2 * 15.0 ** 2))
    x, y, z = x - shift_mm[0] - bump, y - shift_mm[1], z - shift_mm[2]
    hu = np.full(x.shape, -1000.0)
    inside = (x / 40) ** 2 + (y / 26) ** 2 <= 1
    # tissue texture that moves with the anatomy, so that the similarity sees the motion
    texture = 60.0 * (np.sin(x / 4.0 + 1.0) * np.sin(y / 5.0) + np.sin(z / 6.0 + x / 9.0))
    hu[inside] = 40.0 + texture[inside]
    hu[(x - 12) ** 2 + (y - 14) ** 2 <= 36] = 700.0
    hu[((x + 15) / 12) ** 2 + (y / 10) ** 2 + ((z - 10) / 25) ** 2 <= 1] = -850.0
    hu += np.random.default_rng(seed).normal(0, 10.0, hu.shape)
    out = sitk.GetImageFromArray(hu.astype(np.float32))
    out.CopyInformation(image)
    return out


def test_a_sub_grid_is_the_block_itk_cuts_out_of_the_image():
    image = oblique_image(size=(28, 24, 20), spacing=(1.2, 0.9, 2.5), angles=(0.3, -0.2, 0.1))
    grid = geometry.Grid.from_image(image)
    start, shape = (3, 5, 7), (10, 12, 9)  # array order (k, j, i)
    block = image[7:7 + 9, 5:5 + 12, 3:3 + 10]  # SimpleITK slices in index order (i, j, k)
    sub = geometry.sub_grid(grid, start, shape)
    ours, itk = sub, geometry.Grid.from_image(block)
    assert ours.size == itk.size and ours.spacing == itk.spacing
    assert ours.direction == itk.direction
    np.testing.assert_allclose(ours.origin, itk.origin, rtol=0, atol=1e-9)
    # the block's voxel p is the grid's voxel start + p
    p = np.array([4.0, 2.0, 6.0, 1.0])
    np.testing.assert_allclose(sub.array_to_physical() @ p,
                               grid.array_to_physical() @ (p + np.append(start, 0.0)), atol=1e-9)


def test_slabs_cover_the_grid_in_whole_slices():
    grid = geometry.Grid.from_image(oblique_image(size=(12, 10, 23)))
    pieces = list(geometry.slabs(grid, voxels=12 * 10 * 4))
    assert [(k0, k1) for k0, k1, _ in pieces] == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20),
                                                  (20, 23)]
    for k0, k1, slab in pieces:
        assert slab == geometry.sub_grid(grid, (k0, 0, 0), (k1 - k0, 10, 12))


def test_the_box_holds_the_body_and_the_margin_and_nothing_else():
    image = body_in_air()
    values = geometry.image_to_tensor(image)
    grid = geometry.Grid.from_image(image)
    start, shape = foreground.box(values, grid, (-1000.0, 700.0))
    body = sitk.GetArrayFromImage(image) > -830.0  # above 10 % of the window
    hits = [np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
            for axis in range(3)]
    margin = int(np.ceil(25.0 / 3.0))
    for axis, n in enumerate(body.shape):
        assert start[axis] == max(0, hits[axis][0] - margin)
        assert start[axis] + shape[axis] == min(n, hits[axis][-1] + 1 + margin)
    assert shape[0] == 40 and shape[1] < 45 and shape[2] < 50  # z whole, y and x cut
    # a body filling the grid, or nothing above the threshold: the whole grid
    whole = ((0, 0, 0), (40, 64, 64))
    assert foreground.box(values, grid, (-1000.0, -990.0)) == whole
    assert foreground.box(torch.full_like(values, -1000.0), grid, (-1000.0, 700.0)) == whole


def test_extend_repeats_the_border_values_like_numpy_edge_padding():
    disp = torch.randn(3, 4, 5, 6)
    full = foreground.extend(disp, (2, 0, 3), (9, 5, 12))
    expected = np.pad(disp.numpy(), ((0, 0), (2, 3), (0, 0), (3, 3)), mode="edge")
    np.testing.assert_array_equal(full.numpy(), expected)
    assert foreground.extend(disp, (0, 0, 0), (4, 5, 6)) is disp


def test_the_affine_is_folded_in_slab_by_slab_as_a_whole_grid_formula_gives(monkeypatch):
    grid = geometry.Grid.from_image(oblique_image(size=(12, 10, 9), angles=(0.2, 0.1, -0.3)))
    disp = torch.randn(3, *grid.shape)
    a = np.eye(4)
    a[:3, :3] += 0.05 * np.random.default_rng(1).normal(size=(3, 3))
    a[:3, 3] = (4.0, -2.0, 7.5)
    # independently: every voxel's LPS point x, then A (x + d(x)) - x in float64
    kji = np.stack(np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij"), 0)
    x = np.einsum("ab,b...->a...", grid.array_to_physical()[:3, :3], kji) \
        + grid.array_to_physical()[:3, 3].reshape(3, 1, 1, 1)
    moved = x + disp.double().numpy()
    expected = np.einsum("ab,b...->a...", a[:3, :3], moved) + a[:3, 3].reshape(3, 1, 1, 1) - x
    monkeypatch.setattr(geometry, "SLAB_VOXELS", 10 * 12 * 2)  # 5 slabs
    out = pipeline_module._include_affine(disp, grid, a)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=2e-5)
    inplace = disp.clone()
    assert pipeline_module._include_affine(inplace, grid, a, inplace=True) is inplace
    np.testing.assert_array_equal(inplace.numpy(), out.numpy())


def test_sampling_slab_by_slab_matches_simpleitk_through_the_field(monkeypatch):
    fixed = oblique_image(size=(20, 18, 11), spacing=(1.5, 1.2, 2.0), angles=(0.1, -0.1, 0.2))
    moving = oblique_image(size=(22, 20, 14), spacing=(1.4, 1.1, 1.8), angles=(0.0, 0.2, -0.1),
                           seed=5)
    fgrid, mgrid = geometry.Grid.from_image(fixed), geometry.Grid.from_image(moving)
    disp = 2.0 * torch.randn(3, *fgrid.shape, dtype=torch.float32)
    monkeypatch.setattr(geometry, "SLAB_VOXELS", 20 * 18 * 3)  # 4 slabs
    ours = pipeline_module._sample_through(geometry.image_to_tensor(moving), mgrid, fgrid, disp)
    tx = sitk.DisplacementFieldTransform(geometry.displacement_to_image(disp, fgrid))
    ref = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0,
                                               sitk.sitkFloat32))
    assert (ref != 0).mean() > 0.3
    assert np.abs(ours.numpy() - ref).max() < 1e-4 * np.abs(ref).max()


@pytest.fixture(scope="module")
def ct_pair():
    return body_in_air(seed=1), body_in_air(shift_mm=(4.0, -3.0, 2.0), seed=2)


def test_registering_on_the_box_agrees_with_the_whole_grid_inside_it(ct_pair):
    fixed, moving = ct_pair
    common = {"device": "cpu", "threads": 2, "initial_alignment": "none"}
    boxed = register(fixed, moving, **common)
    whole = register(fixed, moving, foreground_box=False, **common)
    assert np.prod(boxed.working_size) < 0.6 * np.prod(whole.working_size)
    assert geometry.Grid.from_image(boxed.displacement) == geometry.Grid.from_image(fixed)
    d_box = sitk.GetArrayFromImage(boxed.displacement)
    d_whole = sitk.GetArrayFromImage(whole.displacement)
    body = sitk.GetArrayFromImage(fixed) > -830.0
    moved = np.linalg.norm(d_whole[body], axis=-1)
    gap = np.linalg.norm(d_box[body] - d_whole[body], axis=-1)
    assert moved.mean() > 4.0  # a real deformation (~5.4 mm of shift plus the bump)
    # inside the body the two fields agree: on average to 0.1 mm, voxel by voxel to a quarter of
    # a voxel (3 mm) on average (the level grids lie differently on the box) ...
    assert np.abs(d_box[body].mean(axis=0) - d_whole[body].mean(axis=0)).max() < 0.1
    assert gap.mean() < 0.75
    # ... and the warped images match the fixed image as well
    f = sitk.GetArrayFromImage(fixed)[body]
    e_box, e_whole = (np.abs(sitk.GetArrayFromImage(r.warped)[body] - f).mean()
                      for r in (boxed, whole))
    assert e_box < 1.05 * e_whole
    assert boxed.qa["folding_percent"] == 0.0
    # outside the box the field is its border values: constant along each cut-off axis
    start, shape = foreground.box(geometry.image_to_tensor(fixed),
                                  geometry.Grid.from_image(fixed), (-1000.0, 700.0))
    j1 = start[1] + shape[1]
    assert j1 < d_box.shape[1]
    np.testing.assert_array_equal(d_box[:, j1:], np.repeat(d_box[:, j1 - 1:j1], d_box.shape[1] - j1,
                                                           axis=1))


def test_a_grid_the_foreground_fills_is_registered_exactly_as_before():
    fixed = body_in_air(size=(32, 24, 16), spacing=(3.0, 3.5, 5.0), seed=3)
    moving = body_in_air(shift_mm=(3.0, 0.0, 0.0), size=(32, 24, 16), spacing=(3.0, 3.5, 5.0),
                         seed=4)
    common = {"device": "cpu", "threads": 2, "initial_alignment": "none", "preset": "fast"}
    a = register(fixed, moving, **common)
    b = register(fixed, moving, foreground_box=False, **common)
    assert a.working_size == b.working_size
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a.displacement),
                                  sitk.GetArrayFromImage(b.displacement))


def test_a_level_image_smoothed_on_its_block_equals_the_whole_image_smoothed():
    from EOIRRegistrationLib.engine import optimise
    image = oblique_image(size=(40, 36, 30), spacing=(1.0, 1.2, 1.5), angles=(0.1, 0.0, -0.1))
    values = geometry.image_to_tensor(image)
    source = geometry.Grid.from_image(image)
    # a level on part of the image, read through a rotation: only a block of it is smoothed
    part = geometry.sub_grid(source, (8, 10, 12), (12, 14, 16))
    a = np.eye(4)
    a[:3, :3] = np.asarray(sitk.VersorTransform((0.0, 0.0, 1.0), 0.2).GetMatrix()).reshape(3, 3)
    a[:3, 3] = part.center() - a[:3, :3] @ part.center()
    for scale in (4.0, 2.0):
        level = optimise.level_grid(part, scale)
        sigma = [0.5 * np.sqrt(max(scale ** 2 - s ** 2, 0.0)) / s for s in reversed(source.spacing)]
        whole = geometry.sample_through_like_itk(filters.gaussian(values, sigma), source, level, a)
        ours = optimise.image_at(values, source, level, scale, affine=a)
        assert (whole != 0).float().mean() > 0.9
        torch.testing.assert_close(ours, whole, rtol=0, atol=1e-5)


def test_a_level_too_large_is_made_coarser_and_the_result_says_so():
    from EOIRRegistrationLib.engine import optimise
    from EOIRRegistrationLib.engine.result import RegistrationResult
    ct = geometry.Grid((512, 386, 320), (0.7, 0.7, 1.0), (0.0, 0.0, 0.0),
                       tuple(np.eye(3).ravel()))
    finest = optimise.level_grid(ct, 1.0)
    assert np.prod(finest.size) <= optimise.MAX_LEVEL_VOXELS
    assert np.prod(finest.size) > 0.9 * optimise.MAX_LEVEL_VOXELS
    assert len(set(finest.spacing)) == 1 and 1.5 < finest.spacing[0] < 1.7
    assert optimise.level_grid(ct, 2.0).spacing == (2.0, 2.0, 2.0)  # small enough: as asked
    brain = geometry.Grid((150, 160, 200), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                          tuple(np.eye(3).ravel()))
    assert optimise.level_grid(brain, 1.0) == brain
    refinement = {"similarity": "lncc", "preset": "default", "scales_mm": [4.0, 2.0, 1.0],
                  "iterations": [20, 10, 3], "finest_grid_mm": list(finest.spacing)}
    result = RegistrationResult(None, None, None, None, None, qa={}, options=None,
                                refinement=refinement)
    assert result.method.endswith(f"the finest level at {finest.spacing[0]:.2g} mm (its size "
                                  "limit)")
