"""GeoReg's training objective (the paper's multi-level, per-iteration protocol).

For every refinement state the model reports (``GeoReg.pyramid_outputs``: after each
interpolation delta and after every tau iteration, at every level; the coarsest start, the identity,
is skipped) the moving image, average-pooled to that level, is sampled at the points' continuous
positions (``warp`` with the state's displacement: ``moving_l(p + u_l(p))``) and compared with the
fixed image pooled the same way, and the state's displacement (voxels of its level) is penalised
by its bending energy with a per-level weight. The loss is the mean over states of
``similarity + regularization_weight * BENDING_WEIGHTS[level] * bending`` (the paper sums; the
mean only rescales the loss so it reads like one similarity value).

Fields of ``ObjectiveConfig`` used: ``similarity`` ("lncc" | "mse"), ``windows`` (LNCC window per
level, finest first), ``regularization_weight`` (multiplies ``BENDING_WEIGHTS``), ``dice_weight``
and ``label_values`` (soft Dice of pooled one-hot labels on each level's final state).
``regularization`` (EOIR's l1/l2 diffusion choice) does not apply: GeoReg always uses bending.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from EOIRRegistrationLib.core import losses, spatial

# Bending-energy weight per level (finest first), on displacements in voxels of their level.
# The paper uses [50, 50, 25, 12, 6, 3] on normalised ([-1, 1]) coordinates, where displacements
# are ~2/size times smaller than in voxels (the energy ~(2/size)^2 smaller): the same halving
# pattern, rescaled to voxel units.
BENDING_WEIGHTS = (1.0, 1.0, 0.5, 0.25, 0.125, 0.0625)


def _pool(x: torch.Tensor, times: int) -> torch.Tensor:
    for _ in range(times):
        x = F.avg_pool3d(x, 2)
    return x


def _fit_window(window: int, shape) -> list[int]:
    """The LNCC window, shrunk (odd) on axes shorter than it (tiny coarse levels)."""
    return [min(int(window), s if s % 2 else s - 1) for s in shape]


def _bending(u: torch.Tensor) -> torch.Tensor:
    """Bending energy, or 0 on grids too small for its 5-voxel stencil (tiny coarsest levels)."""
    if min(u.shape[2:]) < 5:
        return u.new_zeros(())
    return losses.bending_energy(u)


def georeg_objective(model, fixed, moving, cfg, fixed_labels=None, moving_labels=None,
                     bending_weights=BENDING_WEIGHTS, moving_similarity=None) -> losses.LossTerms:
    """``moving_similarity``: optional image on the moving grid used in place of ``moving`` in the
    similarity term only (the network still sees ``moving``), e.g. the moving anatomy in the fixed
    image's contrast."""
    outputs = model.pyramid_outputs(fixed, moving)
    if moving_similarity is not None:
        if moving_similarity.shape != moving.shape:
            raise ValueError(f"georeg_objective: moving_similarity {tuple(moving_similarity.shape)} "
                             f"must have the shape of moving {tuple(moving.shape)}")
        moving = moving_similarity
    coarsest = model.cfg.levels - 1
    states = [o for o in outputs if not (o.level == coarsest and o.step < 0)]
    last_of_level = {o.level: i for i, o in enumerate(states)}
    use_dice = cfg.dice_weight > 0 and fixed_labels is not None and moving_labels is not None
    if use_dice:
        values = cfg.label_values or [int(v) for v in torch.unique(fixed_labels) if v != 0]
        oh_fixed = losses.one_hot(fixed_labels, values)
        oh_moving = losses.one_hot(moving_labels, values)
    pooled: dict[int, tuple] = {}
    sim_total = fixed.new_zeros(())
    reg_total = fixed.new_zeros(())
    for i, out in enumerate(states):
        level = out.level
        if level not in pooled:
            pooled[level] = (_pool(fixed, level), _pool(moving, level))
        f_l, m_l = pooled[level]
        warped = spatial.warp(m_l, out.displacement)
        if cfg.similarity == "lncc":
            window = cfg.windows[min(level, len(cfg.windows) - 1)]
            sim = losses.lncc_loss(f_l, warped, window=_fit_window(window, f_l.shape[2:]))
        elif cfg.similarity == "mse":
            sim = losses.mse_loss(f_l, warped)
        else:
            raise ValueError(f"unknown similarity {cfg.similarity!r}")
        if use_dice and last_of_level[level] == i:
            sim = sim + cfg.dice_weight * losses.soft_dice_loss(
                _pool(oh_fixed, level), spatial.warp(_pool(oh_moving, level), out.displacement))
        weight = bending_weights[min(level, len(bending_weights) - 1)]
        sim_total = sim_total + sim
        reg_total = reg_total + cfg.regularization_weight * weight * _bending(out.displacement)
    n = max(len(states), 1)
    sim_total, reg_total = sim_total / n, reg_total / n
    return losses.LossTerms(sim_total, reg_total, sim_total + reg_total)
