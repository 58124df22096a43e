"""Jacobian determinants (torch) and the HD95 surface distance (numpy, scipy).

* Jacobian functions take and return **torch** tensors; their summaries (folding, SDlogJ) and
  Dice are defined once in ``core/qa.py``.
* ``hd95`` takes integer **numpy** label arrays in array order ``(k, j, i)``; scipy is imported
  when it is called.
* Memory: sized for whole 160x192x224 volumes: the physical Jacobian is computed slab by slab,
  HD95 works on the bounding box of the structure.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from EOIRRegistrationLib.core import spatial
from EOIRRegistrationLib.core.geometry import Grid
from EOIRRegistrationLib.core.qa import label_array

__all__ = ["jacobian_determinant", "jacobian_determinant_voxel", "hd95"]

# Voxels per slab of the physical Jacobian (float32 temporaries ~0.2 kB per voxel: ~0.4 GB).
_SLAB_VOXELS = 1 << 21


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
        part = d[:, lo:hi].to(work, calc)
        keep = slice(start - lo, stop - lo)
        # dd_c/dx_b = sum_a dd_c/dp_a * dp_a/dx_b; the zero terms of an axis-aligned grid skipped
        jac = []
        for c in range(3):
            g = [_central_difference(part[c], a)[keep] for a in range(3)]
            row = []
            for b in range(3):
                terms = [(a, float(m[a, b])) for a in range(3) if m[a, b] != 0.0]
                acc = g[terms[0][0]] * terms[0][1]
                for a, w in terms[1:]:
                    acc.add_(g[a], alpha=w)
                row.append(acc)
            jac.append(row)
        out[start:stop] = _det_plus_identity(jac).to(out_dtype)
    return out


def _central_difference(f: torch.Tensor, axis: int) -> torch.Tensor:
    """d f / d index along ``axis`` of a 3D tensor: central differences, one-sided at the
    borders (``spatial.spatial_gradient``'s rule), into one new tensor."""
    n = f.shape[axis]
    out = torch.empty_like(f)
    if n < 2:
        return out.zero_()
    if n > 2:
        torch.sub(f.narrow(axis, 2, n - 2), f.narrow(axis, 0, n - 2),
                  out=out.narrow(axis, 1, n - 2)).mul_(0.5)
    torch.sub(f.narrow(axis, 1, 1), f.narrow(axis, 0, 1), out=out.narrow(axis, 0, 1))
    torch.sub(f.narrow(axis, n - 1, 1), f.narrow(axis, n - 2, 1), out=out.narrow(axis, n - 1, 1))
    return out


def _det_plus_identity(j) -> torch.Tensor:
    """det(I + J) of a 3x3 nested list of tensors, with few temporaries."""
    a, b, c = j[0][0].add_(1.0), j[0][1], j[0][2]
    d, e, f = j[1][0], j[1][1].add_(1.0), j[1][2]
    g, h, i = j[2][0], j[2][1], j[2][2].add_(1.0)
    det = (e * i).sub_(f * h).mul_(a)
    det.sub_((d * i).sub_(f * g).mul_(b))
    det.add_((d * h).sub_(e * g).mul_(c))
    return det


def jacobian_determinant_voxel(disp: torch.Tensor) -> torch.Tensor:
    """``det(I + du/dp)`` of a voxel displacement ``(B, n, *S)`` (array order, unit isotropic grid),
    central differences (one-sided at borders); returns ``(B, *S)``. 2D and 3D."""
    if disp.dim() not in (4, 5) or disp.shape[1] != disp.dim() - 2:
        raise ValueError(f"jacobian_determinant_voxel: disp must be (B, n, *S) with n = len(S) in "
                         f"(2, 3), got {tuple(disp.shape)}")
    g = spatial.spatial_gradient(disp)  # (B, n, n, *S)
    return _det(g.movedim(0, 2))


def _surface(m: np.ndarray) -> np.ndarray:
    """Voxels of ``m`` with a face neighbour outside ``m`` (outside the array counts as outside)."""
    from scipy import ndimage

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
    a_lab = label_array(labels_a, "hd95")
    b_lab = label_array(labels_b, "hd95")
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
    from scipy import ndimage

    sa, sb = _surface(a[box]), _surface(b[box])
    d_ab = ndimage.distance_transform_edt(~sb, sampling=sp)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=sp)[sb]
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))
