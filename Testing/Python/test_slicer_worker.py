"""The worker process the Slicer panel runs (``slicer/runners.py`` ProcessRegistration,
``slicer/worker.py``), for real: a cancel ends the worker and every process it started, and job
folders whose paths hold spaces and non-ASCII characters work (options, results and errors make
the round trip). The engine is a stand-in module the worker imports (``job["engine"]``)."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core is not installed", allow_module_level=True)

import SimpleITK as sitk  # noqa: E402

from EOIRRegistrationLib.core.errors import EOIRError, InputError, RegistrationCancelled  # noqa: E402
from EOIRRegistrationLib.engine.options import RegistrationOptions  # noqa: E402
from EOIRRegistrationLib.slicer import runners, selftest_scene, worker  # noqa: E402
from EOIRRegistrationLib.slicer.logic import RegistrationInputs  # noqa: E402

LIB_PARENT = Path(runners.__file__).resolve().parents[2]
TESTS_DIR = Path(__file__).resolve().parent
#: spaces and characters outside ASCII (Latin, CJK), as in user names and Windows temp folders
AWKWARD = "Temp dir Jürgen Ødegård 日本"

ENGINE_MODULE = '''
import json, os, subprocess, sys, time
from pathlib import Path

from helpers import registration_result


def register(fixed, moving, options=None, *, moving_labels=None, progress=None, cancel=None):
    record = Path(os.environ["EOIR_TEST_RECORD"])
    behaviour = os.environ.get("EOIR_TEST_BEHAVIOUR", "ok")
    if behaviour in ("ignore-cancel", "honour-cancel"):
        # a grandchild that would outlive the worker unless its whole tree is ended
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        record.write_text(json.dumps({"worker": os.getpid(), "grandchild": child.pid}))
        progress("registering", 0.2)
        while behaviour == "ignore-cancel" or not cancel():
            time.sleep(0.05)
        from EOIRRegistrationLib.core.errors import RegistrationCancelled
        raise RegistrationCancelled("cancelled")
    record.write_text(json.dumps({"options": options.to_dict(), "cwd": os.getcwd(),
                                  "labels": moving_labels is not None}), encoding="utf-8")
    if behaviour == "fail":
        from EOIRRegistrationLib.core.errors import InputError
        raise InputError("the volume 'Ødegård 日本' is constant")
    field = sitk_field(fixed)
    return registration_result(fixed, moving, field, moving_labels, options=options)


def sitk_field(fixed):
    import numpy as np
    import SimpleITK as sitk
    d = np.full(tuple(reversed(fixed.GetSize())) + (3,), 1.5)
    field = sitk.GetImageFromArray(d, isVector=True)
    field.CopyInformation(fixed)
    return field
'''


@pytest.fixture
def engine(monkeypatch, tmp_path_factory):
    """The stand-in engine on the worker's path; returns the file it records to."""
    folder = tmp_path_factory.mktemp("engine")
    (folder / "eoir_test_engine.py").write_text(ENGINE_MODULE, encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(folder), str(LIB_PARENT), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    record = folder / "record.json"
    monkeypatch.setenv("EOIR_TEST_RECORD", str(record))
    monkeypatch.delenv("EOIR_TEST_BEHAVIOUR", raising=False)
    return record


def small_inputs(labels=False) -> RegistrationInputs:
    fixed = selftest_scene.obliqueImage(size=(12, 10, 8))
    moving = selftest_scene.obliqueImage(size=(10, 12, 8), phase=0.4)
    inputs = RegistrationInputs(None, None, fixed, moving)
    if labels:
        inputs.movingLabels = sitk.Cast(moving > 600, sitk.sitkUInt8)
        inputs.labelsKind = "labelmap"
    return inputs


def wait_for(predicate, timeout=60.0):
    deadline = time.perf_counter() + timeout
    while not predicate():
        assert time.perf_counter() < deadline, "timed out"
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return not stat.parent.parent.is_dir()  # no /proc here (macOS): os.kill's answer


@pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX; Windows uses taskkill /T")
@pytest.mark.parametrize("behaviour", ["ignore-cancel", "honour-cancel"])
def test_cancel_ends_the_workers_whole_process_tree(engine, monkeypatch, tmp_path, behaviour):
    """A worker that ignores the cancel is killed after the grace period, one that honours it
    stops by itself; either way the grandchild it started is ended too."""
    monkeypatch.setenv("EOIR_TEST_BEHAVIOUR", behaviour)
    job = runners.ProcessRegistration(small_inputs(), RegistrationOptions(),
                                      engine="eoir_test_engine:register", tempDir=str(tmp_path))
    job.CANCEL_GRACE = 1.0
    job.start()
    pids = {}
    try:
        # the worker leads a process group of its own (so the group kill spares this process)
        assert os.getpgid(job.process.pid) == job.process.pid != os.getpgid(0)
        wait_for(lambda: engine.exists() and engine.read_text())
        pids = json.loads(engine.read_text())
        assert pids["worker"] == job.process.pid and running(pids["grandchild"])
        job.cancel()
        assert job.wait(timeout=60)
        assert isinstance(job.error, RegistrationCancelled) and job.result is None
        assert job.process.returncode == (-9 if behaviour == "ignore-cancel" else 2)
        wait_for(lambda: not running(pids["grandchild"]), timeout=10)
        assert list(tmp_path.iterdir()) == []  # job folder removed
    finally:  # leave nothing running when the test fails
        if job.process is not None and job.process.poll() is None:
            runners.killProcessTree(job.process)
        if pids.get("grandchild") and running(pids["grandchild"]):
            os.kill(pids["grandchild"], signal.SIGKILL)


def test_job_folders_with_spaces_and_non_ascii_characters(engine, monkeypatch, tmp_path):
    """The real worker process in a temporary folder named like a Windows profile with spaces
    and accents: the options (a model file path of the same kind) reach the engine intact, the
    worker runs in the job folder, the result and an error message come back."""
    temp = tmp_path / AWKWARD
    temp.mkdir()
    model = str(temp / "modèle ü.pt")
    options = RegistrationOptions(model=model, device="cpu")
    inputs = small_inputs(labels=True)
    job = runners.ProcessRegistration(inputs, options, engine="eoir_test_engine:register",
                                      tempDir=str(temp)).start()
    assert AWKWARD in str(job.jobDir)
    assert job.wait(timeout=120) and job.error is None, f"{job.error}\n{job.logTail()}"
    record = json.loads(engine.read_text(encoding="utf-8"))
    assert RegistrationOptions.from_dict(record["options"]) == options
    assert record["options"]["model"] == model and record["labels"]
    assert Path(record["cwd"]).parent == temp and Path(record["cwd"]).name.startswith("EOIR")
    result = job.result
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.displacement), 1.5)
    assert result.displacement.GetSize() == inputs.fixedImage.GetSize()
    assert result.warped_labels is not None and result.options == options
    assert list(temp.iterdir()) == []

    monkeypatch.setenv("EOIR_TEST_BEHAVIOUR", "fail")
    job = runners.ProcessRegistration(inputs, options, engine="eoir_test_engine:register",
                                      tempDir=str(temp)).start()
    assert job.wait(timeout=120)
    assert isinstance(job.error, InputError)
    assert str(job.error) == "the volume 'Ødegård 日本' is constant"
    assert list(temp.iterdir()) == []


