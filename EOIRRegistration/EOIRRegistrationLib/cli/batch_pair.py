"""One pair of a cohort, as a worker runs it (in the driver's process, or as a Dask task in a
worker process): the model loaded once per process, the pair written by ``register_files`` into
``DIR/<id>/``, a summary row returned (plain values: it travels back to the driver).

An input the engine refuses (``EOIRError``: a corrupt file, a label map off the image) is a
failed row, not an exception: it would fail the same way on any worker, so Dask must not retry
it. Anything else (out of memory, a crash) is raised for Dask to retry (``retries=``).
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

from EOIRRegistrationLib.cli.batch_manifest import Pair
from EOIRRegistrationLib.core.errors import EOIRError
from EOIRRegistrationLib.engine.options import RegistrationOptions

#: the figures each row carries (``batch_summary.py`` writes and plots them)
FIGURES = ("dice_before", "dice_after", "folding_percent", "sdlogj", "jacobian_min", "seconds")


@functools.lru_cache(maxsize=2)
def cached_model(spec: str):
    """``resolve_model(spec)`` once per process: every pair a worker runs shares the model."""
    from EOIRRegistrationLib.engine.modelfile import resolve_model
    return resolve_model(spec)


@functools.cache
def _prepare_process(threads: int | None) -> None:
    """Once per worker process: keep freed memory (the process lives for the batch only, see
    ``engine/allocator.py``) and give ITK the pair's thread count, as torch gets it in
    ``register``, so that workers x threads stay within the cores."""
    from EOIRRegistrationLib.engine.allocator import keep_freed_memory
    keep_freed_memory()
    if threads is not None:
        import SimpleITK as sitk
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def row(pair: Pair, status: str, report: dict | None = None, error: str = "",
        seconds: float | None = None) -> dict:
    """The summary row of a pair: its figures from ``report`` (None where they do not apply)."""
    values = dict.fromkeys(FIGURES)
    if report is not None:
        quality = report.get("quality", {})
        dice = report.get("dice") or {}
        values.update(dice_before=dice.get("mean_before"), dice_after=dice.get("mean_after"),
                      folding_percent=quality.get("folding_percent"),
                      sdlogj=quality.get("sdlogj"), jacobian_min=quality.get("jacobian_min"),
                      seconds=report.get("seconds", {}).get("total"))
    if seconds is not None:
        values["seconds"] = seconds
    values = {k: None if v is None else round(float(v), 6) for k, v in values.items()}
    return {"id": pair.id, "status": status, **values,
            "warnings": len((report or {}).get("warnings", [])), "error": error,
            "fixed": pair.fixed, "moving": pair.moving}


def run_pair(pair: Pair, output_dir: str, options: RegistrationOptions, png: bool,
             key: dict) -> dict:
    """Register ``pair`` into ``output_dir/<id>/`` (``report.json`` records ``key`` under
    ``batch``, ``batch_manifest.resume_key``); returns its summary row."""
    from EOIRRegistrationLib.cli.outputs import register_files
    _prepare_process(options.threads)
    start = time.perf_counter()
    try:
        report = register_files(pair.fixed, pair.moving, str(Path(output_dir) / pair.id), options,
                                moving_labels=pair.moving_labels, fixed_labels=pair.fixed_labels,
                                png=png, overwrite=True,
                                amend_report=lambda report, _: report.update(batch=key),
                                loaded_model=cached_model(options.model))
    except EOIRError as exc:
        return row(pair, "failed", error=str(exc), seconds=time.perf_counter() - start)
    return row(pair, "registered", report)
