"""Spatial core: identity, shifts, integration, composition and upsampling against closed forms."""
import math

import pytest
import torch
import torch.nn.functional as F

from EOIRRegistrationLib.core import spatial


def linear_field(shape, a, t):
    """u(p) = A p + t on a grid (array-order voxel coordinates), shape (1, n, *S)."""
    p = spatial.identity_grid(shape, dtype=torch.float64)
    a = torch.as_tensor(a, dtype=torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64).view(-1, *([1] * len(shape)))
    return (torch.einsum("ab,b...->a...", a, p) + t)[None]


@pytest.mark.parametrize("shape", [(7, 9), (6, 7, 8)])
def test_zero_displacement_returns_the_input(shape):
    # Equal up to the round-off of the voxel -> [-1, 1] -> voxel round trip inside grid_sample.
    img = torch.rand(2, 3, *shape, dtype=torch.float64)
    zero = torch.zeros(2, len(shape), *shape, dtype=torch.float64)
    assert torch.allclose(spatial.warp(img, zero), img, rtol=0, atol=1e-12)
    assert torch.equal(spatial.warp(img, zero, mode="nearest"), img)


def test_integer_shift_moves_a_shape_by_exactly_that_many_voxels():
    img = torch.zeros(1, 1, 12, 12, 12, dtype=torch.float64)
    img[0, 0, 4:7, 3:6, 5:9] = 1.0
    u = torch.zeros(1, 3, 12, 12, 12, dtype=torch.float64)
    u[:, 0], u[:, 2] = 2.0, -1.0  # out(p) = img(p + (2, 0, -1))
    out = spatial.warp(img, u)
    expected = torch.zeros_like(img)
    expected[0, 0, 2:5, 3:6, 6:10] = 1.0
    assert torch.allclose(out, expected, atol=1e-12)


def test_half_voxel_shift_interpolates_linearly_along_the_right_axis():
    ramp = torch.arange(10, dtype=torch.float64).view(1, 1, 1, 1, 10).expand(1, 1, 4, 5, 10)
    u = torch.zeros(1, 3, 4, 5, 10, dtype=torch.float64)
    u[:, 2] = 0.5  # along the last array axis (ITK x)
    out = spatial.warp(ramp.contiguous(), u, padding="border")
    assert torch.allclose(out[..., :-1], ramp[..., :-1] + 0.5)


def test_normalized_coordinates_follow_align_corners_true_and_reverse_axes():
    coords = torch.tensor([0.0, 4.0, 9.0], dtype=torch.float64).view(1, 3, 1, 1, 1)
    grid = spatial.voxel_to_normalized(coords, (5, 9, 10))
    assert torch.allclose(grid.flatten(), torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))


def test_integrating_a_constant_velocity_gives_the_same_translation():
    v = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float64)
    v[:, 0], v[:, 1], v[:, 2] = 1.5, -0.7, 0.3
    assert torch.allclose(spatial.integrate_velocity(v, 7), v, atol=1e-12)


def test_integrating_a_linear_velocity_matches_the_matrix_exponential():
    shape = (24, 24, 24)
    a = torch.tensor([[0.02, 0.03, 0.0], [-0.03, 0.01, 0.02], [0.0, -0.02, -0.01]],
                     dtype=torch.float64)
    centre = torch.full((3,), 11.5, dtype=torch.float64)
    v = linear_field(shape, a, -a @ centre)  # v(p) = A (p - c)
    u = spatial.integrate_velocity(v, 8)
    expected = linear_field(shape, torch.linalg.matrix_exp(a) - torch.eye(3, dtype=torch.float64),
                            -(torch.linalg.matrix_exp(a) - torch.eye(3, dtype=torch.float64)) @ centre)
    interior = (slice(None), slice(None), slice(6, 18), slice(6, 18), slice(6, 18))
    assert torch.allclose(u[interior], expected[interior], atol=2e-3)


def test_composition_of_affine_maps_is_the_matrix_product():
    shape = (16, 16, 16)
    a1 = torch.tensor([[0.05, 0.01, 0.0], [0.0, -0.03, 0.02], [0.01, 0.0, 0.04]], dtype=torch.float64)
    a2 = torch.tensor([[-0.02, 0.0, 0.03], [0.01, 0.02, 0.0], [0.0, 0.01, -0.01]], dtype=torch.float64)
    t1, t2 = torch.tensor([0.5, -0.3, 0.2]), torch.tensor([-0.4, 0.1, 0.6])
    inner, outer = linear_field(shape, a1, t1), linear_field(shape, a2, t2)
    eye = torch.eye(3, dtype=torch.float64)
    # phi_outer(phi_inner(p)) = (I + A2)((I + A1) p + t1) + t2
    m = (eye + a2) @ (eye + a1) - eye
    t = (eye + a2) @ t1.double() + t2.double()
    expected = linear_field(shape, m, t)
    got = spatial.compose(outer, inner)
    interior = (slice(None), slice(None), slice(2, 14), slice(2, 14), slice(2, 14))
    assert torch.allclose(got[interior], expected[interior], atol=1e-10)


