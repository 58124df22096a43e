"""Training objectives, one per architecture, each following its paper's protocol.

EOIR: at every pyramid level l (0 = finest) with weight 1/2^l, similarity between the fixed image
blurred (sigma 1 voxel) and halved l times and the equally reduced moving image warped by that
level's composed displacement, plus a diffusion penalty on the level's velocity, plus an optional
soft Dice on one-hot label maps average-pooled to that level, plus an optional distillation
term: the squared distance (voxels^2, mean over voxels) between the final displacement and a
teacher model's displacement for the same anatomy seen in one contrast. Distilling a one-contrast
teacher on pairs of two contrasts teaches the student to register two contrasts as the teacher
registers one (contrast invariance), without moving its one-contrast behaviour.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from EOIRRegistrationLib.core import losses, spatial

#: image similarities of the objectives; "none": the Dice term alone (EOIR's objective only)
SIMILARITIES = ("lncc", "mse", "none")


@dataclass
class ObjectiveConfig:
    similarity: str = "lncc"            # one of SIMILARITIES
    windows: tuple = (9, 7, 5, 3, 3)    # LNCC box window per level, finest first
    regularization: str = "l2"          # diffusion penalty on the velocity: "l2" or "l1"
    regularization_weight: float = 1.0
    dice_weight: float = 0.0            # needs label maps
    label_values: tuple = ()            # labels for the Dice term (empty: all nonzero in fixed)
    distill_weight: float = 0.0         # needs a teacher (TrainConfig.distill_from)

    def to_dict(self):
        d = asdict(self)
        d["windows"], d["label_values"] = list(self.windows), list(self.label_values)
        return d


class _Pyramid:
    """Reduced copies of a tensor, each level made from the previous one, once.

    Images: Gaussian blur (sigma 1) and halving, as in the paper. One-hot label maps
    (``average=True``): 2x average pooling, i.e. the fraction of each label in the parent cells,
    which is what a soft Dice needs and costs one pass instead of a blur per label channel."""

    def __init__(self, x: torch.Tensor, axes, average: bool = False):
        self.levels, self.axes, self.average = [x], tuple(axes), average

    def __getitem__(self, level: int) -> torch.Tensor:
        while len(self.levels) <= level:
            prev = self.levels[-1]
            if self.average:
                kernel = tuple(2 if a in self.axes else 1 for a in range(prev.dim() - 2))
                self.levels.append(F.avg_pool3d(prev, kernel))
            else:
                self.levels.append(spatial.downsample(prev, sigma=1.0, axes=self.axes))
        return self.levels[level]


def eoir_objective(model, fixed, moving, cfg: ObjectiveConfig, fixed_labels=None,
                   moving_labels=None, moving_similarity=None,
                   teacher_displacement=None) -> losses.LossTerms:
    """``moving_similarity``: optional image on the moving grid compared with the fixed image in
    place of ``moving`` (e.g. the moving anatomy rendered in the fixed image's contrast, so that
    LNCC stays meaningful when the network's two inputs have different contrasts).
    ``teacher_displacement``: (B, 3, D, H, W) voxel displacement the final output is pulled
    towards with ``cfg.distill_weight`` (added to the similarity term)."""
    outputs = model.pyramid_outputs(fixed, moving)
    axes = model.cfg.pyramid_axes
    use_dice = cfg.dice_weight > 0 and fixed_labels is not None and moving_labels is not None
    fixed_pyr = _Pyramid(fixed, axes)
    moving_pyr = _Pyramid(moving if moving_similarity is None else moving_similarity, axes)
    if use_dice:
        values = cfg.label_values or [int(v) for v in torch.unique(fixed_labels) if v != 0]
        oh_fixed = _Pyramid(losses.one_hot(fixed_labels, values), axes, average=True)
        oh_moving = _Pyramid(losses.one_hot(moving_labels, values), axes, average=True)
    sim_total = fixed.new_zeros(())
    reg_total = fixed.new_zeros(())
    for out in outputs:
        level = max(out.factors).bit_length() - 1  # factors are 2^level on pyramid axes
        weight = 0.5 ** level
        f_l, m_l = fixed_pyr[level], moving_pyr[level]
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
                oh_fixed[level], spatial.warp(oh_moving[level], out.displacement))
        sim_total = sim_total + weight * sim
        if out.velocity is not None:
            reg = losses.diffusion_loss(out.velocity, penalty=cfg.regularization)
            reg_total = reg_total + weight * cfg.regularization_weight * reg
    if cfg.distill_weight > 0 and teacher_displacement is not None:
        gap = outputs[-1].displacement - teacher_displacement
        sim_total = sim_total + cfg.distill_weight * gap.pow(2).sum(dim=1).mean()
    return losses.LossTerms(sim_total, reg_total, sim_total + reg_total)


OBJECTIVES = {"eoir": eoir_objective}
from EOIRRegistrationLib.training.georeg_objective import georeg_objective  # noqa: E402

OBJECTIVES["georeg"] = georeg_objective