@pytest.mark.parametrize("torch_version, numpy_version, refused", [
    ("2.2.2", "2.1.3", True),   # Intel Mac: the last torch, a numpy 2 Slicer
    ("2.2.2", "1.26.4", False),
    ("1.13.1", "2.0.0", True),
    ("2.3.0", "2.0.0", False),  # the first torch built for numpy 2
    ("2.13.0+cpu", "2.4.6", False),
])
def test_torch_numpy_check(torch_version, numpy_version, refused):
    problem = worker.torchNumpyProblem(torch_version, numpy_version)
    assert (problem is not None) == refused
    if refused:
        assert torch_version in problem and numpy_version in problem and "numpy 1.x" in problem


def test_worker_refuses_a_torch_too_old_for_its_numpy_in_one_line(tmp_path, monkeypatch):
    """Before the engine loads: torch 2.2 with numpy 2 would fail later with "Numpy is not
    available"; the worker says why at once, through error.json."""
    import numpy
    import torch

    monkeypatch.setattr(torch, "__version__", "2.2.2")
    monkeypatch.setattr(numpy, "__version__", "2.1.3")
    job = {"options": RegistrationOptions().to_dict(), "engine": None, "fixed": "fixed.mha",
           "moving": "moving.mha", "labels": None}
    (tmp_path / worker.JOB_FILE).write_text(json.dumps(job), encoding="utf-8")
    assert worker.run(tmp_path) == worker.EXIT_ERROR
    error = worker.errorFromReport(json.loads((tmp_path / worker.ERROR_FILE).read_text("utf-8")))
    assert isinstance(error, EOIRError) and "\n" not in str(error)
    assert str(error).startswith("PyTorch 2.2.2 was built for numpy 1.x")
