"""Step 2 of a registration in Slicer off the scene's thread, with progress and cancel.

:class:`ProcessRegistration` runs the engine in a child Python process (``worker.py``) and is
what the Slicer panel uses: inside Slicer, background Python *threads* get little time while the
GUI thread runs Qt, so a thread would freeze the registration or the GUI.
:class:`BackgroundRegistration` is the thread variant for plain Python hosts. Both take a
``RegistrationOptions`` and give a ``RegistrationResult`` (``result``) or an ``error``.

The worker process opens no console window on Windows, runs in its job folder (so its own file
names are plain ASCII whatever the temporary folder is called) and in a process group of its own:
a cancel that the worker does not honour in time ends it and everything it started (POSIX: the
process group is killed; Windows: ``taskkill /T /F``, the worker's process tree).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import SimpleITK as sitk

from EOIRRegistrationLib.core.errors import RegistrationCancelled
from EOIRRegistrationLib.engine.options import RegistrationOptions
from EOIRRegistrationLib.engine.result import RegistrationResult
from EOIRRegistrationLib.slicer import worker
from EOIRRegistrationLib.slicer.logic import PREPARE_END, RegistrationInputs, RegistrationLogic
from EOIRRegistrationLib.slicer.outputs import ENGINE_END


def workerProcessOptions() -> dict:
    """``subprocess.Popen`` options for the worker: no console window on Windows, and a process
    group of its own (POSIX: a new session, the group's id is the worker's pid) so that
    :func:`killProcessTree` reaches every process it started."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def killProcessTree(process: subprocess.Popen) -> None:
    """End ``process`` (started with :func:`workerProcessOptions`) and the processes it started,
    and reap it. POSIX: SIGKILL to its process group, which also reaches processes it started that
    are still running after it ended. Windows: ``taskkill /T /F`` while it runs."""
    if sys.platform == "win32":
        if process.poll() is None:
            taskkill = os.path.join(os.environ.get("SystemRoot", r"C:\Windows"), "System32",
                                    "taskkill.exe")
            subprocess.run([taskkill if os.path.exists(taskkill) else "taskkill", "/T", "/F",
                            "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, creationflags=subprocess.CREATE_NO_WINDOW)
            process.kill()  # in case taskkill could not (the worker itself must end)
    else:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # the group has ended already
            pass
    process.wait()


class BackgroundRegistration:
    """Runs :meth:`RegistrationLogic.runEngine` in a worker thread (plain Python hosts, e.g. a
    notebook with slicer-core; inside the Slicer application use :class:`ProcessRegistration`).

    The owner polls :meth:`poll` from its own thread; MRML is touched only by the owner.
    ``progress`` holds the latest (stage, fraction, elapsed seconds).
    """

    def __init__(self, inputs: RegistrationInputs, options: RegistrationOptions):
        self.inputs = inputs
        self.cancelEvent = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self.progress = ("starting", 0.0, 0.0)
        self._started = time.perf_counter()
        self._lock = threading.Lock()
        self.options = options
        self._thread = threading.Thread(target=self._run, name="EOIRRegistration", daemon=True)

    def start(self):
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def cancel(self):
        self.cancelEvent.set()

    def _onProgress(self, stage, fraction):
        with self._lock:
            self.progress = (stage, float(fraction), time.perf_counter() - self._started)

    def _run(self):
        try:
            self.result = RegistrationLogic.runEngine(
                self.inputs, self.options, progressCallback=self._onProgress,
                cancelEvent=self.cancelEvent)
        except BaseException as exc:  # reported to the GUI thread through poll()
            self.error = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def poll(self):
        """(stage, fraction, elapsed s, estimated remaining s or None) — safe from any thread."""
        with self._lock:
            stage, fraction, _ = self.progress
        elapsed = time.perf_counter() - self._started
        remaining = None
        if fraction > 0.1:
            remaining = max(0.0, elapsed * (1.0 - fraction) / fraction)
        return stage, fraction, elapsed, remaining

    def wait(self, timeout=None) -> bool:
        self._thread.join(timeout)
        return self.done


class ProcessRegistration:
    """Runs the engine in a child Python process (what the Slicer panel uses).

    Same interface as :class:`BackgroundRegistration`: ``start()``, ``poll()``, ``done``,
    ``cancel()``, ``wait()``, then ``result`` (a ``RegistrationResult``) or ``error``.
    ``pythonExecutable`` is ``PythonSlicer`` inside Slicer (any Python with torch and SimpleITK
    elsewhere). Temporary files are removed when the run ends (``poll``/``wait`` see it end).
    Only string models (a bundled name or a file path) can be passed to another process.
    """

    #: seconds a cancelled worker gets to stop at the next stage before it is killed
    CANCEL_GRACE = 5.0

    def __init__(self, inputs: RegistrationInputs, options: RegistrationOptions,
                 pythonExecutable: str | None = None, engine: str | None = None,
                 tempDir: str | None = None):
        self.inputs = inputs
        self.options = options
        self.pythonExecutable = pythonExecutable or sys.executable
        self._engine = engine
        self._tempDir = tempDir
        self.jobDir: Path | None = None
        self.process = None
        self.result = None
        self.error: BaseException | None = None
        self._started = time.perf_counter()
        self._cancelledAt = None
        self._finished = False
        self._log = None

    def start(self):
        import tempfile

        self.jobDir = Path(tempfile.mkdtemp(prefix="EOIRRegistration-", dir=self._tempDir))
        try:
            sitk.WriteImage(self.inputs.fixedImage, str(self.jobDir / "fixed.mha"),
                            useCompression=False)
            sitk.WriteImage(self.inputs.movingImage, str(self.jobDir / "moving.mha"),
                            useCompression=False)
            job = {"options": self.options.to_dict(), "engine": self._engine,
                   "fixed": "fixed.mha", "moving": "moving.mha", "labels": None}
            if self.inputs.movingLabels is not None:
                sitk.WriteImage(self.inputs.movingLabels, str(self.jobDir / "labels.mha"),
                                useCompression=False)
                job["labels"] = "labels.mha"
            for key, image in (("fixed_labels", self.inputs.fixedLabels),
                               ("fixed_mask", self.inputs.fixedMask),
                               ("moving_mask", self.inputs.movingMask)):
                if image is not None:
                    sitk.WriteImage(image, str(self.jobDir / f"{key}.mha"), useCompression=False)
                    job[key] = f"{key}.mha"
            with open(self.jobDir / worker.JOB_FILE, "w", encoding="utf-8") as f:
                json.dump(job, f)
            self._log = open(self.jobDir / worker.LOG_FILE, "w", encoding="utf-8")
            env = dict(os.environ)
            env["PYTHONUNBUFFERED"] = "1"
            env["PYTHONIOENCODING"] = "utf-8"  # the log is read as UTF-8 (not Windows' code page)
            self._started = time.perf_counter()
            # the worker runs in the job folder and is given ".": the files it reads and writes
            # are named relative to it, in ASCII, whatever characters the folder's path holds
            self.process = subprocess.Popen(
                [self.pythonExecutable, str(Path(worker.__file__).resolve()), "."],
                cwd=str(self.jobDir), stdout=self._log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=env, **workerProcessOptions())
        except BaseException:
            self._cleanup()
            raise
        return self

    def cancel(self):
        if self._cancelledAt is None:
            self._cancelledAt = time.perf_counter()
            if self.jobDir is not None and self.jobDir.exists():
                (self.jobDir / worker.CANCEL_FILE).touch()

    @property
    def done(self) -> bool:
        self._check()
        return self._finished

    def _check(self):
        if self._finished or self.process is None:
            return
        if self.process.poll() is None:
            if self._cancelledAt is not None and \
                    time.perf_counter() - self._cancelledAt > self.CANCEL_GRACE:
                killProcessTree(self.process)
                self.error = RegistrationCancelled("registration cancelled")
                self._cleanup()
            return
        if self._cancelledAt is not None:  # stopped by itself: end what it may have left running
            killProcessTree(self.process)
        try:
            self._collect()
        except BaseException as exc:
            self.error = exc
        finally:
            self._cleanup()

    def _collect(self):
        if self._cancelledAt is not None and self.process.returncode != worker.EXIT_OK:
            self.error = RegistrationCancelled("registration cancelled")
            return
        errorFile = self.jobDir / worker.ERROR_FILE
        if errorFile.exists():
            with open(errorFile, encoding="utf-8") as f:
                self.error = worker.errorFromReport(json.load(f))
            return
        if self.process.returncode != worker.EXIT_OK or not RegistrationResult.saved_in(self.jobDir):
            self.error = RuntimeError(
                f"the registration process stopped unexpectedly (exit status "
                f"{self.process.returncode}); its last output:\n{self.logTail()}")
            return
        self.result = RegistrationResult.load(self.jobDir)

    def logTail(self, characters: int = 2000) -> str:
        try:
            if self._log is not None:
                self._log.flush()
            with open(self.jobDir / worker.LOG_FILE, encoding="utf-8", errors="replace") as f:
                return f.read()[-characters:]
        except (OSError, TypeError):
            return ""

    def _cleanup(self):
        import shutil

        self._finished = True
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.jobDir is not None:
            shutil.rmtree(self.jobDir, ignore_errors=True)

    def poll(self):
        """(stage, fraction of the whole run, elapsed s, estimated remaining s or None)."""
        stage, fraction = "starting", 0.0
        if not self._finished and self.jobDir is not None:
            try:
                with open(self.jobDir / worker.PROGRESS_FILE, encoding="utf-8") as f:
                    info = json.load(f)
                stage = str(info.get("stage", stage))
                fraction = PREPARE_END + (ENGINE_END - PREPARE_END) * float(info.get("fraction", 0))
            except (OSError, ValueError):
                pass
        elif self._finished:
            stage, fraction = ("cancelled" if isinstance(self.error, RegistrationCancelled) else
                               "failed" if self.error is not None else "done"), ENGINE_END
        elapsed = time.perf_counter() - self._started
        remaining = None
        engineFraction = (fraction - PREPARE_END) / (ENGINE_END - PREPARE_END)
        if 0.1 < engineFraction < 1.0:
            remaining = elapsed * (1.0 - engineFraction) / engineFraction
        return stage, min(max(fraction, 0.0), 1.0), elapsed, remaining

    def wait(self, timeout=None) -> bool:
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self.done:
            if deadline is not None and time.perf_counter() > deadline:
                return False
            time.sleep(0.05)
        return True


