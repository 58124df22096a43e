"""The cohort of ``eoir-batch``: the manifest (one pair a row) and what makes a pair's earlier
outputs reusable.

The manifest is a CSV file with a header; columns ``id``, ``fixed``, ``moving`` and optionally
``moving_labels`` and ``fixed_labels`` (any other column is refused: a misspelt
``moving_label`` would silently drop the labels). Paths are relative to the manifest's folder.
``--fixed TEMPLATE`` (every subject to a template), ``--moving ATLAS`` with ``--moving-labels``
(an atlas's labels to every subject) and ``--fixed-labels`` fill their column for every row; the
manifest then leaves that column out. Each id names its output folder ``DIR/<id>/``.

A pair is *complete* when its ``report.json`` records the same resume key (``resume_key``: the
registration options except the thread count, the overview choice, and each input's absolute
path, size and modification time) and its image outputs exist; ``register_files`` writes a
folder all-or-nothing, report included.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from EOIRRegistrationLib.core.errors import InputError
from EOIRRegistrationLib.engine.options import RegistrationOptions

ROLES = ("fixed", "moving", "moving_labels", "fixed_labels")
COLUMNS = ("id",) + ROLES
#: a folder name on every file system, never hidden, never a path
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: the files of the batch itself in the output folder (no pair may take their names)
BATCH_FILES = ("batch_summary.csv", "batch_overview.png", "batch_progress.json")
#: what every complete pair folder holds besides report.json (the rest depends on the run)
CORE_OUTPUTS = ("displacement.nii", "warped.nii.gz", "jacobian.nii", "folding.nii.gz")


@dataclass(frozen=True)
class Pair:
    """One row of the manifest, paths absolute (None: no such input)."""

    id: str
    fixed: str
    moving: str
    moving_labels: str | None = None
    fixed_labels: str | None = None

    def inputs(self) -> dict:
        return {role: getattr(self, role) for role in ROLES}


def read_manifest(path, fixed=None, moving=None, moving_labels=None, fixed_labels=None) -> list[Pair]:
    """The pairs of the manifest at ``path``; the keyword paths fill their column for every row
    (relative to the current folder, like every command-line path). Raises InputError with the
    line at fault."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest not found: {path}")
    fill = {"fixed": fixed, "moving": moving, "moving_labels": moving_labels,
            "fixed_labels": fixed_labels}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [(name or "").strip() for name in (reader.fieldnames or [])]
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read the manifest {path}: {exc}") from exc
    unknown = [name for name in header if name not in COLUMNS]
    if unknown or "id" not in header:
        raise InputError(f"manifest {path}: columns must be id, fixed, moving and optionally "
                         f"moving_labels, fixed_labels; got {', '.join(header) or 'none'}")
    pairs, seen = [], {}
    for line, raw in rows:
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue  # a blank line
        if None in raw:
            raise InputError(f"manifest {path} line {line}: more cells than columns")
        pair_id = row.get("id", "")
        if not ID_PATTERN.match(pair_id) or pair_id in BATCH_FILES:
            raise InputError(f"manifest {path} line {line}: id {pair_id!r} must be a folder name "
                             "of letters, digits, '.', '_' and '-' (not starting with '.', "
                             "'_' or '-')")
        if pair_id in seen:
            raise InputError(f"manifest {path} line {line}: id {pair_id!r} repeats line "
                             f"{seen[pair_id]}")
        seen[pair_id] = line
        values = {}
        for role in ROLES:
            given = row.get(role, "")
            if given and fill[role]:
                flag = "--" + role.replace("_", "-")
                raise InputError(f"manifest {path} line {line}: both the {role} column and "
                                 f"{flag} give the {role.replace('_', ' ')}; keep one")
            if given:
                values[role] = str((path.parent / given).resolve())
            elif fill[role]:
                values[role] = str(Path(fill[role]).resolve())
        for role in ("fixed", "moving"):
            if role not in values:
                raise InputError(f"manifest {path} line {line} ({pair_id}): no {role} image "
                                 f"(a {role} column, or --{role} for every row)")
        pairs.append(Pair(pair_id, **values))
    if not pairs:
        raise InputError(f"manifest {path} lists no pairs")
    return pairs


def _fingerprint(path: str | None):
    """Path, size and modification time: a replaced input makes the pair run again."""
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return {"path": path, "size": None, "mtime_ns": None}
    return {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def resume_key(pair: Pair, options: RegistrationOptions, png: bool) -> dict:
    """What ``report.json`` records (under ``batch``) for the run of ``pair`` to be reused:
    plain JSON values, compared after a JSON round trip. Threads do not change the result."""
    described = options.to_dict()
    described.pop("threads")
    return {"id": pair.id, "options": described, "overview_png": bool(png),
            "inputs": {role: _fingerprint(p) for role, p in pair.inputs().items()}}


def completed_report(pair_dir, key: dict) -> dict | None:
    """The report of an earlier run in ``pair_dir`` when it has the same ``key`` and its outputs
    are all there; None when the pair must run (again)."""
    pair_dir = Path(pair_dir)
    try:
        report = json.loads((pair_dir / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("batch") != key:
        return None
    wanted = list(CORE_OUTPUTS)
    if key["overview_png"]:
        wanted.append("overview.png")
    if key["inputs"]["moving_labels"]:
        wanted.append("warped_labels.nii.gz")
    if all((pair_dir / name).is_file() for name in wanted):
        return report
    return None