def test_composing_translations_adds_them():
    a = torch.zeros(1, 2, 9, 9, dtype=torch.float64)
    b = torch.zeros_like(a)
    a[:, 0], b[:, 1] = 1.25, -2.0
    assert torch.allclose(spatial.compose(a, b), a + b)


def test_upsampling_keeps_voxel_units_on_cell_centred_grids():
    fine_shape = (16, 16, 16)
    # A linear map in fine voxels; on the coarse grid voxel j sits at fine 2j + 0.5.
    a = torch.tensor([[0.1, 0.0, 0.05], [0.0, -0.1, 0.0], [0.02, 0.0, 0.1]], dtype=torch.float64)
    t = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    coarse_p = spatial.identity_grid((8, 8, 8), dtype=torch.float64) * 2 + 0.5
    coarse = ((torch.einsum("ab,b...->a...", a, coarse_p) + t.view(3, 1, 1, 1)) / 2)[None]
    up = spatial.upsample_displacement(coarse, 2)
    expected = linear_field(fine_shape, a, t)
    interior = (slice(None), slice(None), slice(1, 15), slice(1, 15), slice(1, 15))
    assert torch.allclose(up[interior], expected[interior], atol=1e-10)


def test_in_plane_upsampling_leaves_the_slice_axis_alone():
    u = torch.ones(1, 3, 4, 5, 6)
    up = spatial.upsample_displacement(u, (1, 2, 2))
    assert up.shape == (1, 3, 4, 10, 12)
    assert torch.allclose(up[:, 0], torch.ones(1, 4, 10, 12))
    assert torch.allclose(up[:, 1], torch.full((1, 4, 10, 12), 2.0))


def test_gaussian_blur_keeps_constants_and_mass_and_downsample_halves():
    x = torch.full((1, 2, 10, 12, 14), 3.0)
    assert torch.allclose(spatial.gaussian_blur(x, 1.0), x)
    delta = torch.zeros(1, 1, 21, 21)
    delta[0, 0, 10, 10] = 1.0
    blurred = spatial.gaussian_blur(delta, 1.5)
    assert math.isclose(float(blurred.sum()), 1.0, rel_tol=1e-5)
    assert blurred.max() < 0.1
    assert spatial.downsample(x, axes=(1, 2)).shape == (1, 2, 10, 6, 7)


def test_spatial_gradient_of_a_linear_field_is_its_matrix():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    u = linear_field((5, 6, 7), a, torch.zeros(3))
    g = spatial.spatial_gradient(u)  # (1, 3, 3, *S)
    assert torch.allclose(g[0, :, :, 2, 3, 3], a)
    assert torch.allclose(g[0, :, :, 0, 0, 0], a)  # one-sided at the border is still exact


@pytest.mark.parametrize("bad", [torch.zeros(1, 2, 4, 4, 4), torch.zeros(3, 4, 4)])
def test_bad_field_shapes_are_refused_with_a_message(bad):
    with pytest.raises(ValueError, match="displacement must have shape"):
        spatial.compose(bad, bad)


@pytest.mark.parametrize("shape, channels", [((65, 40, 29), 1), ((48, 40, 36), 3), ((257, 257), 2)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_grid_sample_split_over_threads_gives_the_single_calls_values(shape, channels, mode,
                                                                      padding):
    """Above SPLIT_SAMPLE_POINTS, the CPU sampler splits the points into one batch entry per
    thread (also an uneven split: 65 rows on 2 threads); the values must equal one call's."""
    torch.manual_seed(3)
    image = torch.rand(1, channels, *shape)
    grid = torch.rand(1, *shape, len(shape)) * 2.4 - 1.2  # some points outside
    assert grid[0, ..., 0].numel() >= spatial.SPLIT_SAMPLE_POINTS
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        split = spatial.grid_sample(image, grid, mode, padding)
    finally:
        torch.set_num_threads(threads)
    single = F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)
    assert torch.equal(split, single)
