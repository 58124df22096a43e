"""Same contrast or two contrasts? Decided from the two images after the initial alignment.

The bundled models were trained on pairs that share one intensity mapping, and LNCC assumes a
locally linear one; on two contrasts both mislead. On the real T1 subject against held-out label
maps rendered T2-like (benchmarks/bench_cross_contrast.py --brain): the network with LNCC
refinement reaches label Dice 0.31, the MIND-SSC refinement alone 0.68 (the same pairs rendered
T1-like: 0.745 with the network, 0.70 with the MIND-SSC refinement alone). So "different"
contrasts run the MIND-SSC refinement without the network, and "auto" chooses from the data.

The test is the Pearson correlation of the two normalised images (working grid, moving image
through the initial alignment) over the voxels where *both* have signal, so backgrounds, skull
strips and fields of view do not enter. Measured there: 0.51-0.60 for T1 against T1-like and
0.60 against the MNI152 T1 template; -0.37 to -0.18 for T2-like; -0.17 to 0.40 for random
contrasts (one random intensity per label). On the real-on-real pairs of
benchmarks/bench_real.py: 0.52 between the two subjects, 0.38-0.45 between either subject and the
MNI152 2009 template (brain-masked).
"""
from __future__ import annotations

import torch

from EOIRRegistrationLib.engine.options import CONTRASTS

SIGNAL_FLOOR = 0.05  # normalised intensity [0, 1] above which a voxel counts as signal
# Where the line sits: below every one-contrast pair of real scans measured, the template pairs'
# 0.38-0.45 included (at 0.4 three of the four went to the MIND-SSC path, which lost to the
# network alone: WM/GM Dice 0.63-0.69 against 0.65-0.74), above every real two-contrast pair
# (T2-like at most -0.18). Random-contrast phantoms between 0.30 and 0.40 now take the
# one-contrast path, where the single-contrast network misleads (Dice 0.45 against 0.68 for
# MIND-SSC alone, measured with the earlier refinement); --contrast different overrides.
SAME_CONTRAST_MIN_CORRELATION = 0.3
MIN_VOXELS = 100


def intensity_correlation(fixed: torch.Tensor, moving: torch.Tensor,
                          floor: float = SIGNAL_FLOOR) -> float:
    """Pearson correlation of two same-grid normalised images where both exceed ``floor``;
    NaN when fewer than ``MIN_VOXELS`` voxels qualify or one image is constant there."""
    both = (fixed > floor) & (moving > floor)
    if int(both.sum()) < MIN_VOXELS:
        return float("nan")
    f = fixed[both].double()
    m = moving[both].double()
    f, m = f - f.mean(), m - m.mean()
    denom = (f.square().sum() * m.square().sum()).sqrt()
    return float((f * m).sum() / denom) if denom > 0 else float("nan")


def decide(contrast: str, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[str, float]:
    """("same" | "different", correlation). "auto" gives "different" below
    ``SAME_CONTRAST_MIN_CORRELATION``; an undefined correlation (no overlap of signal) keeps
    "same", the trained models' case."""
    if contrast not in CONTRASTS:
        raise ValueError(f"unknown contrast {contrast!r}; choose one of {', '.join(CONTRASTS)}")
    r = intensity_correlation(fixed, moving)
    if contrast != "auto":
        return contrast, r
    return ("different" if r < SAME_CONTRAST_MIN_CORRELATION else "same"), r


def network_by_default(refine, contrast: str, agnostic: bool) -> bool:
    """Whether the network runs when the options leave it to the engine: alone (the optimisation
    off), and for two contrasts with a contrast-agnostic model. Not before the multi-scale
    optimisation otherwise: on the real brain pairs the bundled network's start left the Dice
    where the optimisation alone takes it (+0.001) and added 1.5-2 s to 5-7 (README,
    Benchmarks; the model card's ``as_optimisation_start``); a single-contrast network misleads
    on two contrasts."""
    return refine is None or (agnostic and contrast == "different")
