"""Instance optimisation: refine a displacement for one pair by gradient descent.

Optimises a stationary velocity ``v`` on a grid ``1 / downsample`` of the working grid (Adam,
learning rate decaying along a cosine to 10 %, on a similarity + diffusion of ``v``; the
similarity is LNCC for one modality, or the mean squared difference of MIND-SSC descriptors for
two, evaluated at a fresh random tenth of the voxels each step), integrates it by scaling and
squaring, and composes the resulting residual map with the starting displacement:
``u = u_init o (id + exp(v))`` — a composition of diffeomorphisms, so a fold-free start stays
fold-free up to discretisation. Works in the spatial core's voxel convention on the working grid.
With masks (``masks.py``) the similarity is a weighted mean: each voxel weighs the fixed mask
times the moving mask warped with the moving image.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from EOIRRegistrationLib.core import losses, spatial
from EOIRRegistrationLib.engine.options import (
    DEFAULT_REFINE_ITERATIONS,
    DEFAULT_REFINE_ITERATIONS_ALONE,
    REFINE_SIMILARITIES,
    RegistrationOptions,
)

# Diffusion weight per similarity. LNCC: 0.5 measured best on real brain pairs (T1 vs T1-like,
# 2 mm working grid: Dice +0.01 over 2.0, 0 % folding; 0.25 starts folding). MIND: its term is
# several times smaller than LNCC's for the same misalignment, so is its weight.
DEFAULT_REGULARIZATION = {"lncc": 0.5, "mind": 0.2}
# Why options.DEFAULT_REFINE_ITERATIONS (refinement on by default): on the real brain pairs of
# benchmarks/bench_brain.py, 10 steps at lr 0.4 after the network reached the Dice of 30-50
# steps at 0.2-0.4 (+0.06 over the network alone) in 1.6 s on 2 CPU threads; more steps changed
# nothing there.
# Why options.DEFAULT_REFINE_ITERATIONS_ALONE: without the network (two contrasts) the
# refinement starts from the initial alignment and has the whole deformation to find: T1
# against T2-like brains, MIND-SSC at every voxel, Dice 0.62 / 0.67 / 0.678 / 0.683 / 0.683
# after 10 / 20 / 30 / 50 / 100 steps (30: about 9 s on 2 CPU threads); at a tenth of the
# voxels per step (SAMPLE_FRACTION) 0.672 / 0.679 / 0.683 after 30 / 40 / 60 steps, 40 taking
# about 5 s.
# MIND-SSC: most of a dense step is warping 12 descriptor channels over the whole grid (and
# back); evaluating the similarity at a random tenth of the voxels, drawn afresh each step
# (stochastic gradients, as elastix's random sampler), cut 30 steps on a brain from 8.8 s to
# 3.4 s for Dice 0.680 -> 0.672, won back by 40 steps (0.679).
SAMPLE_FRACTION = 0.1


class Adam:
    """Adam (Kingma & Ba) for one tensor, as ``torch.optim.Adam`` with default betas and eps.
    Written out because the first ``torch.optim`` step imports ``torch._dynamo``: a one-off
    second, as long as the whole default refinement."""

    def __init__(self, param: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param, self.betas, self.eps, self.t = param, betas, eps, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    @torch.no_grad()
    def step(self, lr: float):
        b1, b2 = self.betas
        self.t += 1
        g = self.param.grad
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-lr / (1 - b1 ** self.t))


@dataclass(frozen=True)
class RefineConfig:
    # None: chosen by the pipeline (``resolved``): DEFAULT_REFINE_ITERATIONS after the network,
    # DEFAULT_REFINE_ITERATIONS_ALONE without it; LNCC for one contrast, MIND-SSC for two.
    iterations: int | None = None
    learning_rate: float = 0.4      # voxels of the optimisation grid per step (Adam)
    similarity: str | None = None   # "lncc" (one contrast) or "mind" (MIND-SSC, any two)
    regularization_weight: float | None = None  # None: DEFAULT_REGULARIZATION[similarity]
    window: int = 7                  # LNCC box window, working-grid voxels
    downsample: int = 2              # velocity grid = working grid / this (1 = full)
    integration_steps: int = 5       # 2^5 scaling: residual velocities stay within a few voxels
    # MIND-SSC only: fraction of the working-grid voxels at which the similarity is evaluated,
    # a fresh (seeded, reproducible) random draw each step; 1 = every voxel (LNCC's box sums need
    # them all). None: SAMPLE_FRACTION for MIND-SSC, 1 for LNCC.
    sample_fraction: float | None = None
    time_budget_s: float | None = None  # stop early when exceeded

    def resolved(self, after_network: bool = True, same_contrast: bool = True) -> RefineConfig:
        """A copy with the pipeline's choices in place of None."""
        similarity = (self.similarity if self.similarity is not None
                      else "lncc" if same_contrast else "mind")
        return replace(
            self,
            iterations=(self.iterations if self.iterations is not None
                        else DEFAULT_REFINE_ITERATIONS if after_network
                        else DEFAULT_REFINE_ITERATIONS_ALONE),
            similarity=similarity,
            sample_fraction=(self.sample_fraction if self.sample_fraction is not None
                             else SAMPLE_FRACTION if similarity == "mind" else 1.0))


