"""The multi-scale optimisation's parts (engine/optimise.py, filters.py, similarity.py) against
independent computations."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import oblique_image

from EOIRRegistrationLib.core import geometry, losses, spatial
from EOIRRegistrationLib.engine import filters, optimise, similarity


def test_box_mean_is_a_replicate_padded_average_pool():
    x = torch.rand(1, 2, 9, 7, 6, dtype=torch.float64)
    before = x.clone()
    ref = F.avg_pool3d(F.pad(x, [2] * 6, mode="replicate"), 5, stride=1)
    torch.testing.assert_close(filters.box_mean(x, 5), ref)
    assert torch.equal(x, before)


@pytest.mark.parametrize("window", [3, 5, 7])
@pytest.mark.parametrize("shape", [(11, 9, 8), (4, 9, 8), (1, 2, 8)])
def test_box_sums_from_pairs_are_replicate_padded_window_sums(window, shape):
    """Along each axis, long ones and ones too short for the window's interior."""
    x = torch.rand(1, 3, *shape, dtype=torch.float64)
    before = x.clone()
    r = window // 2
    for axis in range(3):
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        kernel = [window if a == axis else 1 for a in range(3)]
        ref = F.avg_pool3d(F.pad(x, pad, mode="replicate"), kernel, stride=1) * window
        out = filters.box_sum_axis(x, window, axis, torch.empty_like(x), torch.empty_like(x))
        torch.testing.assert_close(out, ref)
        assert torch.equal(x, before)


def test_gaussian_matches_a_separable_convolution_per_axis():
    x = torch.rand(1, 1, 12, 10, 9, dtype=torch.float64)
    sigmas = (1.0, 0.0, 2.0)  # array order; 0 skips the axis
    out = filters.gaussian(x, sigmas)
    ref = x.numpy()[0, 0]
    for axis, sigma in enumerate(sigmas):
        if sigma == 0:
            continue
        r = int(np.ceil(2 * sigma))
        w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
        w /= w.sum()
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        padded = np.pad(ref, pad, mode="edge")
        ref = sum(w[k] * np.take(padded, range(k, k + ref.shape[axis]), axis=axis)
                  for k in range(2 * r + 1))
    np.testing.assert_allclose(out[0, 0].numpy(), ref, rtol=0, atol=1e-12)
    assert torch.equal(filters.gaussian(x, 0.0), x)
    const = torch.full((1, 3, 6, 6, 6), 2.5)
    torch.testing.assert_close(filters.gaussian(const, 1.3), const)


@pytest.mark.parametrize("shape", [(12, 10, 9), (12, 2, 9), (1, 10, 9)])
def test_the_step_loops_buffered_filters_give_the_allocating_ones_values(shape):
    """The optimisation's steps smooth and compose into reused buffers: the same values as
    ``gaussian`` and ``_compose_first_order`` without them, axes shorter than the kernel
    included; the buffers handed back are the two given."""
    torch.manual_seed(3)
    x = torch.rand(1, 3, *shape, dtype=torch.float64)
    for sigma in (0.5, 1.0, 2.0, 0.0):
        a, b = x.clone(), torch.empty_like(x)
        smoothed, free = filters.gaussian_into(a, sigma, b)
        assert torch.equal(smoothed, filters.gaussian(x, sigma))
        assert {id(smoothed), id(free)} == {id(a), id(b)}
    step = 0.1 * torch.rand_like(x)
    out = torch.empty_like(x)
    assert optimise._compose_first_order(x, step, out=out) is out
    torch.testing.assert_close(out, optimise._compose_first_order(x, step), rtol=0, atol=1e-15)


def test_lncc_force_raises_the_similarity_it_approximates():
    """A small step of the warped image along the closed-form force raises the mean LNCC (as
    computed independently by core.losses), and the force vanishes for a perfect match."""
    torch.manual_seed(0)
    fixed = filters.gaussian(torch.rand(1, 1, 16, 16, 16, dtype=torch.float64), 1.0)
    warped = fixed + 0.3 * filters.gaussian(torch.rand_like(fixed), 1.0)
    force = similarity.LNCC(fixed, 5).force(warped)
    before = -float(losses.lncc_loss(fixed, warped, window=5))
    after = -float(losses.lncc_loss(fixed, warped + 1e-3 * force / force.abs().max(), window=5))
    assert after > before
    force_same = similarity.LNCC(fixed, 5).force(fixed)
    assert float(force_same.norm()) < 0.05 * float(force.norm())
    assert -float(losses.lncc_loss(fixed, fixed, window=5)) > before


