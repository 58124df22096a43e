"""Evaluation metrics: Jacobian determinants, folding, SDlogJ (torch) and Dice, HD95 (numpy).

* Jacobian functions take and return **torch** tensors; the summaries of a determinant map
  (``folding_fraction``, ``sdlogj``, ``jacobian_summary``) accept a torch tensor or a numpy array
  and return plain Python floats.
* Label metrics (``dice``, ``hd95``) take integer **numpy** label arrays (CPU tensors also work
  through ``np.asarray``) in array order ``(k, j, i)``.
* Memory: sized for whole 160x192x224 volumes: the physical Jacobian is computed slab by slab,
  HD95 works on the bounding box of the structure, Dice uses label counts.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from . import spatial
from .geometry import Grid

__all__ = [
    "STANDARD_30_LABELS",
    "SYNTHSEG_COMPARABLE_LABELS",
    "jacobian_determinant",
    "jacobian_determinant_voxel",
    "folding_fraction",
    "sdlogj",
    "jacobian_summary",
    "dice",
    "hd95",
]

# FreeSurfer aseg labels of the usual 30-structure brain evaluation.
STANDARD_30_LABELS = (2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31, 41, 42, 43,
                      46, 47, 49, 50, 51, 52, 53, 54, 60, 63)
# The 27 of them that SynthSeg label maps share with FreeSurfer segmentations: SynthSeg's 24 is
# the whole extra-cerebral CSF shell (a few sulcal voxels in FreeSurfer) and SynthSeg has no
# choroid plexus (31, 63). Training on 24 teaches the model to align that shell, which moved
# cortex and deep structures away on real T1 pairs.
SYNTHSEG_COMPARABLE_LABELS = tuple(v for v in STANDARD_30_LABELS if v not in (24, 31, 63))

# Voxels per slab of the physical Jacobian (float32 temporaries ~0.2 kB per voxel: ~0.4 GB).
_SLAB_VOXELS = 1 << 21

LOG_CLIP = (1e-9, 1e9)


def _det(m: torch.Tensor) -> torch.Tensor:
    """Determinant of ``I + m`` for ``m (n, n, *S)``, n in (2, 3), entry-wise (no (N, 3, 3) copy)."""
    if m.shape[0] == 2:
        return (1 + m[0, 0]) * (1 + m[1, 1]) - m[0, 1] * m[1, 0]
    a, b, c = 1 + m[0, 0], m[0, 1], m[0, 2]
    d, e, f = m[1, 0], 1 + m[1, 1], m[1, 2]
    g, h, i = m[2, 0], m[2, 1], 1 + m[2, 2]
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def jacobian_determinant(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Per-voxel ``det(I + dd/dx)`` of a physical displacement field.

    ``displacement``: tensor (or numpy array) ``(3, k, j, i)`` on ``grid`` (any spacing and direction), values in
    LPS millimetres, channels (x, y, z) = (L, P, S). Derivatives are taken w.r.t. physical
    position: ``dd/dp`` by central differences along the array axes (one-sided at the borders,
    ``spatial.spatial_gradient``), then ``dd/dx = dd/dp @ inv(M)`` with ``M`` the 3x3 linear part
    of ``grid.array_to_physical()``. Computed in float64 slab by slab (on the CPU for MPS input,
    which has no float64); returns ``(k, j, i)`` in the input's floating dtype (float32 for
    integer input) on its device.
    """
    d = torch.as_tensor(displacement)
    if d.dim() != 4 or d.shape[0] != 3 or tuple(d.shape[1:]) != tuple(grid.shape):
        raise ValueError(f"jacobian_determinant: displacement must be (3, *grid.shape) = "
                         f"(3, {', '.join(map(str, grid.shape))}), got {tuple(d.shape)}")
    out_dtype = d.dtype if d.is_floating_point() else torch.float32
    work = torch.device("cpu") if d.device.type == "mps" else d.device
    # Computed in the input's precision (float64 input stays float64): float32 keeps ~1e-6
    # relative accuracy of det, ample for QA, and is several times faster on big volumes.
    calc = torch.float32 if (out_dtype != torch.float64 or work != d.device) else torch.float64
    m = np.linalg.inv(grid.array_to_physical()[:3, :3])  # d(array index)/d(LPS position)
    nk = d.shape[1]
    slab = max(1, _SLAB_VOXELS // (d.shape[2] * d.shape[3]))
    out = torch.empty(d.shape[1:], dtype=out_dtype, device=d.device)
    for start in range(0, nk, slab):
        stop = min(nk, start + slab)
        # One halo slice each side makes the slab's central differences equal the global ones.
        lo, hi = max(0, start - 1), min(nk, stop + 1)
        g = spatial.spatial_gradient(d[None, :, lo:hi].to(work, calc))[0]
        g = g[:, :, start - lo:stop - lo]  # (channel c, array axis a, slab)
        # dd_c/dx_b = sum_a dd_c/dp_a * dp_a/dx_b, written out: no einsum permute copies.
        jac = torch.stack([torch.stack([g[c, 0] * float(m[0, b]) + g[c, 1] * float(m[1, b])
                                        + g[c, 2] * float(m[2, b]) for b in range(3)])
                           for c in range(3)])
        out[start:stop] = _det(jac).to(out_dtype)
    return out


def jacobian_determinant_voxel(disp: torch.Tensor) -> torch.Tensor:
    """``det(I + du/dp)`` of a voxel displacement ``(B, n, *S)`` (array order, unit isotropic grid),
    central differences (one-sided at borders); returns ``(B, *S)``. 2D and 3D."""
    if disp.dim() not in (4, 5) or disp.shape[1] != disp.dim() - 2:
        raise ValueError(f"jacobian_determinant_voxel: disp must be (B, n, *S) with n = len(S) in "
                         f"(2, 3), got {tuple(disp.shape)}")
    g = spatial.spatial_gradient(disp)  # (B, n, n, *S)
    return _det(g.movedim(0, 2))


def _select(det, mask, func: str) -> torch.Tensor:
    t = torch.as_tensor(det)
    if mask is None:
        return t.reshape(-1)
    m = torch.as_tensor(mask, device=t.device)
    if m.shape != t.shape:
        raise ValueError(f"{func}: mask shape {tuple(m.shape)} differs from det shape "
                         f"{tuple(t.shape)}")
    return t[m.to(torch.bool)]


def _folding(t: torch.Tensor) -> float:
    return float((t <= 0).sum()) / t.numel() if t.numel() else math.nan


def _sdlogj(t: torch.Tensor) -> float:
    if not t.numel():
        return math.nan
    v = t.to(torch.float64).clamp(*LOG_CLIP).log_()
    return float(v.std(correction=0))


def folding_fraction(det, mask=None) -> float:
    """Fraction (0..1) of voxels with ``det <= 0``, over all voxels or where the boolean ``mask``
    is true; NaN when no voxel is selected."""
    return _folding(_select(det, mask, "folding_fraction"))


def sdlogj(det, mask=None) -> float:
    """Population standard deviation (ddof 0) of ``log(clip(det, 1e-9, 1e9))`` (the Learn2Reg
    clip: folded voxels count as log(1e-9) = -20.7), optionally within a boolean mask; NaN when
    no voxel is selected."""
    return _sdlogj(_select(det, mask, "sdlogj"))


def jacobian_summary(det, mask=None) -> dict:
    """``{"folding_percent", "sdlogj", "jacobian_min", "jacobian_max"}`` as Python floats
    (folding in percent, 0..100), optionally within a boolean mask; NaN when empty."""
    t = _select(det, mask, "jacobian_summary")
    empty = not t.numel()
    return {
        "folding_percent": 100.0 * _folding(t),
        "sdlogj": _sdlogj(t),
        "jacobian_min": math.nan if empty else float(t.min()),
        "jacobian_max": math.nan if empty else float(t.max()),
    }


def _label_array(x, func: str) -> np.ndarray:
    a = np.asarray(x)
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise ValueError(f"{func}: label arrays must have an integer dtype, got {a.dtype} "
                         "(cast label maps read as float with .astype(int))")
    return a


def _counts(a: np.ndarray) -> dict[int, int]:
    if a.size and a.min() >= 0 and a.max() <= 65535:
        c = np.bincount(a.reshape(-1).astype(np.intp, copy=False))
        nz = np.flatnonzero(c)
        return dict(zip(nz.tolist(), c[nz].tolist()))
    v, c = np.unique(a, return_counts=True)
    return dict(zip(v.tolist(), c.tolist()))


def dice(labels_a, labels_b, values: Sequence[int] | None = None) -> dict[int, float]:
    """Dice overlap ``2 |A n B| / (|A| + |B|)`` per label value of two integer label arrays.

    ``values`` defaults to the sorted union of the nonzero labels present in either array; a
    label absent from both arrays gets NaN.
    """
    a = _label_array(labels_a, "dice")
    b = _label_array(labels_b, "dice")
    if a.shape != b.shape:
        raise ValueError(f"dice: label arrays must have the same shape, got {a.shape} and {b.shape}")
    count_a, count_b = _counts(a), _counts(b)
    inter = _counts(a[a == b])  # voxels where both carry the same label
    if values is None:
        values = sorted(v for v in set(count_a) | set(count_b) if v != 0)
    out = {}
    for v in (int(v) for v in values):
        total = count_a.get(v, 0) + count_b.get(v, 0)
        out[v] = 2.0 * inter.get(v, 0) / total if total else math.nan
    return out


def _surface(m: np.ndarray) -> np.ndarray:
    """Voxels of ``m`` with a face neighbour outside ``m`` (outside the array counts as outside)."""
    st = ndimage.generate_binary_structure(m.ndim, 1)
    return m & ~ndimage.binary_erosion(m, structure=st, border_value=0)


def hd95(labels_a, labels_b, value: int, spacing: Sequence[float] | Grid) -> float:
    """Symmetric 95th-percentile Hausdorff distance in millimetres of structure ``value``.

    ``spacing``: voxel size in mm in **array order** ``(k, j, i)`` (one per array axis), or a
    ``geometry.Grid`` (its ITK-order spacing is reversed). Surfaces are the structure voxels with
    a face neighbour outside it; the distance of each surface voxel of one structure to the
    nearest surface voxel of the other is the exact Euclidean distance between voxel centres
    (``distance_transform_edt`` with ``sampling``). Result: ``max(P95(A->B), P95(B->A))`` with
    numpy's linear percentile. NaN when the structure is empty in either array.
    """
    a_lab = _label_array(labels_a, "hd95")
    b_lab = _label_array(labels_b, "hd95")
    if a_lab.shape != b_lab.shape:
        raise ValueError(f"hd95: label arrays must have the same shape, got {a_lab.shape} and "
                         f"{b_lab.shape}")
    sp = tuple(reversed(spacing.spacing)) if isinstance(spacing, Grid) else tuple(
        float(s) for s in spacing)
    if len(sp) != a_lab.ndim or min(sp) <= 0:
        raise ValueError(f"hd95: spacing must give {a_lab.ndim} positive values in array order, "
                         f"got {sp}")
    a, b = a_lab == value, b_lab == value
    if not a.any() or not b.any():
        return math.nan
    # Crop to the union's bounding box (small for small structures). Exact: every surface voxel is
    # inside it, and what lies outside is background for both, as the erosion's border assumes.
    union = a | b
    box = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(x for x in range(union.ndim) if x != axis)))
        box.append(slice(hit[0], hit[-1] + 1))
    box = tuple(box)
    sa, sb = _surface(a[box]), _surface(b[box])
    d_ab = ndimage.distance_transform_edt(~sb, sampling=sp)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=sp)[sb]
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))
