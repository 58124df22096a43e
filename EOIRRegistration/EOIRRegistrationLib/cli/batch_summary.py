"""What ``eoir-batch`` writes about the cohort: ``batch_summary.csv`` (one row a pair: status,
QA figures, outlier flags, the error of a failed pair) and ``batch_overview.png`` (each figure
across the cohort, outliers named).

An outlier is a pair whose Dice after registration, folding % or SDlogJ lies beyond the cohort's
median +- 3 MAD, the MAD scaled by 1.4826 to estimate a standard deviation (Leys et al. 2013),
and beyond a floor (``FLOORS``) so that a cohort of near-identical figures (folding 0 % everywhere
but one 0.001 %) flags nothing that matters. Under ``MIN_PAIRS`` registered pairs nothing is
flagged.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from EOIRRegistrationLib.cli.batch_pair import FIGURES

#: figures checked for outliers and the smallest distance from the median that counts
FLOORS = {"dice_after": 0.02, "folding_percent": 0.01, "sdlogj": 0.02}
MAD_TO_SD = 1.4826
OUTLIER_MADS = 3.0
#: fewer registered pairs give no usable spread: nothing is flagged
MIN_PAIRS = 5
COLUMNS = ("id", "status") + FIGURES + ("outlier", "warnings", "error", "fixed", "moving")
PLOTTED = (("dice_after", "mean Dice after"), ("folding_percent", "folding %"),
           ("sdlogj", "SDlogJ"), ("seconds", "seconds per pair"))


def outlier_bounds(values) -> tuple[float, float] | None:
    """(low, high) of median +- 3 scaled MAD (without the floor); None for under ``MIN_PAIRS``
    values."""
    values = np.asarray([v for v in values if v is not None], dtype=float)
    if values.size < MIN_PAIRS:
        return None
    median = float(np.median(values))
    spread = OUTLIER_MADS * MAD_TO_SD * float(np.median(np.abs(values - median)))
    return median - spread, median + spread


def flag_outliers(rows: list[dict]) -> None:
    """Set each row's ``outlier`` to the figures out of range, e.g. ``"folding_percent high"``."""
    ok = [r for r in rows if r["status"] != "failed"]
    flags = {id(r): [] for r in rows}
    for name, floor in FLOORS.items():
        values = [r[name] for r in ok]
        bounds = outlier_bounds(values)
        if bounds is None:
            continue
        median = float(np.median([v for v in values if v is not None]))
        low, high = min(bounds[0], median - floor), max(bounds[1], median + floor)
        for r in ok:
            if r[name] is not None and r[name] < low:
                flags[id(r)].append(f"{name} low")
            elif r[name] is not None and r[name] > high:
                flags[id(r)].append(f"{name} high")
    for r in rows:
        r["outlier"] = "; ".join(flags[id(r)])


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_summary_csv(path, rows: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS}
                             for r in rows)
    _atomic(Path(path), write)


def write_overview(path, rows: list[dict], title: str = "") -> None:
    """One strip per figure: every pair a dot (outliers red and named), the median and the
    outlier range shaded; failed pairs listed underneath."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] != "failed"]
    failed = [r for r in rows if r["status"] == "failed"]
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 4.2))
    for ax, (name, label) in zip(axes, PLOTTED):
        points = [(r["id"], r[name], name in r.get("outlier", "")) for r in ok
                  if r[name] is not None]
        ax.set_title(label)
        ax.set_xticks([])
        if not points:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
            continue
        values = np.array([v for _, v, _ in points], dtype=float)
        x = np.random.default_rng(0).uniform(-0.25, 0.25, len(values))  # jitter: dots stay apart
        bounds = outlier_bounds(values) if name in FLOORS else None
        if bounds is not None:
            median = float(np.median(values))
            low = min(bounds[0], median - FLOORS[name])
            high = max(bounds[1], median + FLOORS[name])
            ax.axhspan(low, high, color="0.9", label="median +- 3 MAD")
        ax.axhline(float(np.median(values)), color="0.4", lw=1, label="median")
        flagged = np.array([f for _, _, f in points])
        ax.scatter(x[~flagged], values[~flagged], s=18, color="tab:blue")
        ax.scatter(x[flagged], values[flagged], s=30, color="tab:red")
        for xi, (pair_id, value, flag) in zip(x, points):
            if flag:
                ax.annotate(pair_id, (xi, value), fontsize=7, color="tab:red",
                            xytext=(4, 2), textcoords="offset points")
        ax.set_xlim(-0.6, 0.6)
    if axes[0].get_legend_handles_labels()[0]:  # nothing registered: no lines to name
        axes[0].legend(fontsize=7, loc="lower left")
    note = f"{len(ok)} pairs registered, {len(failed)} failed"
    if failed:
        shown = ", ".join(r["id"] for r in failed[:12]) + (" ..." if len(failed) > 12 else "")
        note += f": {shown}"
    fig.suptitle((title + "\n" if title else "") + note, fontsize=10)
    fig.tight_layout()
    _atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
