"""Quality figures of a registration, each defined once (numpy only: no torch, no scipy).

* Summaries of a Jacobian-determinant map (``folding_fraction``, ``sdlogj``,
  ``jacobian_summary``) take a numpy array (or anything ``np.asarray`` reads, such as a CPU
  torch tensor) and return plain Python floats. The engine, the Slicer outputs, the benchmarks
  and the training validation all use these.
* Label overlap (``dice``, ``mean_dice``) takes integer label arrays in array order ``(k, j, i)``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "STANDARD_30_LABELS",
    "SYNTHSEG_COMPARABLE_LABELS",
    "LOG_CLIP",
    "folding_fraction",
    "sdlogj",
    "jacobian_summary",
    "dice",
    "mean_dice",
]

# FreeSurfer aseg labels of the usual 30-structure brain evaluation.
STANDARD_30_LABELS = (2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31, 41, 42, 43,
                      46, 47, 49, 50, 51, 52, 53, 54, 60, 63)
# The 27 of them that SynthSeg label maps share with FreeSurfer segmentations: SynthSeg's 24 is
# the whole extra-cerebral CSF shell (a few sulcal voxels in FreeSurfer) and SynthSeg has no
# choroid plexus (31, 63). Training on 24 teaches the model to align that shell, which moved
# cortex and deep structures away on real T1 pairs.
SYNTHSEG_COMPARABLE_LABELS = tuple(v for v in STANDARD_30_LABELS if v not in (24, 31, 63))

LOG_CLIP = (1e-9, 1e9)


def _select(det, mask, func: str) -> np.ndarray:
    a = np.asarray(det)
    if mask is None:
        return a.reshape(-1)
    m = np.asarray(mask)
    if m.shape != a.shape:
        raise ValueError(f"{func}: mask shape {tuple(m.shape)} differs from det shape "
                         f"{tuple(a.shape)}")
    return a[m.astype(bool)]


def _folding(a: np.ndarray) -> float:
    return float(np.count_nonzero(a <= 0)) / a.size if a.size else math.nan


_CHUNK = 1 << 22  # values per piece of a large array's SDlogJ (float64 temporaries: ~32 MB)


def _sdlogj(a: np.ndarray) -> float:
    if not a.size:
        return math.nan
    flat = a.reshape(-1)
    logs = lambda x: np.log(np.clip(x.astype(np.float64), *LOG_CLIP))  # noqa: E731
    if flat.size <= _CHUNK:
        return float(np.std(logs(flat)))
    # A CT's 84M values in pieces, two passes (mean, then squared deviations): no float64 copy
    # of the whole array.
    pieces = range(0, flat.size, _CHUNK)
    mean = sum(float(logs(flat[i:i + _CHUNK]).sum()) for i in pieces) / flat.size
    return math.sqrt(sum(float(np.square(logs(flat[i:i + _CHUNK]) - mean).sum())
                         for i in pieces) / flat.size)


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
    empty = not t.size
    return {
        "folding_percent": 100.0 * _folding(t),
        "sdlogj": _sdlogj(t),
        "jacobian_min": math.nan if empty else float(t.min()),
        "jacobian_max": math.nan if empty else float(t.max()),
    }


def label_array(x, func: str) -> np.ndarray:
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
    a = label_array(labels_a, "dice")
    b = label_array(labels_b, "dice")
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


def mean_dice(labels_a, labels_b, values: Sequence[int] | None = None) -> float:
    """Mean of :func:`dice` over ``values`` (default: every nonzero label of ``labels_a``),
    ignoring labels absent from both; NaN when there is none."""
    a = label_array(labels_a, "mean_dice")
    if values is None:
        values = [int(v) for v in np.unique(a) if v != 0]
    scores = [v for v in dice(a, labels_b, values).values() if not math.isnan(v)]
    return float(np.mean(scores)) if scores else math.nan
