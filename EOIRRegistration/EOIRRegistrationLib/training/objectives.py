"""Training objectives, one per architecture, each following its paper's protocol.

EOIR: at every pyramid level l (0 = finest) with weight 1/2^l, similarity between the fixed image
blurred (sigma 1 voxel) and halved l times and the equally reduced moving image warped by that
level's composed displacement, plus a diffusion penalty on the level's velocity, plus an optional
soft Dice on one-hot label maps reduced the same way.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .. import losses, spatial


@dataclass
class ObjectiveConfig:
    similarity: str = "lncc"            # "lncc", "mse", or "none" (Dice only)
    windows: tuple = (9, 7, 5, 3, 3)    # LNCC box window per level, finest first
    regularization: str = "l2"          # diffusion penalty on the velocity: "l2" or "l1"
    regularization_weight: float = 1.0
    dice_weight: float = 0.0            # needs label maps
    label_values: tuple = ()            # labels for the Dice term (empty: all nonzero in fixed)

    def to_dict(self):
        d = asdict(self)
        d["windows"], d["label_values"] = list(self.windows), list(self.label_values)
        return d


def _reduce(x: torch.Tensor, times: int, axes) -> torch.Tensor:
    for _ in range(times):
        x = spatial.downsample(x, sigma=1.0, axes=axes)
    return x


def eoir_objective(model, fixed, moving, cfg: ObjectiveConfig, fixed_labels=None,
                   moving_labels=None) -> losses.LossTerms:
    outputs = model.pyramid_outputs(fixed, moving)
    axes = model.cfg.pyramid_axes
    use_dice = cfg.dice_weight > 0 and fixed_labels is not None and moving_labels is not None
    if use_dice:
        values = cfg.label_values or [int(v) for v in torch.unique(fixed_labels) if v != 0]
        oh_fixed, oh_moving = losses.one_hot(fixed_labels, values), losses.one_hot(moving_labels, values)
    sim_total = fixed.new_zeros(())
    reg_total = fixed.new_zeros(())
    for out in outputs:
        level = max(out.factors).bit_length() - 1  # factors are 2^level on pyramid axes
        weight = 0.5 ** level
        f_l, m_l = _reduce(fixed, level, axes), _reduce(moving, level, axes)
        warped = spatial.warp(m_l, out.displacement)
        if cfg.similarity == "none":  # label supervision only (contrast-agnostic training)
            sim = f_l.new_zeros(())
        elif cfg.similarity == "lncc":
            window = cfg.windows[min(level, len(cfg.windows) - 1)]
            sim = losses.lncc_loss(f_l, warped, window=window)
        elif cfg.similarity == "mse":
            sim = losses.mse_loss(f_l, warped)
        else:
            raise ValueError(f"unknown similarity {cfg.similarity!r}")
        if use_dice:
            sim = sim + cfg.dice_weight * losses.soft_dice_loss(
                _reduce(oh_fixed, level, axes),
                spatial.warp(_reduce(oh_moving, level, axes), out.displacement))
        sim_total = sim_total + weight * sim
        if out.velocity is not None:
            reg = losses.diffusion_loss(out.velocity, penalty=cfg.regularization)
            reg_total = reg_total + weight * cfg.regularization_weight * reg
    return losses.LossTerms(sim_total, reg_total, sim_total + reg_total)


OBJECTIVES = {"eoir": eoir_objective}
from .georeg_objective import georeg_objective  # noqa: E402
OBJECTIVES["georeg"] = georeg_objective
