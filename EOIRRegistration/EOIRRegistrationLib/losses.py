"""Training losses (torch, differentiable, 2D and 3D).

Conventions (see ``spatial.py``): images, probability maps and fields are ``(B, C, *S)`` with the
spatial axes ``S`` in numpy array order; displacement / velocity fields are in **voxels** of their
grid (no physical spacing enters any loss). Every loss returns a scalar tensor to **minimise**.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "LossTerms",
    "lncc_loss",
    "mse_loss",
    "diffusion_loss",
    "bending_energy",
    "soft_dice_loss",
    "one_hot",
]


class LossTerms(NamedTuple):
    """Named loss terms the trainer logs; ``total`` is what is back-propagated."""

    similarity: torch.Tensor
    regularity: torch.Tensor
    total: torch.Tensor


def _check_batch(x: torch.Tensor, func: str, name: str) -> int:
    if x.dim() not in (4, 5):
        raise ValueError(f"{func}: {name} must have shape (B, C, *S) with 2 or 3 spatial axes, "
                         f"got {tuple(x.shape)}")
    return x.dim() - 2


def _check_pair(a: torch.Tensor, b: torch.Tensor, func: str, names: str) -> int:
    n = _check_batch(a, func, names.split(" and ")[0])
    if a.shape != b.shape:
        raise ValueError(f"{func}: {names} must have the same shape (B, C, *S), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return n


def _box_sum(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """Sum of ``x (N, 1, *S)`` over a centred box, zero padded, same size out (separable).

    Separable average pooling times the window length: far faster on CPU than one-channel
    convolutions (forward and backward), same values.
    """
    n = x.dim() - 2
    pool = F.avg_pool3d if n == 3 else F.avg_pool2d
    for axis, w in enumerate(window):
        if w == 1:
            continue
        kernel = [1] * n
        kernel[axis] = w
        pad = [0, 0] * n  # explicit zero padding: pooling refuses windows wider than the image
        pad[2 * (n - 1 - axis)] = pad[2 * (n - 1 - axis) + 1] = w // 2
        x = pool(F.pad(x, pad), tuple(kernel), stride=1) * w
    return x


def lncc_loss(fixed: torch.Tensor, warped: torch.Tensor, window: int | Sequence[int] = 9,
              eps: float = 1e-5) -> torch.Tensor:
    """Negative mean **squared** local normalised cross-correlation (VoxelMorph's NCC loss).

    For each voxel and channel, with box sums over a centred ``window`` (odd, voxels per axis;
    an int applies to every axis) and zero padding outside the image (padded voxels count as
    zeros, the window size stays constant, as in VoxelMorph)::

        cc = cross^2 / (var_f * var_w + eps)

    where ``cross``, ``var_f``, ``var_w`` are the windowed sums of centred products. The result is
    ``-mean(cc)`` in ``[-1, 0]``: ``-1`` for locally linearly related images (including
    anti-correlated ones, since cc is squared), ``0`` for unrelated or locally constant ones.
    Sums are formed in the input dtype, so intensities should be normalised (about [0, 1]).
    """
    n = _check_pair(fixed, warped, "lncc_loss", "fixed and warped")
    win = [int(window)] * n if isinstance(window, (int, float)) else [int(w) for w in window]
    if len(win) != n or any(w < 1 or w % 2 == 0 for w in win):
        raise ValueError(f"lncc_loss: window must be an odd int >= 1 or {n} of them, got {window}")
    b, c = fixed.shape[:2]
    f = fixed.reshape(b * c, 1, *fixed.shape[2:])
    w = warped.reshape(b * c, 1, *warped.shape[2:])
    # One separable pass over the five stacked moments.
    stack = torch.cat([f, w, f * f, w * w, f * w], dim=0)
    sums = _box_sum(stack, win)
    f_sum, w_sum, f2_sum, w2_sum, fw_sum = sums.chunk(5, dim=0)
    size = float(math.prod(win))
    cross = fw_sum - f_sum * w_sum / size
    # Clamp: the expanded variance can dip below zero by rounding where the image is constant.
    var_f = (f2_sum - f_sum * f_sum / size).clamp_min(0.0)
    var_w = (w2_sum - w_sum * w_sum / size).clamp_min(0.0)
    cc = cross * cross / (var_f * var_w + eps)
    return -cc.mean()


def mse_loss(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference over batch, channels and voxels."""
    _check_pair(fixed, warped, "mse_loss", "fixed and warped")
    return torch.mean((fixed - warped) ** 2)


def diffusion_loss(field: torch.Tensor, penalty: str = "l2") -> torch.Tensor:
    """VoxelMorph "Grad" regulariser of a field ``(B, C, *S)`` (usually C = n, voxel units).

    For each array axis the forward differences ``f[.., x+1, ..] - f[.., x, ..]`` are squared
    (``"l2"``) or taken in absolute value (``"l1"``) and averaged over batch, channels and
    positions; the result is the mean of these per-axis means. Example: a 3D 3-channel field whose
    channel 0 is ``a * k`` gives ``a^2 / 9`` (l2).
    """
    n = _check_batch(field, "diffusion_loss", "field")
    if penalty not in ("l1", "l2"):
        raise ValueError(f"diffusion_loss: penalty must be 'l1' or 'l2', got {penalty!r}")
    terms = []
    for axis in range(2, 2 + n):
        d = torch.diff(field, dim=axis)
        terms.append((d * d if penalty == "l2" else d.abs()).mean())
    return torch.stack(terms).mean()


def _central(x: torch.Tensor, axis: int) -> torch.Tensor:
    """MONAI's spatial_gradient: (x[i+1] - x[i-1]) / 2 along ``axis``, every spatial axis cropped
    by one voxel on both sides."""
    index = [slice(None)] * 2 + [slice(1, -1)] * (x.dim() - 2)
    hi, lo = list(index), list(index)
    hi[axis], lo[axis] = slice(2, None), slice(None, -2)
    return (x[tuple(hi)] - x[tuple(lo)]) / 2.0


def bending_energy(field: torch.Tensor) -> torch.Tensor:
    """Bending energy of a field ``(B, C, *S)`` in voxel units (MONAI ``BendingEnergyLoss``).

    Per voxel and channel: ``sum_a (d2f/da2)^2 + 2 * sum_{a<b} (d2f/dadb)^2`` (cross terms
    counted twice), each second derivative being MONAI's central difference of a central
    difference (step 2, so ``d2f/da2 = (f[a+2] - 2 f[a] + f[a-2]) / 4``), evaluated on the interior
    (2 voxels cropped from each side of every axis, so every axis needs >= 5 voxels). Returns the
    mean over batch, channels and interior voxels. Golden: ``f = x^2`` along any axis gives
    exactly 4; ``f = x * y`` gives 2.
    """
    n = _check_batch(field, "bending_energy", "field")
    if min(field.shape[2:]) < 5:
        raise ValueError(f"bending_energy: every spatial axis needs >= 5 voxels, got "
                         f"{tuple(field.shape[2:])}")
    energy = 0.0
    for a in range(2, 2 + n):
        g = _central(field, a)
        energy = energy + _central(g, a) ** 2
        for b in range(a + 1, 2 + n):
            energy = energy + 2.0 * _central(g, b) ** 2
    return energy.mean()


def soft_dice_loss(probs_fixed: torch.Tensor, probs_warped: torch.Tensor,
                   eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean soft Dice`` of one-hot / probability maps ``(B, L, *S)``.

    Per batch item and channel: ``(2 sum(a b) + eps) / (sum(a) + sum(b) + eps)`` (a channel empty
    in both maps counts as Dice 1); the mean is over batch and channels. Range [0, 1].
    """
    n = _check_pair(probs_fixed, probs_warped, "soft_dice_loss", "probs_fixed and probs_warped")
    axes = tuple(range(2, 2 + n))
    inter = (probs_fixed * probs_warped).sum(dim=axes)
    total = probs_fixed.sum(dim=axes) + probs_warped.sum(dim=axes)
    return 1.0 - ((2.0 * inter + eps) / (total + eps)).mean()


def one_hot(labels: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    """Integer label map ``(B, 1, *S)`` -> float32 one-hot ``(B, len(values), *S)``.

    Channel ``l`` is 1 where ``labels == values[l]``; labels not listed are all-zero columns.
    Floating-point label maps are refused (an interpolated label map is a bug upstream).
    """
    _check_batch(labels, "one_hot", "labels")
    if labels.shape[1] != 1:
        raise ValueError(f"one_hot: labels must have shape (B, 1, *S), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"one_hot: labels must be an integer tensor, got {labels.dtype}")
    values = [int(v) for v in values]
    if not values:
        raise ValueError("one_hot: values must list at least one label value")
    vals = torch.tensor(values, dtype=labels.dtype, device=labels.device)
    vals = vals.view(1, -1, *([1] * (labels.dim() - 2)))
    return (labels == vals).to(torch.float32)
