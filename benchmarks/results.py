"""The one place measured figures live: ``benchmarks/results.json``, and the README tables made
from it.

Each benchmark saves its summary rows into its section of ``results.json`` (``record``); the
README holds each section's table between ``<!-- results:NAME -->`` and ``<!-- /results -->``,
generated here. ``Testing/Python/test_readme_figures.py`` fails when the README and the file
disagree.

    python benchmarks/results.py --write-readme   # regenerate the README tables
    python benchmarks/results.py --check          # exit 1 when they differ
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.json"
README = ROOT / "README.md"
CARDS = ROOT / "EOIRRegistration" / "EOIRRegistrationLib" / "bundled_models"

# (key, header, format, better: "max" / "min" / None) of each column kind
COLUMNS = {
    "size": ("size (x,y,z)", "s", None),
    "dice": ("Dice", ".3f", "max"),
    "mask_dice": ("brain-mask Dice", ".3f", "max"),
    "hd95": ("HD95 mm", ".2f", "min"),
    "error_mm": ("displacement error mm", ".2f", "min"),
    "identity_error_mm": ("identity error mm", ".2f", None),
    "folding_percent": ("folding %", ".3f", None),
    "sdlogj": ("SDlogJ", ".3f", None),
    "seconds": ("seconds", ".1f", "min"),
    "peak_gb": ("peak GB", ".2f", None),
    "pairs_per_hour": ("pairs per hour", ".0f", "max"),
    "residual_mean_mm": ("mean residual mm", ".1e", "min"),
    "residual_p99_mm": ("99th percentile residual mm", ".1e", "min"),
    "residual_max_mm": ("max residual mm", ".1e", "min"),
    "inside_percent": ("inside %", ".1f", None),
    "inverse_seconds": ("inverse seconds", ".1f", "min"),
}
_BLOCK = re.compile(r"(<!-- results:(\w+) -->\n)(.*?)(<!-- /results -->)", re.S)


def load(path: Path = RESULTS) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def record(section: str, rows: list[dict], meta: dict, path: Path = RESULTS) -> None:
    """Replace ``section``'s rows (each with ``label`` and column values; None where a figure
    does not apply) and its metadata (``source``, ``measured``, ``machine``, ...) in the file."""
    data = load(path) if Path(path).exists() else {}
    columns = data.get(section, {}).get("columns") or [
        k for k in COLUMNS if any(row.get(k) is not None for row in rows)]
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
             for row in rows]
    data[section] = {**data.get(section, {}), **meta, "columns": columns, "rows": clean}
    Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    return format(value, fmt)


def render(section: dict) -> str:
    """The markdown table of one section, the best value of each ranked column in bold (a
    ``baseline`` row, such as "no registration", is never ranked)."""
    columns = section["columns"]
    rows = section["rows"]
    ranked = [r for r in rows if not r.get("baseline")]
    best = {}
    for key in columns:
        better = COLUMNS[key][2]
        values = [r[key] for r in ranked if r.get(key) is not None]
        if better and values and section.get("rank", True):
            best[key] = max(values) if better == "max" else min(values)
    lines = ["| " + " | ".join([section.get("first_header", "method")]
                               + [COLUMNS[k][0] for k in columns]) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for row in rows:
        cells = []
        for key in columns:
            text = _cell(row.get(key), COLUMNS[key][1])
            if row in ranked and key in best and row.get(key) == best[key]:
                text = f"**{text}**"
            cells.append(text)
        lines.append("| " + " | ".join([row["label"], *cells]) + " |")
    caption = (f"\n*{section['source']}, {section['measured']}, {section['machine']}.*"
               if "source" in section else "")
    return "\n".join(lines) + "\n" + caption


def render_models(cards_dir: Path = CARDS) -> str:
    """The bundled models' table, from their cards (the ``.json`` beside each ``.pt``)."""
    lines = ["| model | architecture | working grid | trained on | validation Dice (synthetic "
             "pairs) | demo pair, network alone: Dice / displacement error mm |",
             "|---|---|---|---|---|---|"]
    for path in sorted(cards_dir.glob("*.json")):
        card = json.loads(path.read_text(encoding="utf-8"))
        v, d = card["validation"], card["demo_pair"]
        grid = "x".join(f"{s:g}" for s in card["working_spacing_mm"]) + " mm"
        lines.append(
            f"| `{card['name']}` | {card['architecture']} | {grid} | {card['training_data']} | "
            f"{v['val_dice_before']:.3f} -> {v['val_dice_after']:.3f}, folding "
            f"{v['val_folding_percent']:.3f} % | {d['dice_before']:.3f} -> {d['dice_after']:.3f} "
            f"/ {d['mean_displacement_error_mm']:.2f} (identity "
            f"{d['identity_mean_displacement_error_mm']:.2f}) |")
    return "\n".join(lines) + "\n\n*From each model's card (`eoir-models --json`).*\n"


def readme_with_tables(readme: str, data: dict) -> str:
    def block(match):
        name = match.group(2)
        if name == "models":
            return match.group(1) + render_models() + "\n" + match.group(4)
        if name not in data:
            raise KeyError(f"README asks for results section {name!r}, which "
                           f"{RESULTS.name} does not have")
        return match.group(1) + render(data[name]) + "\n" + match.group(4)
    return _BLOCK.sub(block, readme)


def sections_in(readme: str) -> list[str]:
    return [m.group(2) for m in _BLOCK.finditer(readme)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write-readme", action="store_true")
    g.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    readme = README.read_text(encoding="utf-8")
    wanted = readme_with_tables(readme, load())
    if args.write_readme:
        README.write_text(wanted, encoding="utf-8")
        return 0
    if wanted != readme:
        print("README tables differ from benchmarks/results.json: run "
              "python benchmarks/results.py --write-readme", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
