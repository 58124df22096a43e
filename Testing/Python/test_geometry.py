"""Physical geometry: torch resampling against SimpleITK on oblique, anisotropic grids."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import oblique_image, rotation

from EOIRRegistrationLib.core import geometry


@pytest.fixture
def pair():
    moving = oblique_image(seed=1)
    fixed = oblique_image(size=(30, 26, 18), spacing=(0.8, 1.1, 1.7), origin=(-12.0, 2.0, 0.0),
                          angles=(-0.15, 0.25, 0.05), seed=2)
    return fixed, moving


def test_array_to_physical_matches_itk_index_to_point():
    img = oblique_image()
    grid = geometry.Grid.from_image(img)
    m = grid.array_to_physical()
    for idx in [(0, 0, 0), (3, 7, 11), (27, 23, 19)]:
        expected = img.TransformContinuousIndexToPhysicalPoint([float(i) for i in idx])
        got = m @ np.array([idx[2], idx[1], idx[0], 1.0])
        assert np.allclose(got[:3], expected, atol=1e-10)


@pytest.mark.parametrize("mode,itk_mode", [("linear", sitk.sitkLinear),
                                           ("nearest", sitk.sitkNearestNeighbor)])
def test_resampling_through_a_displacement_matches_simpleitk(pair, mode, itk_mode):
    fixed, moving = pair
    fg, mg = geometry.Grid.from_image(fixed), geometry.Grid.from_image(moving)
    d = torch.randn(3, *fg.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    d = d * 2.0
    got = geometry.sample_through_like_itk(geometry.image_to_tensor(moving, torch.float64), mg,
                                           fg, displacement=d, mode=mode)[0, 0].numpy()
    tx = sitk.DisplacementFieldTransform(geometry.displacement_to_image(d, fg))
    ref = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, itk_mode, 0.0, sitk.sitkFloat64))
    assert (ref != 0).mean() > 0.3  # the grids really overlap
    if mode == "linear":
        assert np.abs(got - ref).max() < 1e-9
    else:  # ties at exactly .5 may round differently; none expected with random offsets
        assert np.mean(got != ref) < 1e-3


def test_resampling_through_an_affine_matches_simpleitk(pair):
    fixed, moving = pair
    fg, mg = geometry.Grid.from_image(fixed), geometry.Grid.from_image(moving)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(np.asarray(rotation(0.1, 0.05, -0.08)).ravel() * 1.05)
    affine.SetTranslation((1.5, -2.0, 0.7))
    affine.SetCenter((0.0, 5.0, 8.0))
    a = np.eye(4)
    a[:3, :3] = np.reshape(affine.GetMatrix(), (3, 3))
    c = np.asarray(affine.GetCenter())
    a[:3, 3] = np.asarray(affine.GetTranslation()) + c - a[:3, :3] @ c
    ref = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0,
                                               sitk.sitkFloat64))
    fast = geometry.sample_through_like_itk(geometry.image_to_tensor(moving, torch.float64), mg,
                                            fg, affine=a)[0, 0].numpy()
    assert np.abs(fast - ref).max() < 1e-4  # float32 coordinates
    # a block of the moving image (its first voxel at ``start``) read with the whole image's
    # coordinates: the whole image's values wherever the interpolation stays inside the block
    values = geometry.image_to_tensor(moving, torch.float64)
    corners = geometry.corner_coords(fg, mg, a)
    assert torch.allclose(corners.double(), geometry.array_coords_of(fg, mg, affine=a)[
        :, :, [0, -1]][:, :, :, [0, -1]][..., [0, -1]].double(), atol=1e-4)
    start = (2, 3, 1)
    block = values[:, :, 2:, 3:, 1:]
    part = geometry.sample_through_like_itk(block, mg, fg, affine=a, start=start,
                                            full_shape=tuple(values.shape[2:]))[0, 0].numpy()
    coords = geometry.array_coords_of(fg, mg, affine=a)[0].numpy()
    within = np.all([coords[k] >= start[k] for k in range(3)], axis=0)
    assert within.mean() > 0.3
    assert np.abs(part - ref)[within].max() < 1e-4


def test_working_grid_shares_frame_and_centre_and_is_padded():
    img = oblique_image(size=(50, 37, 21), spacing=(0.9, 0.9, 3.0))
    ref = geometry.Grid.from_image(img)
    wg = geometry.working_grid(ref, (2.0, 2.0, 2.0), multiple=16)
    assert wg.direction == ref.direction
    assert np.allclose(wg.center(), ref.center(), atol=1e-9)
    assert all(s % 16 == 0 for s in wg.size)
    extent = np.asarray(ref.size) * np.asarray(ref.spacing)
    assert np.all(np.asarray(wg.size) * 2.0 >= extent - 1e-6)
    with pytest.raises(ValueError, match="working spacing"):
        geometry.working_grid(ref, (2.0, 0.0, 2.0))


def test_displacement_image_round_trip_keeps_values_and_geometry():
    img = oblique_image()
    grid = geometry.Grid.from_image(img)
    d = torch.randn(3, *grid.shape, dtype=torch.float64)
    back, back_grid = geometry.displacement_from_image(geometry.displacement_to_image(d, grid))
    assert torch.equal(back, d)
    assert back_grid == grid


def test_arrays_taken_from_images_do_not_alias_their_buffers():
    """A tensor or slice that shared an image's buffer would read freed memory once the image
    (often a temporary) is gone; the overview's moving slice did, and showed garbage."""
    from EOIRRegistrationLib.cli import overview

    img = sitk.GetImageFromArray(np.arange(24, dtype=np.float64).reshape(2, 3, 4))
    t = geometry.image_to_tensor(img, torch.float64)
    t += 100.0
    assert sitk.GetArrayViewFromImage(img)[0, 0, 0] == 0.0  # the image is untouched
    # The overview's display slice: the middle slice k = 1 seen from above (column 0 = i 0).
    grid = sitk.Image([4, 3, 1], sitk.sitkUInt8)
    grid.SetOrigin((0.0, 0.0, 1.0))
    s = overview.view_slice(img, grid)
    assert s.base is None and s.flags.owndata
    np.testing.assert_array_equal(s, np.arange(12, 24).reshape(3, 4))
