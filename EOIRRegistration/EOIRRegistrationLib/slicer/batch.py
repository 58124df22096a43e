"""A cohort from Slicer's Python console: ``eoir-batch`` (``cli/batch.py``) in a child process.

Like :class:`runners.ProcessRegistration` the work runs in ``PythonSlicer`` beside the
application (background threads get little time while Qt runs), through the command line itself
(``python -m EOIRRegistrationLib batch``): the same manifest, outputs, resume and summary, and
the run can be repeated from a terminal (``commandLine``). Its
``RegistrationOptions`` become the command's flags (``batchArguments``). Progress comes from
``DIR/batch_progress.json``; :meth:`BatchRegistration.cancel` stops the child (a later run
resumes where it stopped). Several workers need Dask in Slicer's Python
(``slicer.util.pip_install("dask[distributed]")``); one worker needs nothing more.
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from EOIRRegistrationLib.engine.options import RegistrationOptions, options_of

#: the folder holding EOIRRegistrationLib: the child's import path
ENGINE_DIR = Path(__file__).resolve().parents[2]
#: ``python -m EOIRRegistrationLib`` with ENGINE_DIR importable (PythonSlicer's launcher sets its
#: own PYTHONPATH; the module folder is on Slicer's path only): the arguments follow
_BOOT = ("import runpy, sys; sys.path.insert(0, {!r}); "
         "runpy.run_module('EOIRRegistrationLib', run_name='__main__', alter_sys=True)")


def batchArguments(options: RegistrationOptions, tempDir: str | os.PathLike) -> list[str]:
    """The eoir-batch flags of ``options`` (an initial transform is written as an ITK file into
    ``tempDir``; LPS, fixed point -> moving point, as the option holds it)."""
    o = options
    args = ["--model", o.model, "--device", o.device, "--init", o.initial_alignment,
            "--contrast", o.contrast, "--preset", o.preset]
    if o.threads is not None:
        args += ["--threads", str(o.threads)]
    if o.working_spacing is not None:
        args += ["--working-spacing", *(repr(v) for v in o.working_spacing)]
    if o.intensity_window is not None:
        args += ["--intensity-window", *(repr(v) for pair in o.intensity_window for v in pair)]
    if o.initial_transform is not None:
        import SimpleITK as sitk
        transform = sitk.AffineTransform(3)
        transform.SetMatrix([v for row in o.initial_transform[:3] for v in row[:3]])
        transform.SetTranslation([row[3] for row in o.initial_transform[:3]])
        path = str(Path(tempDir) / "initial_transform.tfm")
        sitk.WriteTransform(transform, path)
        args += ["--initial-transform", path]
    if o.network is not None:
        args.append("--network" if o.network else "--no-network")
    if o.refine_iterations is not None:
        args += ["--refine", str(o.refine_iterations)]
    if o.refine_seconds is not None:
        args += ["--refine-seconds", repr(o.refine_seconds)]
    if o.refine_similarity is not None:
        args += ["--refine-similarity", o.refine_similarity]
    return args


class BatchRegistration:
    """``eoir-batch MANIFEST --output-dir DIR`` in a child process: ``start()``, ``poll()``,
    ``done``, ``cancel()``, ``wait()``, then ``returncode`` (0: every pair registered, 1: some
    failed, 2: nothing ran, e.g. a bad manifest) and ``rows()`` (``DIR/batch_summary.csv``)."""

    def __init__(self, manifest, outputDir, options: RegistrationOptions | None = None,
                 workers: int | None = None, png: bool = True,
                 pythonExecutable: str | None = None, **optionChanges):
        self.options = options_of(options, **optionChanges)  # checked before anything runs
        self.manifest, self.outputDir = str(manifest), Path(outputDir)
        self.workers, self.png = workers, png
        self.pythonExecutable = pythonExecutable or sys.executable
        self.process = None
        self.command: list[str] = []
        #: the same run for a terminal (an initial transform file is temporary)
        self.commandLine = ""
        self._tempDir = None
        self._log = None
        self._started = 0.0

    def start(self):
        self._tempDir = tempfile.TemporaryDirectory(prefix="EOIRRegistration-batch-")
        arguments = [self.manifest, "--output-dir", str(self.outputDir),
                     *batchArguments(self.options, self._tempDir.name)]
        if self.workers is not None:
            arguments += ["--workers", str(self.workers)]
        if not self.png:
            arguments.append("--no-png")
        self.commandLine = shlex.join(["eoir-batch", *arguments])
        self.command = [self.pythonExecutable, "-c", _BOOT.format(str(ENGINE_DIR)), "batch",
                        *arguments]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(Path(self._tempDir.name) / "batch.log", "w+", encoding="utf-8")
        self._started = time.time()
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env)
        return self

    @property
    def done(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    @property
    def returncode(self):
        return None if self.process is None else self.process.poll()

    def poll(self) -> dict:
        """``{"total", "done", "failed", "reused", "eta_seconds", ...}`` of this run (zeros
        until the child has planned it)."""
        state = {"total": 0, "done": 0, "failed": 0, "reused": 0, "eta_seconds": None}
        path = self.outputDir / "batch_progress.json"
        try:
            if path.stat().st_mtime >= self._started - 1:  # not an earlier run's
                state.update(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
        return state

    def cancel(self):
        """Stop the child; the pairs already written stay and a later run reuses them."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait()

    def wait(self, timeout=None) -> bool:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def output(self) -> str:
        """What the command printed (progress, errors, the final count)."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def rows(self) -> list[dict]:
        """``DIR/batch_summary.csv``: one dict a pair (id, status, figures, outlier, error)."""
        with open(self.outputDir / "batch_summary.csv", newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))


def runBatch(manifest, outputDir, options: RegistrationOptions | None = None, wait: bool = False,
             **kwargs) -> BatchRegistration:
    """Start (and with ``wait`` finish) a cohort; ``kwargs``: ``workers``, ``png``,
    ``pythonExecutable`` and ``RegistrationOptions`` fields (``device="cpu"``, ...)."""
    run = BatchRegistration(manifest, outputDir, options, **kwargs).start()
    if wait:
        run.wait()
    return run
