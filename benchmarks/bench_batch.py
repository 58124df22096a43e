"""Cohort throughput: pairs per hour of ``eoir-batch`` against a shell loop of ``eoir-register``.

The same pairs three ways, on the same machine and the same total threads (--threads):

* ``loop``: one ``python -m EOIRRegistrationLib register`` process per pair, one after the other
  (what a shell loop does: torch imported and the model loaded for every pair);
* ``batch, 1 worker``: ``python -m EOIRRegistrationLib batch --workers 1 --threads T`` (one
  process, the model loaded once);
* ``batch, 2 workers``: ``--workers 2 --threads T/2`` on a Dask ``LocalCluster`` (the ``batch``
  extra).

Pairs: the first --pairs (default 8) of ``bench_real.py``'s real brain pairs with their
perturbed variants (subject 1, subject 2 and MNI152 from /work/shared/data, cropped to the brain,
``bench_real.make_volumes``; MANIFEST.md there), each with its tissue labels on both sides (Dice
in the summary). Every run gets a fresh output folder; wall time from the start of the first
process to the end of the last, imports and cluster start included. Rows: pairs per hour,
seconds per pair (wall / pairs) and the mean Dice after registration (a check that the three
ran the same registrations).

    python benchmarks/bench_batch.py [--data /work/shared/data] [--pairs 8] [--threads 2]
        [--downsample F] [--work-dir DIR] [--register-args '--preset fast'] [--save-results]

--save-results writes the table into benchmarks/results.json, section ``batch`` (the README then
needs a ``<!-- results:batch -->`` block: ``python benchmarks/results.py --write-readme``).
--downsample F resamples every volume to F mm (development and smoke tests only). Exits with 2
when the data folder is missing. Needs no GPU.
"""
from __future__ import annotations

import argparse
import csv
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import bench_real  # the real brain volumes and pairs

HERE = Path(__file__).resolve().parent
ENGINE = HERE.parent / "EOIRRegistration"


def make_manifest(data, work: Path, pairs: int, downsample: float) -> Path:
    """``work/manifest.csv`` of the first ``pairs`` pairs (fixed and moving with tissue labels)."""
    volumes = bench_real.make_volumes(data, work / "volumes", bench_real.VOLUMES, perturbed=True,
                                      downsample=downsample)
    names = bench_real.pair_names(perturbed=True)[:pairs]
    if len(names) < pairs:
        raise SystemExit(f"only {len(names)} pairs available")
    manifest = work / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "fixed", "moving", "moving_labels", "fixed_labels"])
        for name in names:
            fixed, moving = bench_real.split_pair(name)
            writer.writerow([name.replace("<-", "_from_").replace("~", "_"),
                             volumes[fixed]["image"], volumes[moving]["image"],
                             volumes[moving]["tissue"], volumes[fixed]["tissue"]])
    return manifest


def _python(args, env) -> None:
    run = subprocess.run([sys.executable, "-m", "EOIRRegistrationLib", *args], env=env,
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"failed: {shlex.join(args)}\n{run.stderr[-2000:]}")


def run_loop(manifest: Path, out: Path, threads: int, extra: list, env) -> float:
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    start = time.perf_counter()
    for r in rows:
        _python(["register", r["fixed"], r["moving"], "--output-dir", str(out / r["id"]),
                 "--moving-labels", r["moving_labels"], "--fixed-labels", r["fixed_labels"],
                 "--threads", str(threads), "--quiet", *extra], env)
    return time.perf_counter() - start


def run_batch(manifest: Path, out: Path, workers: int, threads: int, extra: list, env) -> float:
    start = time.perf_counter()
    _python(["batch", str(manifest), "--output-dir", str(out), "--workers", str(workers),
             "--threads", str(threads), "--quiet", *extra], env)
    return time.perf_counter() - start


def mean_dice(out: Path, ids: list[str]) -> float | None:
    import json
    values = [json.loads((out / i / "report.json").read_text()).get("dice", {}).get("mean_after")
              for i in ids]
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 3) if values else None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="threads of the whole run")
    ap.add_argument("--downsample", type=float, default=1.0)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--register-args", default="",
                    help="eoir-register options for every run, e.g. '--preset fast'")
    ap.add_argument("--save-results", action="store_true")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"data folder {args.data} not found", file=sys.stderr)
        return 2
    import tempfile
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-batch-"))
    manifest = make_manifest(args.data, work, args.pairs, args.downsample)
    with open(manifest, newline="") as f:
        ids = [r["id"] for r in csv.DictReader(f)]
    env = {**os.environ, "PYTHONPATH": str(ENGINE)}
    extra = shlex.split(args.register_args) + ["--no-png"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = [("shell loop of eoir-register (one process a pair)", "loop", None),
            ("eoir-batch, 1 worker (one process, model loaded once)", "batch", 1),
            ("eoir-batch, 2 workers (Dask LocalCluster)", "batch", 2)]
    rows = []
    for label, kind, workers in runs:
        out = work / f"out-{kind}-{workers or 0}-{stamp}"
        if kind == "loop":
            seconds = run_loop(manifest, out, args.threads, extra, env)
        else:
            seconds = run_batch(manifest, out, workers, max(1, args.threads // workers), extra,
                                env)
        rows.append({"label": label, "pairs_per_hour": round(len(ids) / seconds * 3600, 1),
                     "seconds": round(seconds / len(ids), 2), "dice": mean_dice(out, ids)})
        print(f"{label}: {seconds:.1f} s for {len(ids)} pairs, {rows[-1]['pairs_per_hour']} "
              f"pairs/hour, mean Dice {rows[-1]['dice']}", flush=True)
    if args.save_results:
        import results
        results.record("batch", rows, {
            "source": "benchmarks/bench_batch.py", "first_header": "how",
            "measured": time.strftime("%Y-%m"),
            "machine": f"{os.cpu_count()} CPUs, {args.threads} threads per run in all, "
                       f"{len(ids)} real brain pairs at {args.downsample:g} mm"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
