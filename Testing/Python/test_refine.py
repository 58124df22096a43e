"""Instance optimisation (engine/refine.py): LNCC for one contrast, MIND-SSC for two."""

import numpy as np
import pytest
import torch

from EOIRRegistrationLib.core import geometry, metrics, qa, spatial
from EOIRRegistrationLib.engine.refine import SAMPLE_FRACTION, RefineConfig, refine_displacement
from EOIRRegistrationLib.training.phantom import make_phantom_pair


@pytest.fixture(scope="module")
def cross_contrast_pair():
    """A deformed phantom pair; the moving image is re-rendered with another random intensity
    per label (a different 'modality'), lightly blurred."""
    pair = make_phantom_pair(seed=3, shape=(40, 40, 40), spacing=(2.0, 2.0, 2.0),
                             rotation=(0, 0, 0), velocity=3.0)
    fixed = geometry.image_to_tensor(pair.fixed).float()
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    fixed_labels = geometry.image_to_tensor(pair.fixed_labels).long()
    moving_labels = geometry.image_to_tensor(pair.moving_labels).long()
    lut = torch.rand(int(moving_labels.max()) + 1, generator=torch.Generator().manual_seed(1))
    moving = spatial.gaussian_blur(lut[moving_labels].float(), 0.7)
    return fixed, moving, fixed_labels, moving_labels


def _dice(u, fixed_labels, moving_labels):
    warped = spatial.warp(moving_labels.float(), u, mode="nearest").long()
    values = [int(v) for v in torch.unique(fixed_labels) if v != 0]
    d = qa.dice(fixed_labels[0, 0].numpy(), warped[0, 0].numpy(), values)
    return float(np.nanmean(list(d.values())))


def test_mind_refinement_aligns_two_contrasts_without_folding(cross_contrast_pair):
    fixed, moving, fl, ml = cross_contrast_pair
    before = _dice(torch.zeros(1, 3, *fixed.shape[2:]), fl, ml)
    u = refine_displacement(fixed, moving, None, RefineConfig(iterations=60, similarity="mind"))
    after = _dice(u, fl, ml)
    assert after > before + 0.05, (before, after)
    det = metrics.jacobian_determinant_voxel(u)
    assert qa.folding_fraction(det) == 0.0


def test_refinement_starts_from_the_given_displacement_and_refuses_unknown_similarities(
        cross_contrast_pair):
    fixed, moving, fl, ml = cross_contrast_pair
    start = torch.zeros(1, 3, *fixed.shape[2:])
    start[:, 0] = 1.5
    same = refine_displacement(fixed, moving, start, RefineConfig(iterations=0))
    assert torch.allclose(same, start, atol=1e-5)  # zero iterations: exactly the start
    with pytest.raises(ValueError, match="unknown refinement similarity"):
        refine_displacement(fixed, moving, None, RefineConfig(iterations=1, similarity="mi"))


def test_refinement_continues_from_a_partial_start_towards_the_truth():
    """Moving = fixed shifted by t voxels (array axis 0); starting from half of the true
    displacement, refinement must end closer to the truth than it started (checks that the
    pre-warped moving image and the final composition use the same order)."""
    pair = make_phantom_pair(seed=9, shape=(40, 40, 40), spacing=(2.0, 2.0, 2.0),
                             rotation=(0, 0, 0), velocity=0.0)
    fixed = geometry.image_to_tensor(pair.fixed).float()
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    t = 3.0
    # warped(p) = moving(p + u(p)): with moving(y) = fixed(y - t e0), the truth is u = +t e0.
    shift = torch.zeros(1, 3, *fixed.shape[2:])
    shift[:, 0] = -t
    moving = spatial.warp(fixed, shift)
    start = torch.zeros_like(shift)
    start[:, 0] = t / 2
    u = refine_displacement(fixed, moving, start, RefineConfig(iterations=60))
    inside = geometry.image_to_tensor(pair.fixed_labels)[0, 0] > 0
    err_start = (start[0, 0][inside] - t).abs().mean()
    err_end = (u[0, 0][inside] - t).abs().mean()
    assert err_end < 0.5 * err_start, (float(err_start), float(err_end))
    assert u[0, 1:][:, inside].abs().mean() < 0.3  # no motion invented across