def test_level_grids_share_the_fixed_frame_and_end_on_the_fixed_grid():
    image = oblique_image(size=(30, 24, 20), spacing=(1.0, 1.2, 2.5))
    fixed = geometry.Grid.from_image(image)
    assert optimise.level_grid(fixed, 1.0) == fixed  # no axis coarser than 1 mm: the grid itself
    coarse = optimise.level_grid(fixed, 2.0)
    assert coarse.spacing == (2.0, 2.0, 2.5)  # never finer than the image's own 2.5 mm
    assert coarse.direction == fixed.direction
    np.testing.assert_allclose(coarse.center(), fixed.center(), atol=1e-9)


def test_a_constant_field_moves_between_grids_unchanged():
    image = oblique_image(size=(20, 18, 16), spacing=(1.0, 1.5, 2.0))
    fine = geometry.Grid.from_image(image)
    coarse = optimise.level_grid(fine, 4.0)
    d = torch.tensor([1.5, -2.0, 0.25]).view(1, 3, 1, 1, 1).expand(1, 3, *coarse.shape)
    moved = optimise.move_field(d.clone(), coarse, fine)
    torch.testing.assert_close(moved, d[:, :, :1, :1, :1].expand(1, 3, *fine.shape))
    u = optimise.to_voxels(moved, fine)
    torch.testing.assert_close(optimise.to_mm(u, fine), moved, atol=1e-5, rtol=0)


def test_schedules_and_presets():
    assert set(optimise.PRESETS) == {"fast", "default", "accurate"}
    for schedule in optimise.PRESETS.values():
        assert list(schedule.scales_mm) == sorted(schedule.scales_mm, reverse=True)
        assert len(schedule.scales_mm) == len(schedule.iterations)
    changed = optimise.schedule_of("default", 7)
    assert changed.iterations[-1] == 7
    assert changed.iterations[:-1] == optimise.PRESETS["default"].iterations[:-1]
    assert optimise.schedule_of("fast") is optimise.PRESETS["fast"]


def _shifted_pair():
    image = oblique_image(size=(24, 24, 24), spacing=(2.0, 2.0, 2.0), seed=4)
    grid = geometry.Grid.from_image(image)
    values = geometry.image_to_tensor(image)
    shift = np.eye(4)
    shift[:3, 3] = (2.0, -1.0, 1.0)  # moving(x) = fixed(x + t)
    fixed_at = lambda g, s: optimise.image_at(values, grid, g, s)  # noqa: E731
    moving_at = lambda g, s: optimise.image_at(values, grid, g, s, shift)  # noqa: E731
    return grid, fixed_at, moving_at


def test_optimise_recovers_a_shift_and_reports_each_level():
    grid, fixed_at, moving_at = _shifted_pair()
    timings, fractions = {}, []
    d = optimise.optimise(fixed_at, moving_at, grid, optimise.PRESETS["default"],
                          progress=fractions.append, timings=timings)
    assert d.shape == (3, *grid.shape)
    inner = d[:, 6:-6, 6:-6, 6:-6].reshape(3, -1).mean(dim=1)
    # moving(x + d) = fixed(x) needs fixed(x + d + t) = fixed(x): d = -t (LPS mm)
    torch.testing.assert_close(inner, torch.tensor([-2.0, 1.0, -1.0]), atol=0.35, rtol=0)
    # one entry per scale (the 2 mm image's "1 mm" level is its own grid again)
    assert set(timings) == {"optimising 4 mm", "optimising 2 mm", "optimising 1 mm"}
    assert fractions and fractions[-1] == pytest.approx(1.0) and fractions == sorted(fractions)


def test_optimise_stops_on_cancel_and_on_its_time_budget():
    grid, fixed_at, moving_at = _shifted_pair()
    cancel = threading.Event()
    cancel.set()
    d = optimise.optimise(fixed_at, moving_at, grid, optimise.PRESETS["accurate"], cancel=cancel)
    assert float(d.abs().max()) == 0  # no step taken
    steps = []
    optimise.optimise(fixed_at, moving_at, grid, optimise.PRESETS["accurate"], time_budget_s=0.0,
                      progress=steps.append)
    assert steps == []


def test_first_order_composition_is_close_to_the_true_composition_for_small_steps():
    """u(p) = a sin(2 pi p_k / L) along array axis k, a uniform step s along k: the true
    ``s + u(p + s)`` is known in closed form; the first-order composition's error is second
    order in s, well below the error of adding the step without composing."""
    shape, length, a, s = (24, 20, 18), 12.0, 2.0, 0.3
    k = torch.arange(shape[0], dtype=torch.float64).view(-1, 1, 1).expand(shape)
    u = torch.zeros(1, 3, *shape, dtype=torch.float64)
    u[0, 1] = a * torch.sin(2 * torch.pi * k / length)
    step = torch.zeros_like(u)
    step[0, 0] = s
    truth = step.clone()
    truth[0, 1] = a * torch.sin(2 * torch.pi * (k + s) / length)
    inner = (slice(None), slice(None), slice(2, -2))
    first = (optimise._compose_first_order(u, step) - truth)[inner].abs().max()
    additive = (u + step - truth)[inner].abs().max()
    assert first < 0.1 * additive, (float(first), float(additive))


