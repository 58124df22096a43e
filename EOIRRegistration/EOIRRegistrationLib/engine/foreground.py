"""The foreground box: the block of the fixed grid where the registration works.

A CT holds the body in a field of air; a 512x512 slice of 0.7 mm is a third air. The network and
the optimisation levels cover the bounding box of the fixed image's foreground (voxels above
``THRESHOLD`` of its intensity window, above the low end: air in HU, the background of an MR)
plus ``MARGIN_MM`` on each side, in the fixed grid's index space (``geometry.sub_grid``: same
spacing and direction, an integer offset, so nothing is resampled to get there). The field
found on the box is extended to the whole fixed grid with its border values (``extend``: the
convention of ``optimise.move_field`` beyond its source), which outside the margin moves air
onto air. When the box keeps most of the grid (a skull-stripped brain cropped to its head) the
whole grid is used and nothing changes.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from EOIRRegistrationLib.core import geometry

MARGIN_MM = 25.0     # around the foreground: room for the field to settle in the background
THRESHOLD = 0.1      # of the fixed window (low, high): foreground = above low + 0.1 (high - low)
MAX_KEPT = 0.8       # the box is used only when it holds at most this fraction of the voxels


def box(values: torch.Tensor, grid: geometry.Grid, window,
        margin_mm: float = MARGIN_MM) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(start, shape) in array order (k, j, i) of the foreground box of ``values (1, 1, *S)``
    on ``grid``; the whole grid when there is no foreground or the box keeps more than
    ``MAX_KEPT`` of it."""
    shape = tuple(int(n) for n in values.shape[2:])
    whole = ((0, 0, 0), shape)
    low, high = (float(v) for v in window)
    above = values[0, 0] > low + THRESHOLD * (high - low)
    start, stop = [], []
    spacing = tuple(reversed(grid.spacing))  # array order
    for axis in range(3):
        hit = torch.nonzero(above.movedim(axis, 0).flatten(1).any(dim=1)).flatten()
        if hit.numel() == 0:
            return whole
        margin = int(math.ceil(margin_mm / spacing[axis]))
        start.append(max(0, int(hit[0]) - margin))
        stop.append(min(shape[axis], int(hit[-1]) + 1 + margin))
    size = tuple(b - a for a, b in zip(start, stop))
    if np.prod(size, dtype=np.float64) > MAX_KEPT * np.prod(shape, dtype=np.float64):
        return whole
    return tuple(start), size


def crop(values: torch.Tensor, start, shape) -> torch.Tensor:
    """The block of ``values (B, C, *S)`` (a view)."""
    (k, j, i), (nk, nj, ni) = start, shape
    return values[:, :, k:k + nk, j:j + nj, i:i + ni]


def extend(disp: torch.Tensor, start, full_shape) -> torch.Tensor:
    """A field ``(3, *box)`` found on the box, on the whole grid ``(3, *full_shape)``: the
    box's border values repeated outside it."""
    box_shape = disp.shape[1:]
    if tuple(box_shape) == tuple(full_shape):
        return disp
    pad = []
    for axis in (2, 1, 0):  # F.pad lists the last axis first
        pad += [start[axis], full_shape[axis] - start[axis] - box_shape[axis]]
    return F.pad(disp[None], pad, mode="replicate")[0]
