"""``eoir-batch``: register a cohort (a manifest of pairs, ``batch_manifest.py``), each pair into
``DIR/<id>/`` as ``eoir-register`` would, with a summary (``batch_summary.py``).

Resumable (a pair whose outputs record the same options and inputs is reused), failures isolated
(a refused input is a failed row; the others run; exit status 1 with a count), progress on
stderr and in ``batch_progress.json``. The pairs run on Dask (``dask.distributed``, a dependency):
``--workers N`` local worker processes (``LocalCluster``), or ``--scheduler ADDRESS``, a
running scheduler (e.g. one from ``dask-jobqueue`` on SLURM/PBS/SGE; docs/batch.md). Dask does
the scheduling, the retries of a task that raised (``--retries``) and the re-run of a pair whose
worker died. One worker runs in this process, without Dask.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from EOIRRegistrationLib.cli.batch_manifest import completed_report, read_manifest, resume_key
from EOIRRegistrationLib.cli.batch_pair import row, run_pair
from EOIRRegistrationLib.cli.register import add_registration_options, options_from_args
from EOIRRegistrationLib.core.errors import EOIRError, InputError

#: torch threads per worker when neither --workers nor --threads is given: beyond about 4 a
#: registration gains little from more threads, so more workers use the cores better
DEFAULT_THREADS = 4
#: dask is a dependency of the package; inside 3D Slicer (no pip install of the package) it may
#: be missing from Slicer's Python
DASK_HINT = ("install dask[distributed] into this Python (pip install 'dask[distributed]'; in "
             "3D Slicer: slicer.util.pip_install('dask[distributed]'))")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eoir-batch", description=(
        "Register every pair of MANIFEST (CSV: id, fixed, moving[, moving_labels, fixed_labels]; "
        "paths relative to the manifest) into DIR/<id>/ with eoir-register's outputs, then write "
        "DIR/batch_summary.csv and DIR/batch_overview.png. A re-run reuses the pairs already "
        "done with the same options and inputs. Exit status 1 when a pair failed."))
    p.add_argument("manifest", help="CSV file, one pair a row (docs/batch.md)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--fixed", metavar="TEMPLATE",
                   help="fixed image of every row (every subject to a template)")
    p.add_argument("--moving", metavar="ATLAS", help="moving image of every row (an atlas)")
    p.add_argument("--moving-labels", metavar="FILE",
                   help="moving label map of every row (the atlas's labels, warped to each)")
    p.add_argument("--fixed-labels", metavar="FILE",
                   help="fixed label map of every row (the template's labels: Dice)")
    add_registration_options(p)
    p.add_argument("--workers", type=int, metavar="N",
                   help="local worker processes (default: cores / threads, so that workers x "
                        f"--threads never exceed the cores; threads default {DEFAULT_THREADS}); "
                        "1 runs in this process without Dask")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="address of a running dask.distributed scheduler (e.g. "
                        "tcp://host:8786): its workers run the pairs (--threads each, default 1)")
    p.add_argument("--retries", type=int, default=1,
                   help="Dask re-runs of a pair that raised an unexpected error (default 1; a "
                        "refused input is not retried)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (taskset, cgroups)
    except AttributeError:
        return os.cpu_count() or 1


def plan_workers(workers: int | None, threads: int | None, pairs: int,
                 cores: int) -> tuple[int, int]:
    """(workers, torch threads per worker) with workers x threads <= cores: oversubscribed torch
    runs 10-30x slower on a 2-core machine."""
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be 1 or more, got {workers}")
    if workers is None:
        workers = max(1, min(pairs, cores // (threads or min(DEFAULT_THREADS, cores))))
    threads = threads or max(1, cores // workers)
    if workers * threads > cores:
        raise InputError(f"{workers} workers x {threads} threads exceed the {cores} cores; torch "
                         "slows many times over when oversubscribed: lower --workers or --threads")
    return workers, threads


def dask_distributed():
    """The ``distributed`` module, or an error saying how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise EOIRError(f"eoir-batch on Dask needs dask.distributed: {DASK_HINT}") from exc
    return distributed


