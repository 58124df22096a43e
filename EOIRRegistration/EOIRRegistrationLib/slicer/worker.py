"""Runs one registration in a separate process for the Slicer panel (keeps the GUI responsive).

Slicer's embedded Python gives background *threads* little time (the GUI thread holds the
interpreter while Qt runs), so the panel runs the engine in a child process instead
(``PythonSlicer worker.py JOBDIR``; ``runners.py`` starts it in ``JOBDIR`` with ``.``, so the
paths ITK opens here are plain ASCII even where the temporary folder's path is not). It needs no
MRML, no Qt and not even ``slicer``; it talks to the panel through files in ``JOBDIR`` (text
files in UTF-8):

* ``job.json`` (in): ``{"options": RegistrationOptions.to_dict(), "fixed", "moving", "labels"
  (file names, labels may be null), optionally "fixed_labels", "fixed_mask", "moving_mask"
  (file names), "engine" (null, or ``module:function`` for tests)}``;
* ``fixed.mha``, ``moving.mha`` and optionally ``labels.mha``, ``fixed_labels.mha``,
  ``fixed_mask.mha``, ``moving_mask.mha`` (in): LPS images;
* ``cancel`` (in): created by the panel to ask for a stop (polled between engine stages);
* ``progress.json`` (out): ``{"stage": str, "fraction": float}``, replaced atomically;
* the engine's ``RegistrationResult.save`` (out: its images as ``.mha`` and ``result.json``,
  written last) on success, exit status 0;
* ``error.json`` (out) ``{"type", "message"}`` on failure, exit status 1 (2 when cancelled).

torch is imported here (through the engine), in the child process only.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

JOB_FILE = "job.json"
CANCEL_FILE = "cancel"
PROGRESS_FILE = "progress.json"
ERROR_FILE = "error.json"
LOG_FILE = "worker.log"

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
    from EOIRRegistrationLib.engine.pipeline import register

    return register


#: the first torch built for numpy 2; older ones (2.2 is the last for Intel Macs) need numpy 1.x
TORCH_FOR_NUMPY2 = (2, 3)


def torchNumpyProblem(torchVersion: str, numpyVersion: str) -> str | None:
    """Why this torch cannot exchange arrays with this numpy (torch then fails later with
    "Numpy is not available"), or None when they work together."""
    torchMajorMinor = tuple(int(v) for v in re.findall(r"\d+", torchVersion)[:2])
    if torchMajorMinor >= TORCH_FOR_NUMPY2 or int(numpyVersion.split(".")[0]) < 2:
        return None
    return (f"PyTorch {torchVersion} was built for numpy 1.x and cannot work with this Python's "
            f"numpy {numpyVersion} (on Intel Macs PyTorch stops at 2.2): the registration needs "
            "numpy 1.x here, or PyTorch 2.3 or later")


def errorFromReport(info: dict) -> BaseException:
    """The exception an ``error.json`` describes (the project's own error classes by name)."""
    from EOIRRegistrationLib.core import errors

    errorClass = getattr(errors, str(info.get("type", "")), None)
    message = str(info.get("message", "")) or "the registration process failed"
    if isinstance(errorClass, type) and issubclass(errorClass, BaseException):
        return errorClass(message)
    return RuntimeError(f"{info.get('type', 'Error')}: {message}")


def run(jobDir: str | os.PathLike) -> int:
    jobDir = Path(jobDir)
    import SimpleITK as sitk

    from EOIRRegistrationLib.engine.options import RegistrationOptions

    try:
        with open(jobDir / JOB_FILE, encoding="utf-8") as f:
            job = json.load(f)
        options = RegistrationOptions.from_dict(job["options"])
        if not job.get("engine"):  # the real engine: a torch too old for this numpy fails late
            import numpy
            import torch

            from EOIRRegistrationLib.core.errors import EOIRError

            problem = torchNumpyProblem(torch.__version__, numpy.__version__)
            if problem:
                raise EOIRError(problem)
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
        extra = {key: sitk.ReadImage(str(jobDir / job[key]))
                 for key in ("fixed_labels", "fixed_mask", "moving_mask") if job.get(key)}
        result = register(fixed, moving, options, moving_labels=labels, progress=progress,
                          cancel=cancelled, **extra)
        result.save(jobDir)
        return EXIT_OK
    except BaseException as exc:  # reported to the panel, which shows the reason
        traceback.print_exc()
        _writeJson(jobDir / ERROR_FILE, {"type": exc.__class__.__name__, "message": str(exc)})
        return EXIT_CANCELLED if exc.__class__.__name__ == "RegistrationCancelled" else EXIT_ERROR


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: worker.py JOBDIR", file=sys.stderr)
        return EXIT_ERROR
    from EOIRRegistrationLib.engine.allocator import keep_freed_memory

    keep_freed_memory()  # this process exits after its one registration
    return run(argv[0])


if __name__ == "__main__":
    # Run as a script by PythonSlicer: make EOIRRegistrationLib importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
