"""Intensity windows named by model cards (intensity.py) against order statistics by hand."""
import numpy as np
import pytest
import torch

from EOIRRegistrationLib.core.intensity import normalize, window_of


def _percentile_by_hand(values: np.ndarray, p: float) -> float:
    """Linear interpolation between the order statistics around rank (n - 1) p / 100."""
    s = np.sort(values)
    h = (len(s) - 1) * p / 100.0
    lo = int(np.floor(h))
    return float(s[lo] + (h - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo]))


def test_percentile_window_matches_sorted_order_statistics():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(17, 23, 29, generator=g) ** 3 * 900 - 100
    low, high = window_of(image)
    flat = image.reshape(-1).double().numpy()
    assert low == pytest.approx(_percentile_by_hand(flat, 0.5), rel=1e-6)
    assert high == pytest.approx(_percentile_by_hand(flat, 99.5), rel=1e-6)
    assert window_of(image, {"method": "percentile", "low": 0, "high": 100}) == \
        pytest.approx((float(image.min()), float(image.max())))
    assert window_of(image, {"method": "window", "low": -50, "high": 80}) == (-50.0, 80.0)
    out = normalize(image.clone(), (low, high))
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    with pytest.raises(ValueError, match="unknown intensity normalisation"):
        window_of(image, {"method": "zscore"})