class Progress:
    """Pairs done, failures and the estimated time left, on stderr and in ``path`` (JSON, replaced
    atomically; the Slicer runner reads it)."""

    def __init__(self, total: int, reused: int, path: Path, quiet: bool):
        self.total, self.reused, self.path, self.quiet = total, reused, path, quiet
        self.done = self.failed = 0
        self.start = time.perf_counter()
        self.update(None)

    def update(self, finished: dict | None) -> None:
        if finished is not None:
            self.done += 1
            self.failed += finished["status"] == "failed"
        elapsed = time.perf_counter() - self.start
        left = self.total - self.done
        eta = elapsed / self.done * left if self.done else None
        state = {"total": self.total, "done": self.done, "failed": self.failed,
                 "reused": self.reused, "elapsed_seconds": round(elapsed, 1),
                 "eta_seconds": None if eta is None else round(eta, 1),
                 "last": None if finished is None else finished["id"]}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        os.replace(tmp, self.path)
        if finished is not None and not self.quiet:
            what = finished["status"] + (f": {finished['error']}" if finished["error"] else "")
            print(f"[{self.done}/{self.total}] {finished['id']} {what} | {self.failed} failed | "
                  f"{'about ' + _duration(eta) + ' left' if left else _duration(elapsed)}",
                  file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def run_pairs(todo: list, output_dir, options, png: bool, keys: dict, client=None,
              retries: int = 1):
    """Yield the row of each pair of ``todo`` as it finishes: in this process (``client`` None)
    or as Dask tasks on ``client``'s workers. An exception a task still raises after
    ``retries`` (or a worker that died under it too often: ``KilledWorker``) is a failed row."""
    if client is None:
        for pair in todo:
            try:
                yield run_pair(pair, str(output_dir), options, png, keys[pair.id])
            except Exception as exc:  # noqa: BLE001 - isolated: the other pairs go on
                yield row(pair, "failed", error=f"{type(exc).__name__}: {exc}")
        return
    as_completed = dask_distributed().as_completed
    run = uuid.uuid4().hex[:8]  # keys unique on a shared scheduler
    futures = {client.submit(run_pair, pair, str(output_dir), options, png, keys[pair.id],
                             key=f"eoir-pair-{pair.id}-{run}", retries=retries, pure=False): pair
               for pair in todo}
    for future in as_completed(futures):
        try:
            yield future.result()
        except Exception as exc:  # noqa: BLE001 - isolated: the other pairs go on
            yield row(futures[future], "failed", error=f"{type(exc).__name__}: {exc}")


@contextmanager
def dask_client(scheduler: str | None, workers: int):
    """The Dask client of the run: to ``scheduler``, or to a ``LocalCluster`` of ``workers``
    processes (one task each; torch threads come with the options); None for one worker in this
    process."""
    if scheduler is None and workers == 1:
        yield None
        return
    distributed = dask_distributed()
    if scheduler is not None:
        with distributed.Client(scheduler) as client:
            yield client
        return
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        yield client


def has_dask() -> bool:
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.output_dir)
    try:
        options = options_from_args(args)
        pairs = read_manifest(args.manifest, args.fixed, args.moving, args.moving_labels,
                              args.fixed_labels)
        if out.exists() and not out.is_dir():
            raise InputError(f"--output-dir {out} exists and is not a folder")
        if args.retries < 0:
            raise InputError(f"--retries must be 0 or more, got {args.retries}")
        png = not args.no_png
        keys = {p.id: resume_key(p, options, png) for p in pairs}
        rows, todo = {}, []
        for pair in pairs:
            report = completed_report(out / pair.id, keys[pair.id])
            if report is None:
                todo.append(pair)
            else:
                rows[pair.id] = row(pair, "reused", report)
        if args.scheduler is not None:
            workers, threads = 0, args.threads or 1
        else:
            workers, threads = plan_workers(args.workers, args.threads, max(1, len(todo)),
                                            usable_cores())
            if workers > 1 and args.workers is None and not has_dask():
                print(f"eoir-batch: one worker (for {workers} in parallel: {DASK_HINT})",
                      file=sys.stderr)
                workers, threads = plan_workers(1, args.threads, 1, usable_cores())
        if args.scheduler is not None or workers > 1:
            dask_distributed()  # missing: one clear error before anything is written
        options = options.replace(threads=threads)
        if todo:
            from EOIRRegistrationLib.cli.batch_pair import cached_model
            cached_model(options.model)  # a bad model is one clear error, not a failed row each
    except EOIRError as exc:
        print(f"eoir-batch: error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if not args.quiet:
        where = (f"on the Dask scheduler {args.scheduler}" if args.scheduler else
                 f"on {workers} local worker{'s' * (workers > 1)}")
        print(f"eoir-batch: {len(pairs)} pairs, {len(rows)} reused, {len(todo)} to register "
              f"{where}, {threads} thread{'s' * (threads > 1)} each", file=sys.stderr, flush=True)
    from EOIRRegistrationLib.cli.batch_summary import flag_outliers, write_overview, write_summary_csv
    progress = Progress(len(todo), len(rows), out / "batch_progress.json", args.quiet)
    try:
        with dask_client(args.scheduler, workers) as client:
            for finished in run_pairs(todo, out, options, png, keys, client, args.retries):
                rows[finished["id"]] = finished
                progress.update(finished)
    except EOIRError as exc:
        print(f"eoir-batch: error: {exc}", file=sys.stderr)
        return 2
    ordered = [rows[p.id] for p in pairs]
    flag_outliers(ordered)
    write_summary_csv(out / "batch_summary.csv", ordered)
    if png:
        write_overview(out / "batch_overview.png", ordered, title=f"{Path(args.manifest).name}")
    failed = sum(r["status"] == "failed" for r in ordered)
    reused = sum(r["status"] == "reused" for r in ordered)
    outliers = sum(bool(r["outlier"]) for r in ordered)
    print(f"{len(ordered) - failed} of {len(ordered)} pairs registered ({reused} reused), "
          f"{failed} failed, {outliers} outliers; summary in "
          f"{out / 'batch_summary.csv'}")
    return 1 if failed else 0
