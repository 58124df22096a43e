"""The multi-scale optimisation as a distillation teacher (``eoir-train --distill-from optimisation``).

For each training pair it runs ``engine.optimise`` (LNCC) on the fixed image and the moving
anatomy in the fixed image's contrast, on the training crop's own grid (the working spacing,
identity direction), with the ``accurate`` preset's steps and smoothing for the two levels that
grid holds: twice its coarsest spacing, then its finest. Its field, in voxels of that
grid, array order (channel c along array axis c, ``warped(p) = moving(p + u(p))``), is the
target the network's final displacement is pulled towards: a per-pair solution of the
optimisation's own objective, a denser and steadier signal than the network's LNCC loss.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from EOIRRegistrationLib.core import geometry
from EOIRRegistrationLib.engine import optimise

#: the reserved ``--distill-from`` name of this teacher
NAME = "optimisation"


class OptimisationTeacher:
    def __init__(self, working_spacing_mm):
        self.spacing = tuple(float(s) for s in working_spacing_mm)  # x, y, z
        coarse = 2.0 * max(self.spacing)
        accurate = optimise.PRESETS["accurate"]
        self.schedule = replace(accurate, scales_mm=(coarse, min(self.spacing)),
                                iterations=accurate.iterations[:2])

    def _grid(self, shape) -> geometry.Grid:
        return geometry.Grid(tuple(int(s) for s in reversed(shape)), self.spacing, (0.0, 0.0, 0.0),
                             (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    def _one(self, fixed: torch.Tensor, moving: torch.Tensor, device: torch.device) -> torch.Tensor:
        grid = self._grid(fixed.shape[2:])
        fixed_at = lambda level, scale: optimise.image_at(fixed, grid, level, scale)  # noqa: E731
        moving_at = lambda level, scale: optimise.image_at(moving, grid, level, scale)  # noqa: E731
        d_mm = optimise.optimise(fixed_at, moving_at, grid, self.schedule, device=device)
        return optimise.to_voxels(d_mm[None], grid)

    @torch.no_grad()
    def __call__(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) each -> voxel displacement (B, 3, D, H, W) on ``fixed``'s grid.

        The levels' images are prepared on the CPU (as ``engine.optimise`` expects) and optimised
        on the training device, where the teacher costs least.
        """
        device = fixed.device
        out = [self._one(f[None].float().cpu(), m[None].float().cpu(), device)
               for f, m in zip(fixed, moving)]
        return torch.cat(out).to(device)