def test_the_default_refinement_improves_a_deformed_pair_in_a_few_steps():
    """The engine's default (10 steps, decaying learning rate) must already pay off on its own:
    LNCC on one contrast, deformed phantom, no network start."""
    pair = make_phantom_pair(seed=5, shape=(40, 40, 40), spacing=(2.0, 2.0, 2.0),
                             rotation=(0, 0, 0), velocity=3.0)
    fixed, moving = (geometry.image_to_tensor(im).float() for im in (pair.fixed, pair.moving))
    fixed, moving = ((x - x.min()) / (x.max() - x.min()) for x in (fixed, moving))
    fl, ml = (geometry.image_to_tensor(im).long() for im in (pair.fixed_labels, pair.moving_labels))
    before = _dice(torch.zeros(1, 3, *fixed.shape[2:]), fl, ml)
    u = refine_displacement(fixed, moving, None, RefineConfig())
    assert RefineConfig().resolved().iterations == 10
    assert _dice(u, fl, ml) > before + 0.15, (before, _dice(u, fl, ml))  # measured 0.46 -> 0.73
    assert qa.folding_fraction(metrics.jacobian_determinant_voxel(u)) == 0.0


def test_the_written_out_adam_matches_torch_optim_adam():
    from EOIRRegistrationLib.engine.refine import Adam

    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 3, 4, generator=g)
    ours = torch.zeros(2, 3, 4, requires_grad=True)
    ref = torch.zeros(2, 3, 4, requires_grad=True)
    opt_ours, opt_ref = Adam(ours), torch.optim.Adam([ref], lr=0.1)
    for lr in (0.1, 0.3, 0.05, 0.2, 0.1):
        for p in (ours, ref):
            p.grad = None
            ((p - target) ** 4).sum().backward()
        opt_ours.step(lr)
        opt_ref.param_groups[0]["lr"] = lr
        opt_ref.step()
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    assert (ours - target).abs().mean() < target.abs().mean()  # it did move towards the target


def test_the_residual_at_points_matches_the_dense_residual_there():
    from EOIRRegistrationLib.engine.refine import _residual_at
    shape = (13, 10, 9)  # coarse grid 6 x 5 x 4: unequal, non-integer ratios
    v = torch.randn(1, 3, 6, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = spatial.resize_displacement(spatial.integrate_velocity(v, 5), shape)
    points = spatial.identity_grid(shape, dtype=torch.float64).view(3, -1)[:, ::7]
    at = _residual_at(v, points, shape, 5)
    expected = dense.view(1, 3, -1)[:, :, ::7]
    assert torch.allclose(at, expected, atol=1e-10)


def test_sampled_mind_refinement_is_reproducible_and_as_good_as_the_dense_one(
        cross_contrast_pair):
    fixed, moving, fl, ml = cross_contrast_pair
    dense = refine_displacement(fixed, moving, None,
                                RefineConfig(iterations=60, similarity="mind", sample_fraction=1))
    cfg = RefineConfig(iterations=60, similarity="mind", sample_fraction=0.1)
    sampled = refine_displacement(fixed, moving, None, cfg)
    assert torch.equal(sampled, refine_displacement(fixed, moving, None, cfg))  # seeded draws
    assert not torch.equal(sampled, dense)  # it did sample
    assert _dice(sampled, fl, ml) > _dice(dense, fl, ml) - 0.03
    assert qa.folding_fraction(metrics.jacobian_determinant_voxel(sampled)) == 0.0
    with pytest.raises(ValueError, match="sample_fraction"):
        refine_displacement(fixed, moving, None, RefineConfig(iterations=1, similarity="mind",
                                                              sample_fraction=0))
    with pytest.raises(ValueError, match="needs the MIND-SSC similarity"):
        refine_displacement(fixed, moving, None, RefineConfig(iterations=1, similarity="lncc",
                                                              sample_fraction=0.5))
    # unset, the fraction follows the similarity: sampled for MIND-SSC only
    assert RefineConfig(similarity="mind").resolved().sample_fraction == SAMPLE_FRACTION < 1
    assert RefineConfig(similarity="lncc").resolved().sample_fraction == 1.0
