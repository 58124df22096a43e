"""The similarity terms of the optimisation (``optimise.py``): their gradients with respect to
the voxel displacement of one level, in closed form.

* ``LNCCTerm`` (one contrast): LNCC in a small box window, ANTs' local approximation (local
  means held constant); the fixed image's statistics once per level, each step's in reused
  buffers.
* ``MINDTerm`` (two contrasts): MIND-SSC descriptors of both images once per level, the moving
  ones warped each step, the gradient of their squared difference.

With masks (``masks.py``) the force is multiplied by the fixed weight and the warped moving mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from EOIRRegistrationLib.core import losses
from EOIRRegistrationLib.engine.filters import box_mean, box_sum_axis, interior, interior_differences


def gradient_times(image: torch.Tensor, factor: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Central differences of ``(1, 1, *S)`` -> ``(1, 3, *S)`` (zero at the borders), each
    multiplied by ``factor (1, 1, *S)`` when given (one pass instead of two); into ``out``."""
    g = (torch.zeros(1, 3, *image.shape[2:], dtype=image.dtype, device=image.device)
         if out is None else out.zero_())
    for a, diff in interior_differences(image):
        diff.mul_(0.5 if factor is None else interior(factor, a) * 0.5)
        interior(g[:, a:a + 1], a).copy_(diff)
    return g


class LNCC:
    """Closed-form LNCC gradient against a fixed image; the fixed image's local statistics are
    computed once, and each step's local statistics of the warped image in two reused buffers."""

    def __init__(self, fixed: torch.Tensor, window: int):
        self.window = window
        self.f = fixed
        self.mf = box_mean(fixed, window)
        self.vf = (box_mean(fixed * fixed, window) - self.mf * self.mf).clamp_min_(0)
        self.fc = fixed - self.mf
        self.f_per_box = fixed / window ** 3
        self.buffers = None

    def force(self, warped: torch.Tensor) -> torch.Tensor:
        """d(mean LNCC)/d(warped) per voxel (up to a constant factor), ``(1, 1, *S)``: a view of
        a buffer that the next call overwrites."""
        if self.buffers is None or self.buffers[0].dtype != warped.dtype:
            self.buffers = [warped.new_empty(1, 3, *warped.shape[2:]) for _ in range(3)]
        stats, spare, pairs = self.buffers
        # the three local means (warped, warped^2, fixed * warped) as one 3-channel box sum of
        # the values divided by the box's voxels (no pass of its own)
        torch.mul(warped, 1.0 / self.window ** 3, out=stats[:, 0:1])
        torch.mul(stats[:, 0:1], warped, out=stats[:, 1:2])
        torch.mul(self.f_per_box, warped, out=stats[:, 2:3])
        for axis in range(3):
            stats, spare = box_sum_axis(stats, self.window, axis, spare, pairs), stats
        self.buffers = [stats, spare, pairs]
        mm = stats[:, 0:1]
        vm = stats[:, 1:2].addcmul_(mm, mm, value=-1).clamp_min_(0)
        cross = stats[:, 2:3].addcmul_(self.mf, mm, value=-1)
        out, scratch = spare[:, 0:1], spare[:, 1:2]
        # 2 cross / (vf vm + eps) * ((f - mf) - cross / (vm + eps) * (warped - mm))
        torch.sub(warped, mm, out=out).mul_(cross).div_(torch.add(vm, 1e-5, out=scratch))
        torch.sub(self.fc, out, out=out).mul_(cross).mul_(2.0)
        return out.div_(torch.mul(self.vf, vm, out=scratch).add_(1e-5))


class LNCCTerm:
    """The LNCC similarity of one level: its loss gradient with respect to the field."""

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, window: int):
        self.moving, self.lncc = moving, LNCC(fixed, window)

    def gradient(self, warp, weight=None, moving_mask=None, out=None) -> torch.Tensor:
        """At the field ``warp.set_field`` was last given; into ``out (1, 3, *S)``."""
        warped = warp(self.moving, padding="border")
        force = self.lncc.force(warped).neg_()
        if weight is not None:
            force.mul_(weight)
        if moving_mask is not None:
            force.mul_(warp(moving_mask))
        return gradient_times(warped, force, out)


class MINDTerm:
    """MIND-SSC (``core.losses.mind_ssc``) of both images on one level, computed once; each step
    warps the moving descriptors and takes the gradient of their squared difference from the
    fixed ones, ``sum_c r_c grad(D_c)``, in closed form."""

    REACH = 3  # voxels a descriptor reads around its own: patch radius 1 + neighbour offset 2

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor):
        self.fixed_d, self.moving_d = losses.mind_ssc(fixed), losses.mind_ssc(moving)

    def gradient(self, warp, weight=None, moving_mask=None, out=None) -> torch.Tensor:
        """At the field ``warp.set_field`` was last given; into ``out (1, 3, *S)``."""
        warped = warp(self.moving_d, padding="border")  # (1, 12, *S)
        residual = warped - self.fixed_d
        if weight is not None:
            residual.mul_(weight)
        if moving_mask is not None:
            residual.mul_(warp(moving_mask))
        g = (torch.zeros(1, 3, *warped.shape[2:], dtype=warped.dtype, device=warped.device)
             if out is None else out.zero_())
        for a, diff in interior_differences(warped):
            interior(g[:, a:a + 1], a).copy_(
                diff.mul_(interior(residual, a)).sum(dim=1, keepdim=True))
        return g


def eroded(mask: torch.Tensor, reach: int) -> torch.Tensor:
    """``mask (1, 1, *S)`` where its whole ``reach``-voxel neighbourhood is inside it: with MIND
    descriptors a lesion's edge would otherwise still pull through the voxels around it."""
    return -F.max_pool3d(-mask, 2 * reach + 1, stride=1, padding=reach)
