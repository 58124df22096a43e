"""eoir-batch in one process (no Dask): the manifest, resume, isolated failures, the summary and
its outliers, the worker plan and the Dask extra's error. The Dask runs: test_batch_dask.py."""
import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import SimpleITK as sitk
from helpers import smooth_blobs

from EOIRRegistrationLib.cli import batch, batch_pair
from EOIRRegistrationLib.cli.batch_manifest import read_manifest
from EOIRRegistrationLib.cli.batch_summary import flag_outliers, write_overview
from EOIRRegistrationLib.core.errors import InputError

ENGINE_DIR = Path(__file__).resolve().parents[2] / "EOIRRegistration"
#: the fastest registration: no alignment, no network, one optimisation step on 24^3 voxels
FAST = ["--init", "none", "--no-network", "--refine", "1", "--preset", "fast", "--quiet"]


def write_cohort(folder: Path, count: int, labels: bool = True) -> list[str]:
    """Pairs s0..s{count-1} of blob phantoms (moving = fixed shifted), a manifest with relative
    paths; returns the ids."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["id,fixed,moving" + (",moving_labels,fixed_labels" if labels else "")]
    for i in range(count):
        fixed, fixed_labels = smooth_blobs(seed=i, size=24)
        moving, moving_labels = smooth_blobs(seed=i, shift_mm=(2.0, -1.0, 1.0), size=24)
        for name, image in (("f", fixed), ("fl", fixed_labels), ("m", moving),
                            ("ml", moving_labels)):
            sitk.WriteImage(image, str(folder / f"{name}{i}.nii.gz"))
        lines.append(f"s{i},f{i}.nii.gz,m{i}.nii.gz" + (f",ml{i}.nii.gz,fl{i}.nii.gz" if labels
                                                         else ""))
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return [f"s{i}" for i in range(count)]


def summary(out: Path) -> dict:
    with open(out / "batch_summary.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_a_cohort_is_registered_resumed_and_a_bad_file_isolated(tmp_path, capsys):
    ids = write_cohort(tmp_path / "data", 3)
    manifest = tmp_path / "data" / "manifest.csv"
    (tmp_path / "data" / "corrupt.nii.gz").write_bytes(b"not a NIfTI file" * 8)
    with open(manifest, "a") as f:
        f.write("bad,f0.nii.gz,corrupt.nii.gz,,\n")
    out = tmp_path / "out"
    batch_pair.cached_model.cache_clear()
    code = batch.main([str(manifest), "--output-dir", str(out), "--workers", "1", *FAST])
    assert code == 1
    assert "3 of 4 pairs registered (0 reused), 1 failed" in capsys.readouterr().out
    rows = summary(out)
    assert [rows[i]["status"] for i in ids] == ["registered"] * 3
    assert rows["bad"]["status"] == "failed" and "corrupt.nii.gz" in rows["bad"]["error"]
    assert not (out / "bad").exists()
    # the model was loaded once for the whole cohort
    assert batch_pair.cached_model.cache_info().misses == 1
    for i in ids:
        report = json.loads((out / i / "report.json").read_text())
        assert float(rows[i]["dice_after"]) == pytest.approx(report["dice"]["mean_after"], abs=1e-6)
        assert float(rows[i]["sdlogj"]) == pytest.approx(report["quality"]["sdlogj"], abs=1e-6)
        assert report["inputs"]["moving"] == str(tmp_path / "data" / f"m{i[1:]}.nii.gz")
        assert (out / i / "warped_labels.nii.gz").is_file()
    assert (out / "batch_overview.png").read_bytes()[:4] == b"\x89PNG"
    progress = json.loads((out / "batch_progress.json").read_text())
    assert progress["done"] == 4 and progress["failed"] == 1 and progress["eta_seconds"] == 0
    before = {i: (out / i / "displacement.nii").stat().st_mtime_ns for i in ids}

    # A re-run reuses the three; a replaced input and a deleted output make their pairs run again.
    os.utime(tmp_path / "data" / "m1.nii.gz", ns=(1, 1))
    (out / "s2" / "jacobian.nii").unlink()
    assert batch.main([str(manifest), "--output-dir", str(out), "--workers", "1", *FAST]) == 1
    rows = summary(out)
    assert {i: rows[i]["status"] for i in ids} == {"s0": "reused", "s1": "registered",
                                                   "s2": "registered"}
    assert (out / "s0" / "displacement.nii").stat().st_mtime_ns == before["s0"]
    assert (out / "s1" / "displacement.nii").stat().st_mtime_ns != before["s1"]
    # Other options: every pair runs again (threads alone would not count).
    capsys.readouterr()
    assert batch.main([str(manifest), "--output-dir", str(out), "--workers", "1", *FAST,
                       "--refine", "2"]) == 1
    assert "3 of 4 pairs registered (0 reused)" in capsys.readouterr().out


def test_template_flags_fill_a_column_and_conflicts_are_refused(tmp_path):
    write_cohort(tmp_path, 2, labels=False)
    manifest = tmp_path / "subjects.csv"
    manifest.write_text("id,moving\na,m0.nii.gz\nb,m1.nii.gz\n")
    pairs = read_manifest(manifest, fixed=str(tmp_path / "f0.nii.gz"),
                          moving_labels=str(tmp_path / "fl0.nii.gz"))
    assert [(p.id, Path(p.fixed).name, Path(p.moving).name, Path(p.moving_labels).name)
            for p in pairs] == [("a", "f0.nii.gz", "m0.nii.gz", "fl0.nii.gz"),
                                ("b", "f0.nii.gz", "m1.nii.gz", "fl0.nii.gz")]
    with pytest.raises(InputError, match="both the moving column and --moving"):
        read_manifest(manifest, fixed="t.nii.gz", moving="atlas.nii.gz")
    with pytest.raises(InputError, match="no fixed image"):
        read_manifest(manifest)


@pytest.mark.parametrize("text, message", [
    ("id,fixed,moving,moving_label\na,f,m,l\n", "columns must be"),
    ("fixed,moving\nf,m\n", "columns must be"),
    ("id,fixed,moving\na,f,m\na,f,m\n", "repeats line 2"),
    ("id,fixed,moving\n../up,f,m\n", "must be a folder name"),
    ("id,fixed,moving\nbatch_summary.csv,f,m\n", "must be a folder name"),
    ("id,fixed,moving\na,f,m,extra\n", "more cells than columns"),
    ("id,fixed,moving\n\n", "lists no pairs"),
])
def test_a_bad_manifest_is_one_clear_error_and_writes_nothing(tmp_path, capsys, text, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    out = tmp_path / "out"
    assert batch.main([str(manifest), "--output-dir", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eoir-batch: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_negative_retries_are_refused_and_write_nothing(tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,fixed,moving\na,f.nii.gz,m.nii.gz\n")
    assert batch.main([str(manifest), "--output-dir", str(tmp_path / "out"), "--retries", "-1"]) == 2
    assert "--retries must be 0 or more, got -1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_workers_times_threads_never_exceed_the_cores():
    assert batch.plan_workers(None, None, pairs=100, cores=2) == (1, 2)
    assert batch.plan_workers(None, None, pairs=100, cores=16) == (4, 4)
    assert batch.plan_workers(None, None, pairs=2, cores=16) == (2, 8)
    assert batch.plan_workers(None, 1, pairs=100, cores=8) == (8, 1)
    assert batch.plan_workers(3, None, pairs=100, cores=8) == (3, 2)
    with pytest.raises(InputError, match="exceed the 2 cores"):
        batch.plan_workers(2, 2, pairs=10, cores=2)
    with pytest.raises(InputError, match="--workers must be 1 or more"):
        batch.plan_workers(0, None, pairs=10, cores=2)


def test_the_overview_of_a_batch_whose_every_pair_failed_is_drawn_without_warnings(tmp_path):
    rows = [{"id": "b", "status": "failed", "outlier": ""}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warned of a legend with nothing in it
        write_overview(tmp_path / "overview.png", rows)
    assert (tmp_path / "overview.png").read_bytes()[:4] == b"\x89PNG"


def test_outliers_are_beyond_median_plus_minus_three_mad():
    figures = [0.80, 0.81, 0.79, 0.80, 0.82, 0.805, 0.50]
    rows = [{"id": f"s{i}", "status": "registered", "dice_after": d, "folding_percent": 0.0,
             "sdlogj": 0.15} for i, d in enumerate(figures)]
    rows[2]["folding_percent"] = 0.005  # under the 0.01 % floor: not flagged
    rows[3]["folding_percent"] = 0.5
    rows.append({"id": "x", "status": "failed", "dice_after": None, "folding_percent": None,
                 "sdlogj": None})
    flag_outliers(rows)
    assert {r["id"]: r["outlier"] for r in rows if r["outlier"]} == {
        "s6": "dice_after low", "s3": "folding_percent high"}
    flag_outliers(rows[:4])  # too few pairs for a spread
    assert not any(r["outlier"] for r in rows[:4])


def test_several_workers_without_dask_say_how_to_install_it(tmp_path):
    write_cohort(tmp_path, 1, labels=False)
    code = ("import sys; sys.modules['distributed'] = None\n"
            "from EOIRRegistrationLib.cli.main import main\n"
            f"sys.exit(main(['batch', {str(tmp_path / 'manifest.csv')!r}, '--output-dir', "
            f"{str(tmp_path / 'out')!r}, '--workers', '2', '--threads', '1']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ENGINE_DIR)}, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "pip install 'dask[distributed]'" in run.stderr and not (tmp_path / "out").exists()
