"""Similarity masks: the regions of the fixed and moving images the registration may match.

A mask is a SimpleITK image on any grid (its own size, spacing, origin and direction, LPS); its
nonzero voxels are used. Outside a mask's own field of view nothing is used. A region left out
(a lesion in one image only, a resection, an artefact) exerts no force: the field there follows
its surroundings through the smoothing. The masks restrict

* the initial alignment (SimpleITK's ``SetMetricFixedMask`` / ``SetMetricMovingMask``;
  ``alignment.py``),
* the one-contrast optimisation (``optimise.py``): the LNCC force times the fixed mask on the
  level grid and the moving mask warped with the moving image,
* the two-contrast refinement (``refine.py``): the MIND-SSC (or LNCC) similarity weighted the
  same way on the working grid.

The network sees the whole images (it has no mask input).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from EOIRRegistrationLib.core import geometry
from EOIRRegistrationLib.core.errors import InputError


def binary(mask: sitk.Image | None) -> sitk.Image | None:
    """The mask as SimpleITK's metric masks want it: uint8, 1 where used, its own grid."""
    if mask is None:
        return None
    return sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)


def check_mask(mask: sitk.Image, role: str) -> sitk.Image:
    """Refuse an empty mask: it would leave nothing to register."""
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        raise InputError(f"the {role} is empty (every voxel is 0); its nonzero voxels say "
                         "where to match the images")
    return mask


class LevelMask:
    """A mask read on another grid: its fraction of each voxel (linear interpolation of the
    0/1 mask, ITK's rules: 0 outside the mask's own field of view)."""

    def __init__(self, mask: sitk.Image):
        self.grid = geometry.Grid.from_image(mask)
        self.values = (geometry.image_to_tensor(mask) != 0).float()

    def on(self, grid: geometry.Grid, affine=None) -> torch.Tensor:
        """``(1, 1, *grid.shape)`` in [0, 1]; ``affine`` (4x4 LPS) maps ``grid``'s points into
        the mask's space (the initial alignment, for a moving mask)."""
        return geometry.sample_through_like_itk(self.values, self.grid, grid, affine)


def level_masks(fixed_mask: sitk.Image | None, moving_mask: sitk.Image | None, affine=None):
    """``(grid) -> (fixed weight or None, moving mask or None)`` on a level grid, the moving one
    read through ``affine`` (to be warped by the field like the moving image); None without
    masks."""
    if fixed_mask is None and moving_mask is None:
        return None
    fixed = LevelMask(fixed_mask) if fixed_mask is not None else None
    moving = LevelMask(moving_mask) if moving_mask is not None else None

    def at(grid: geometry.Grid):
        return (fixed.on(grid) if fixed is not None else None,
                moving.on(grid, affine) if moving is not None else None)
    return at
