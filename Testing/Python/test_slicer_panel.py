"""The panel's Qt-free decisions (``slicer/panel.py``): model choices, texts, the torch check."""
from __future__ import annotations

import importlib.util
import sys

from EOIRRegistrationLib.core.errors import InputError, RegistrationCancelled
from EOIRRegistrationLib.engine.options import DEFAULT_MODEL
from EOIRRegistrationLib.slicer import catalog, panel


def test_model_choices_list_the_bundled_models_default_first_then_load_file():
    choices = panel.modelChoices("LOAD")
    names = [m.name for m in catalog.listBundledModels()]
    assert [data for _, data, _ in choices] == names + ["LOAD"]
    assert choices[0][1] == DEFAULT_MODEL
    assert all(tip for _, _, tip in choices)


def test_model_description_for_bundled_names_and_files():
    choices = panel.modelChoices("LOAD")
    assert panel.modelDescription(DEFAULT_MODEL, choices) == choices[0][2]
    assert panel.modelDescription("/data/my.pt", choices) == "Model file: /data/my.pt"
    assert panel.modelDescription("unknown", choices) == ""


def test_progress_and_failure_texts():
    assert panel.progressText("refining", 12.4, 3.6) == "refining (12 s, about 4 s left)"
    assert panel.progressText("starting", 0.2, None) == "starting (0 s)"
    assert panel.failureText(RegistrationCancelled("x")) == (
        "Cancelled. The scene was left as it was.", None)
    status, message = panel.failureText(InputError("the fixed volume is 2D"))
    assert status == "Registration failed." and message.endswith("the fixed volume is 2D")


def test_torch_ready_here_and_a_clear_message_without_the_pytorch_extension(monkeypatch):
    shown = []
    assert panel.torchReady(shown.append) == (True, "")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the extension is not installed
    ready, status = panel.torchReady(shown.append)
    assert not ready and "not installed" in status
    assert shown and "'PyTorch' extension" in shown[0]
