"""Two contrasts: the multi-scale optimisation on MIND-SSC descriptors (engine/optimise.py), and
the optimisation settings the options resolve to (engine/refine.py)."""

import numpy as np
import pytest
import torch

from EOIRRegistrationLib.core import geometry, metrics, qa, spatial
from EOIRRegistrationLib.engine import optimise
from EOIRRegistrationLib.engine.options import RegistrationOptions
from EOIRRegistrationLib.engine.refine import RefineConfig, config_from_options
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


def test_mind_optimisation_aligns_two_contrasts_without_folding(cross_contrast_pair):
    fixed, moving, fl, ml = cross_contrast_pair
    grid = geometry.Grid(tuple(reversed(fixed.shape[2:])), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0),
                         (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    fixed_at = lambda g, s: optimise.image_at(fixed, grid, g, s)  # noqa: E731
    moving_at = lambda g, s: optimise.image_at(moving, grid, g, s)  # noqa: E731
    d = optimise.optimise(fixed_at, moving_at, grid,
                          optimise.schedule_of("default", similarity="mind"))
    u = optimise.to_voxels(d[None], grid)
    before, after = _dice(torch.zeros_like(u), fl, ml), _dice(u, fl, ml)
    assert after > before + 0.05, (before, after)
    # LNCC on the same two contrasts does worse: the descriptors are what carries it
    lncc = optimise.to_voxels(optimise.optimise(fixed_at, moving_at, grid,
                                                 optimise.schedule_of("default"))[None], grid)
    assert after > _dice(lncc, fl, ml), (after, _dice(lncc, fl, ml))
    assert qa.folding_fraction(metrics.jacobian_determinant_voxel(u)) == 0.0


def test_the_options_resolve_to_the_optimisation_settings():
    assert config_from_options(RegistrationOptions()) == RefineConfig()
    assert config_from_options(RegistrationOptions(refine_iterations=0)) is None
    given = RegistrationOptions(refine_iterations=4, refine_seconds=2.0, refine_similarity="mind")
    assert config_from_options(given) == RefineConfig(iterations=4, similarity="mind",
                                                      time_budget_s=2.0)
    assert RefineConfig().resolved(same_contrast=False).similarity == "mind"
    assert RefineConfig().resolved(same_contrast=True).similarity == "lncc"
    assert RefineConfig(similarity="lncc").resolved(same_contrast=False).similarity == "lncc"
