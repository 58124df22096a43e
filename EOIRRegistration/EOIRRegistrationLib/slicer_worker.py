"""Runs one registration in a separate process for the Slicer panel (keeps the GUI responsive).

Slicer's embedded Python gives background *threads* little time (the GUI thread holds the
interpreter while Qt runs), so the panel runs the engine in a child process instead
(``PythonSlicer slicer_worker.py JOBDIR``). It needs no MRML, no Qt and not even ``slicer``;
it talks to the panel through files in ``JOBDIR``:

* ``job.json`` (in): file names of the inputs and the engine options (``model``, ``device``,
  ``working_spacing``, ``intensity_window``, ``initial_alignment``, ``refine_iterations``,
  ``refine_seconds``, ``refine_similarity``, ``use_network``, ``contrast``; the last six
  optional: "auto", null (the engine's default number of refinement iterations; 0 = off), 0 = no
  time limit, null (similarity by contrast), null (network by contrast), "auto");
* ``fixed.mha``, ``moving.mha`` and optionally ``labels.mha`` (in): LPS images;
* ``cancel`` (in): created by the panel to ask for a stop (polled between engine stages);
* ``progress.json`` (out): ``{"stage": str, "fraction": float}``, replaced atomically;
* ``displacement.mha``, ``warped.mha``, ``jacobian.mha``, ``folding.mha``,
  ``warped_labels.mha`` and ``result.json`` (out: qa, timings, model_name, device,
  initial_matrix, the 4x4 LPS matrix as nested lists or null, and method, the line saying which
  contrast path ran) on success, exit status 0;
* ``error.json`` (out) ``{"type", "message"}`` on failure, exit status 1 (2 when cancelled).

torch is imported here (through the engine), in the child process only.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

JOB_FILE = "job.json"
CANCEL_FILE = "cancel"
PROGRESS_FILE = "progress.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
LOG_FILE = "worker.log"
OUTPUT_IMAGES = ("displacement", "warped", "jacobian", "folding", "warped_labels")

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 2


def _writeJson(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _engine(spec: str | None):
    """The engine's register function, or ``module:function`` (used by the tests)."""
    if spec:
        import importlib

        moduleName, _, functionName = spec.partition(":")
        return getattr(importlib.import_module(moduleName), functionName)
    from EOIRRegistrationLib.pipeline import register

    return register


def _refine(job: dict):
    """The engine's ``refine`` argument from the job (null iterations: the engine's default)."""
    from EOIRRegistrationLib.refine import config_from_options

    return config_from_options(job.get("refine_iterations"), job.get("refine_seconds"),
                               job.get("refine_similarity"))


def run(jobDir: str | os.PathLike) -> int:
    jobDir = Path(jobDir)
    import SimpleITK as sitk

    try:
        with open(jobDir / JOB_FILE, encoding="utf-8") as f:
            job = json.load(f)
        register = _engine(job.get("engine"))

        def progress(stage, fraction):
            _writeJson(jobDir / PROGRESS_FILE, {"stage": str(stage), "fraction": float(fraction),
                                                "time": time.time()})

        def cancelled():
            return (jobDir / CANCEL_FILE).exists()

        progress("starting", 0.0)
        fixed = sitk.ReadImage(str(jobDir / job["fixed"]))
        moving = sitk.ReadImage(str(jobDir / job["moving"]))
        labels = sitk.ReadImage(str(jobDir / job["labels"])) if job.get("labels") else None
        window = job.get("intensity_window")
        if window is not None:
            window = tuple(tuple(float(v) for v in pair) for pair in window)
        spacing = job.get("working_spacing")
        result = register(fixed, moving, model=job.get("model", "default"),
                          device=job.get("device", "auto"), moving_labels=labels,
                          working_spacing=tuple(spacing) if spacing else None,
                          intensity_window=window, refine=_refine(job),
                          initial_alignment=str(job.get("initial_alignment") or "auto"),
                          contrast=str(job.get("contrast") or "auto"),
                          network=job.get("use_network"),
                          progress=progress, cancel=cancelled)
        for name in OUTPUT_IMAGES:
            image = getattr(result, name, None)
            if image is not None:
                sitk.WriteImage(image, str(jobDir / f"{name}.mha"), useCompression=False)
        _writeJson(jobDir / RESULT_FILE, {
            "qa": {k: float(v) for k, v in dict(getattr(result, "qa", {}) or {}).items()},
            "timings": {k: float(v) for k, v in dict(getattr(result, "timings", {}) or {}).items()},
            "model_name": str(getattr(result, "model_name", "")),
            "device": str(getattr(result, "device", "")),
            "initial_matrix": _matrixList(getattr(result, "initial_matrix", None)),
            "method": str(getattr(result, "method", "")),
        })
        return EXIT_OK
    except BaseException as exc:  # reported to the panel, which shows the reason
        traceback.print_exc()
        _writeJson(jobDir / ERROR_FILE, {"type": exc.__class__.__name__, "message": str(exc)})
        return EXIT_CANCELLED if exc.__class__.__name__ == "RegistrationCancelled" else EXIT_ERROR


def _matrixList(matrix):
    if matrix is None:
        return None
    import numpy as np

    return np.asarray(matrix, dtype=np.float64).reshape(4, 4).tolist()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: slicer_worker.py JOBDIR", file=sys.stderr)
        return EXIT_ERROR
    from EOIRRegistrationLib.allocator import keep_freed_memory

    keep_freed_memory()  # this process exits after its one registration
    return run(argv[0])


if __name__ == "__main__":
    # Run as a script by PythonSlicer: make EOIRRegistrationLib importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