def config_from_options(options: RegistrationOptions) -> RefineConfig | None:
    """The refinement a run's options ask for: None when ``refine_iterations`` is 0 (off);
    fields the options leave None are filled by the pipeline (``RefineConfig.resolved``)."""
    if options.refine_iterations == 0:
        return None
    return RefineConfig(iterations=options.refine_iterations,
                        time_budget_s=options.refine_seconds,
                        similarity=options.refine_similarity)


def _residual_at(v: torch.Tensor, points: torch.Tensor, shape, steps: int) -> torch.Tensor:
    """``resize_displacement(integrate_velocity(v, steps), shape)`` at full-grid voxel ``points``
    (3, N) only: (1, 3, N) in full-grid voxels. Cell-centred like F.interpolate(align_corners=
    False), whose clamping at the border is grid_sample's "border" padding."""
    disp = spatial.integrate_velocity(v, steps)
    ratio = torch.tensor([c / s for c, s in zip(disp.shape[2:], shape)], dtype=v.dtype,
                         device=v.device).view(3, 1)
    coarse = ((points + 0.5) * ratio - 0.5).view(1, 3, -1, 1, 1)
    return spatial.sample(disp, coarse, padding="border").view(1, 3, -1) / ratio.view(1, 3, 1)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` weighted by ``weights`` (0 where nothing is weighted)."""
    weights = torch.broadcast_to(weights, values.shape)
    return (values * weights).sum() / weights.sum().clamp_min(1e-6)


def refine_displacement(fixed: torch.Tensor, moving: torch.Tensor,
                        initial: torch.Tensor | None = None, cfg: RefineConfig | None = None,
                        progress=None, cancel=None, fixed_mask: torch.Tensor | None = None,
                        moving_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Refined voxel displacement ``(1, 3, *S)`` on the working grid of ``fixed``/``moving``.
    fixed_mask / moving_mask: ``(1, 1, *S)`` weights in [0, 1] on the working grid (the moving
    one as the moving image is: read through the initial alignment, not yet warped)."""
    cfg = (cfg or RefineConfig()).resolved()
    if cfg.similarity not in REFINE_SIMILARITIES:
        raise ValueError(f"unknown refinement similarity {cfg.similarity!r}; choose one of "
                         f"{', '.join(REFINE_SIMILARITIES)}")
    reg_weight = (DEFAULT_REGULARIZATION[cfg.similarity] if cfg.regularization_weight is None
                  else cfg.regularization_weight)
    shape = fixed.shape[2:]
    if initial is None:
        initial = fixed.new_zeros(1, 3, *shape)
    coarse = [max(2, s // cfg.downsample) for s in shape]
    v = torch.zeros(1, 3, *coarse, dtype=fixed.dtype, device=fixed.device, requires_grad=True)
    opt = Adam(v)
    initial = initial.detach()
    with torch.no_grad():
        # Smooth images once so LNCC gradients reach a few voxels.
        fixed_s = spatial.gaussian_blur(fixed, 0.5)
        # The moving image seen through the start, resampled once: warping it by the residual
        # map r gives moving(y + initial(y)) at y = x + r(x), which is the moving image warped
        # by compose(initial, r) (up to one more interpolation), at a third of the cost.
        moving_s = spatial.warp(spatial.gaussian_blur(moving, 0.5), initial)
        # the moving mask rides with the moving image: through the start now, the residual later
        moving_w = None if moving_mask is None else spatial.warp(moving_mask, initial)
        masked = fixed_mask is not None or moving_mask is not None
        if cfg.similarity == "mind":  # descriptors once; the moving ones are warped (12 channels)
            fixed_s, moving_s = losses.mind_ssc(fixed_s), losses.mind_ssc(moving_s)
            similarity = lambda w, weights=None: (
                losses.mse_loss(fixed_s, w) if weights is None
                else _weighted_mean((fixed_s - w).pow(2).mean(1, keepdim=True), weights))
        else:
            similarity = losses.LNCCToFixed(fixed_s, cfg.window)
    start = time.perf_counter()

    def residual(v_):
        return spatial.resize_displacement(spatial.integrate_velocity(v_, cfg.integration_steps),
                                           shape)

    fraction = cfg.sample_fraction
    if not 0 < fraction <= 1:
        raise ValueError(f"sample_fraction must be in (0, 1], got {fraction}")
    if fraction < 1 and cfg.similarity != "mind":
        raise ValueError("sample_fraction < 1 needs the MIND-SSC similarity (LNCC's local sums "
                         "need every voxel)")
    sampled = fraction < 1
    if sampled:
        voxels = math.prod(shape)
        count = max(1, int(round(fraction * voxels)))
        draws = torch.Generator().manual_seed(0)  # the same run gives the same field
        grid = spatial.identity_grid(shape, fixed.device, fixed.dtype).view(3, -1)
        fixed_flat, moving_s = fixed_s.flatten(2), moving_s.detach()

    def weights_of(r, fixed_weight):
        """The fixed weight times the moving mask read through ``r``: a residual displacement
        ``(1, 3, *S)``, or the moved points ``(1, 3, N)`` of the sampled similarity (None:
        unmasked)."""
        if not masked:
            return None
        w = fixed_weight if fixed_weight is not None else 1.0
        if moving_w is not None:
            w = w * (spatial.warp(moving_w, r) if r.dim() == 5 else
                     spatial.sample(moving_w, r.view(1, 3, -1, 1, 1)).flatten(2))
        return w

    def loss_of(v_):
        if not sampled:
            r = residual(v_)
            return similarity(spatial.warp(moving_s, r), weights_of(r, fixed_mask))
        # sorted: neighbouring points read neighbouring memory
        idx = torch.randperm(voxels, generator=draws)[:count].sort().values.to(fixed.device)
        points = grid[:, idx]
        moved = points.unsqueeze(0) + _residual_at(v_, points, shape, cfg.integration_steps)
        warped = spatial.sample(moving_s, moved.view(1, 3, -1, 1, 1)).flatten(2)
        squared = (warped - fixed_flat[:, :, idx]).pow(2)
        weights = weights_of(moved, None if fixed_mask is None else fixed_mask.flatten(2)[:, :, idx])
        return squared.mean() if weights is None else _weighted_mean(squared.mean(1, keepdim=True),
                                                                     weights)

    for it in range(cfg.iterations):
        if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
            break
        if cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s:
            break
        loss = loss_of(v) + reg_weight * losses.diffusion_loss(v)
        v.grad = None
        loss.backward()
        # cosine decay to 10 %: the early steps move, the late ones settle
        opt.step(cfg.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * it / cfg.iterations))))
        if progress is not None and it % 10 == 0:
            progress(it / cfg.iterations)
    with torch.no_grad():
        return spatial.compose(initial, residual(v))
