"""Instance optimisation: refine a displacement for one pair by gradient descent.

Optimises a stationary velocity ``v`` on a grid ``1 / downsample`` of the working grid (Adam on
LNCC + diffusion of ``v``), integrates it by scaling and squaring, and composes the resulting
residual map with the starting displacement: ``u = u_init o (id + exp(v))`` — a composition of
diffeomorphisms, so a fold-free start stays fold-free up to discretisation. Works in the spatial
core's voxel convention on the working grid.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import losses, spatial


@dataclass
class RefineConfig:
    iterations: int = 100
    learning_rate: float = 0.1      # voxels of the optimisation grid per step (Adam)
    regularization_weight: float = 2.0
    window: int = 7                  # LNCC box window, working-grid voxels
    downsample: int = 2              # velocity grid = working grid / this (1 = full)
    integration_steps: int = 7
    time_budget_s: float | None = None  # stop early when exceeded


def refine_displacement(fixed: torch.Tensor, moving: torch.Tensor,
                        initial: torch.Tensor | None = None, cfg: RefineConfig | None = None,
                        progress=None, cancel=None) -> torch.Tensor:
    """Refined voxel displacement ``(1, 3, *S)`` on the working grid of ``fixed``/``moving``."""
    cfg = cfg or RefineConfig()
    shape = fixed.shape[2:]
    if initial is None:
        initial = fixed.new_zeros(1, 3, *shape)
    coarse = [max(2, s // cfg.downsample) for s in shape]
    v = torch.zeros(1, 3, *coarse, dtype=fixed.dtype, device=fixed.device, requires_grad=True)
    opt = torch.optim.Adam([v], lr=cfg.learning_rate)
    # Smooth images once so LNCC gradients reach a few voxels.
    fixed_s = spatial.gaussian_blur(fixed, 0.5)
    moving_s = spatial.gaussian_blur(moving, 0.5)
    initial = initial.detach()
    start = time.perf_counter()

    def current(v_):
        u_res = spatial.resize_displacement(spatial.integrate_velocity(v_, cfg.integration_steps),
                                            shape)
        return spatial.compose(initial, u_res)

    for it in range(cfg.iterations):
        if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
            break
        if cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s:
            break
        u = current(v)
        warped = spatial.warp(moving_s, u)
        loss = losses.lncc_loss(fixed_s, warped, window=cfg.window) \
            + cfg.regularization_weight * losses.diffusion_loss(v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None and it % 10 == 0:
            progress(it / cfg.iterations)
    with torch.no_grad():
        return current(v)