@pytest.mark.parametrize("scales", [(4.0, 2.0), (4.0, 1.0), (2.0, 1.0)])
def test_moving_a_field_between_levels_matches_3d_sampling(scales):
    """The separable interpolation between pyramid levels gives ``spatial.sample``'s trilinear
    values with border padding, on an oblique anisotropic grid."""
    fine = geometry.Grid.from_image(oblique_image(size=(30, 26, 18), spacing=(0.9, 1.3, 2.1)))
    source, target = (optimise.level_grid(fine, s) for s in scales)
    assert source != target
    torch.manual_seed(1)
    d = torch.randn(1, 3, *source.shape, dtype=torch.float64)
    reference = spatial.sample(d, geometry.array_coords_of(target, source),
                                        mode="linear", padding="border")
    # array_coords_of gives float32 coordinates: round-off of some 1e-6 voxel in the reference
    torch.testing.assert_close(optimise.move_field(d, source, target), reference,
                               atol=1e-5, rtol=0)


def test_gradient_times_a_factor_is_the_product_of_both():
    torch.manual_seed(2)
    image, factor = torch.rand(1, 1, 9, 8, 7), torch.rand(1, 1, 9, 8, 7)
    plain = similarity.gradient_times(image)
    reference = torch.zeros(1, 3, 9, 8, 7)
    reference[0, 0, 1:-1] = 0.5 * (image[0, 0, 2:] - image[0, 0, :-2])
    reference[0, 1, :, 1:-1] = 0.5 * (image[0, 0, :, 2:] - image[0, 0, :, :-2])
    reference[0, 2, :, :, 1:-1] = 0.5 * (image[0, 0, :, :, 2:] - image[0, 0, :, :, :-2])
    torch.testing.assert_close(plain, reference)
    torch.testing.assert_close(similarity.gradient_times(image, factor), reference * factor)


def test_mind_gradient_is_a_descent_direction_of_the_descriptor_difference():
    """Two contrasts (one image inverted and shifted): a small step of the field against the
    closed-form MIND-SSC gradient lowers the mean squared descriptor difference, as computed by
    warping the descriptors with core.spatial (not the optimiser's warper)."""
    torch.manual_seed(5)
    fixed = filters.gaussian(torch.rand(1, 1, 20, 18, 16, dtype=torch.float64), 1.5)
    moving = 1.0 - torch.roll(fixed, shifts=(1, -1), dims=(2, 4))  # inverted contrast, shifted
    term = similarity.MINDTerm(fixed, moving)
    u = torch.zeros(1, 3, *fixed.shape[2:], dtype=torch.float64)
    warper = optimise._Warper(fixed.shape[2:], torch.device("cpu"))
    warper.set_field(u)
    g = term.gradient(warper)

    def energy(field):
        warped = spatial.warp(term.moving_d, field, padding="border")
        return float(((warped - term.fixed_d) ** 2).mean())
    assert energy(u - 0.2 * g / g.abs().max()) < energy(u)


def test_mind_schedule_recovers_a_shift_between_two_contrasts():
    grid, fixed_at, moving_at = _shifted_pair()
    inverted = lambda g, s: 1.0 - moving_at(g, s)  # noqa: E731
    d = optimise.optimise(fixed_at, inverted, grid, optimise.schedule_of("default", similarity="mind"))
    inner = d[:, 6:-6, 6:-6, 6:-6].reshape(3, -1).mean(dim=1)
    torch.testing.assert_close(inner, torch.tensor([-2.0, 1.0, -1.0]), atol=0.5, rtol=0)


def test_the_warper_samples_where_core_spatial_warp_does():
    """The optimiser's warper builds its grid from per-axis lines plus the field: the same
    values as ``spatial.warp`` (which builds it from the identity grid), one-voxel axes too."""
    torch.manual_seed(4)
    for shape in [(14, 11, 9), (1, 8, 6)]:
        u = 2.0 * torch.randn(1, 3, *shape, dtype=torch.float64)
        image = torch.rand(1, 2, *shape, dtype=torch.float64)
        warper = optimise._Warper(shape, torch.device("cpu"))
        warper.set_field(u)
        for padding in ("zeros", "border"):
            torch.testing.assert_close(warper(image, padding=padding),
                                       spatial.warp(image, u, padding=padding))
