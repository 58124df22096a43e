"""``EOIRRegistration.py`` imported against slicer-core, with stand-ins for the pieces only the
Slicer application has (ScriptedLoadableModule base classes, parameterNodeWrapper, qt, ctk,
slicer.app). The module's logic and self-test then run on a real MRML scene with Slicer's
application logic, three slice views (singletons, as in the application) and the module logics.

Used by the ``module_with_stub_application`` fixture (through monkeypatch, undone after the
test) and by child processes that run the self-test (``python slicer_app_stub.py``).
"""
from __future__ import annotations

import importlib.util
import json
import sys
import types
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE_FILE = ROOT / "EOIRRegistration" / "EOIRRegistration.py"


def load_module(setitem=None, setattr_=None):
    """(module, scene): ``EOIRRegistration.py`` loaded with the stand-ins installed through
    ``setitem(mapping, key, value)`` and ``setattr_(object, name, value)`` (plain assignment by
    default; the fixture passes monkeypatch's)."""
    import slicer

    from EOIRRegistrationLib.slicer import bridge

    setitem = setitem or (lambda mapping, key, value: mapping.__setitem__(key, value))
    setattr_ = setattr_ or setattr
    scene, app_logic = bridge.createStandaloneScene()
    for name in ("Red", "Yellow", "Green"):
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        composite.SetSingletonTag(name)
        scene.AddNode(composite)

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            return scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            print(message, flush=True)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = lambda choices: ("Choice", tuple(choices))
    pnw.WithinRange = lambda low, high: ("WithinRange", low, high)
    app = types.SimpleNamespace(applicationLogic=lambda: app_logic, temporaryPath="/tmp",
                                testingEnabled=lambda: True)
    for name, module in (("slicer.ScriptedLoadableModule", slm),
                         ("slicer.parameterNodeWrapper", pnw),
                         ("qt", types.ModuleType("qt")), ("ctk", types.ModuleType("ctk"))):
        setitem(sys.modules, name, module)
    setattr_(slicer, "app", app)
    setattr_(slicer, "mrmlScene", scene)
    spec = importlib.util.spec_from_file_location("EOIRRegistration_under_test", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, scene


class NoModule:
    """A ``sys.meta_path`` finder under which importing one of ``names`` (or a submodule) raises
    ModuleNotFoundError, as Python does for a package that is not installed: "torch" (and
    "scipy", which Slicer does not ship either) is a Slicer where the PyTorch extension has not
    installed torch yet; "torch._C" a broken torch; a package module a broken engine."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if any(fullname == name or fullname.startswith(name + ".") for name in self.names):
            raise ModuleNotFoundError(f"No module named '{fullname}'", name=fullname)
        return None


def run_self_test(how: str) -> dict:
    """Run the module's self-test the way Slicer does: ``how`` = "testing" (``Slicer --testing``:
    unittest loads each test_ method) or "reload" (Reload and Test: ``runTest``). Returns what
    ran, failed and was skipped (with the reasons)."""
    module, _ = load_module()
    if how == "testing":
        suite = unittest.TestLoader().loadTestsFromTestCase(module.EOIRRegistrationTest)
    else:
        suite = unittest.TestSuite([module.EOIRRegistrationTest("runTest")])
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(suite)
    return {"ran": result.testsRun, "successful": result.wasSuccessful(),
            "failures": [f"{test.id()}: {text}" for test, text in result.failures + result.errors],
            "skipped": {test.id().rpartition(".")[2]: reason for test, reason in result.skipped},
            "torch_loaded": "torch" in sys.modules}


if __name__ == "__main__":
    # python slicer_app_stub.py testing|reload [MODULE,...]: the self-test with those modules made
    # unimportable; prints the summary (JSON) as the last line
    if len(sys.argv) > 2:
        sys.meta_path.insert(0, NoModule(sys.argv[2].split(",")))
    sys.path.insert(0, str(ROOT / "EOIRRegistration"))
    print(json.dumps(run_self_test(sys.argv[1])))
