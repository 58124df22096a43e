"""The module's self-test (``EOIRRegistrationTest``, what ``Slicer --testing`` and Reload and Test
run) on slicer-core, each run in a child process the way Slicer runs it (``slicer_app_stub.py``):

* without torch (``import torch`` raising ModuleNotFoundError, as in a Slicer before the PyTorch
  extension installed it, and without scipy, which Slicer does not ship): it passes, the scene,
  transform, overlay and cancel checks run, and the registration test is skipped with a message
  naming the PyTorch extension;
* with torch: the registration test runs the real engine and passes;
* with torch broken, or the engine not importing: it fails (no skip hides it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core is not installed", allow_module_level=True)

STUB = Path(__file__).with_name("slicer_app_stub.py")
ENGINE_TEST = "test_RegisterSyntheticPair"
#: what each torch-free check reports when it passed (the summaries the checks return)
SCENE_CHECK_REPORTS = ("round trip of a (24, 20, 16) oblique volume", "known field:", "overlays:",
                       "scene left as it was after a cancel and an error",
                       "Cancel before the engine: scene left as it was")


def run_self_test(how: str, unimportable: tuple[str, ...] = ()):
    """(summary, output) of the self-test run in a child process as Slicer runs it."""
    command = [sys.executable, str(STUB), how] + ([",".join(unimportable)] if unimportable else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny volumes; two cores shared
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    output = completed.stdout + completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1]), output


@pytest.mark.parametrize("how", ["testing", "reload"])
def test_self_test_passes_without_torch_and_says_the_registration_was_skipped(how):
    summary, output = run_self_test(how, ("torch", "scipy"))
    assert summary["successful"], "\n".join(summary["failures"])
    assert not summary["torch_loaded"]
    for report in SCENE_CHECK_REPORTS:
        assert report in output, f"{report!r} not reported:\n{output[-3000:]}"
    if how == "testing":  # Slicer --testing: each test_ method, the engine one skipped
        assert summary["ran"] == 3 and list(summary["skipped"]) == [ENGINE_TEST]
        reason = summary["skipped"][ENGINE_TEST]
    else:  # Reload and Test: runTest passes and shows why the registration was not tested
        assert summary["ran"] == 1 and not summary["skipped"]
        reason = output.split(f"{ENGINE_TEST} skipped: ", 1)[1].splitlines()[0]
    assert "PyTorch is not installed" in reason and "PyTorch extension" in reason
    assert "Dice" not in output  # the registration did not run


def test_self_test_runs_the_registration_with_torch():
    summary, output = run_self_test("testing")
    assert summary["successful"], "\n".join(summary["failures"])
    assert summary["ran"] == 3 and summary["skipped"] == {} and summary["torch_loaded"]
    assert "Dice " in output and "folding" in output  # checkRegistration's summary line
    for report in SCENE_CHECK_REPORTS:
        assert report in output


@pytest.mark.parametrize("broken", ["torch._C", "EOIRRegistrationLib.engine.pipeline"])
def test_a_broken_torch_or_engine_fails_the_self_test(broken):
    summary, _ = run_self_test("testing", (broken,))
    assert not summary["successful"] and summary["skipped"] == {}
    assert len(summary["failures"]) == 1 and ENGINE_TEST in summary["failures"][0]
    assert f"No module named '{broken}'" in summary["failures"][0]
