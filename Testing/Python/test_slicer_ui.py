"""The module panel without the Slicer application: the .ui file parses, every widget the code
looks up exists, every ``SlicerParameterName`` matches a parameter-node field of a type its widget
can show, and the module file keeps heavy imports out of module load."""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from EOIRRegistrationLib import slicer_logic

MODULE_DIR = Path(__file__).resolve().parents[2] / "EOIRRegistration"
MODULE_FILE = MODULE_DIR / "EOIRRegistration.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "EOIRRegistration.ui"

#: widget classes the parameterNodeWrapper GUI connectors accept for each field kind
CONNECTOR_WIDGETS = {
    "node": {"qMRMLNodeComboBox"},
    "bool": {"QCheckBox", "QPushButton"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "int": {"QSpinBox", "QSlider"},
    "choice": {"QComboBox"},
    "str": {"QLineEdit", "QTextEdit"},
}


@pytest.fixture(scope="module")
def ui_tree():
    return ET.parse(UI_FILE)


@pytest.fixture(scope="module")
def widgets(ui_tree):
    """name -> (class, {property name: element})"""
    found = {}
    for element in ui_tree.iter("widget"):
        props = {p.get("name"): p for p in element.findall("property")}
        found[element.get("name")] = (element.get("class"), props)
    return found


@pytest.fixture(scope="module")
def module_ast():
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def parameter_fields(module_ast) -> dict:
    """Fields of the @parameterNodeWrapper class: name -> annotation source."""
    for node in module_ast.body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {stmt.target.id: ast.unparse(stmt.annotation) for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in EOIRRegistration.py")


def field_kind(annotation: str) -> str:
    if "vtkMRML" in annotation:
        return "node"
    if "Choice(" in annotation:
        return "choice"
    for kind in ("bool", "float", "int", "str"):
        if re.search(rf"\b{kind}\b", annotation):
            return kind
    raise AssertionError(f"unknown parameter type {annotation}")


def text(prop):
    child = list(prop)[0]
    if child.tag == "stringlist":
        return [s.text for s in child]
    return child.text


def test_ui_file_is_a_slicer_module_panel(ui_tree, widgets):
    root = ui_tree.getroot()
    assert root.tag == "ui" and root.findtext("class") == "EOIRRegistration"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "EOIRRegistration"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {cls for cls, _ in widgets.values()}
    assert {c for c in used if c.startswith(("q", "ctk"))} <= declared
    # every node selector gets the scene from the panel
    connected = {(c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
                 for c in root.iter("connection")}
    for name, (cls, _) in widgets.items():
        if cls == "qMRMLNodeComboBox":
            assert ("mrmlSceneChanged(vtkMRMLScene*)", name, "setMRMLScene(vtkMRMLScene*)") in connected
    # advanced settings start collapsed; the apply button, progress bar and status line exist
    assert text(widgets["advancedCollapsibleButton"][1]["collapsed"]) == "true"
    assert widgets["applyButton"][0] == "QPushButton"
    assert widgets["progressBar"][0] == "QProgressBar"
    assert widgets["statusLabel"][0] == "QLabel"


def test_every_widget_the_code_looks_up_exists(widgets):
    source = MODULE_FILE.read_text(encoding="utf-8")
    looked_up = set(re.findall(r"self\.ui\.(\w+)", source))
    # names used through getattr(self.ui, name) in loops
    looked_up |= set(re.findall(
        r"\"(\w+(?:SpinBox|CollapsibleButton|Selector|ComboBox|CheckBox|Button|Label|Bar))\"", source))
    assert looked_up, "the module looks up no widgets?"
    missing = sorted(looked_up - set(widgets))
    assert not missing, f"widgets used in EOIRRegistration.py but missing from the .ui: {missing}"


def test_parameter_names_match_parameter_node_fields(widgets, module_ast):
    fields = parameter_fields(module_ast)
    bound = {}
    for name, (cls, props) in widgets.items():
        if "SlicerParameterName" in props:
            bound[text(props["SlicerParameterName"])] = (name, cls)
    unknown = sorted(set(bound) - set(fields))
    assert not unknown, f"SlicerParameterName without a parameter-node field: {unknown}"
    for parameter, (widget_name, cls) in bound.items():
        kind = field_kind(fields[parameter])
        assert cls in CONNECTOR_WIDGETS[kind], \
            f"{widget_name} ({cls}) cannot show {parameter}: {fields[parameter]}"
    # every field has a widget, except the model (the combo box lists models with descriptions
    # and a "load model file" entry, so the code manages it)
    assert set(fields) - set(bound) == {"model"}
    assert "self._parameterNode.model = " in MODULE_FILE.read_text(encoding="utf-8")


def test_node_selectors_list_the_node_types_of_their_fields(widgets, module_ast):
    fields = parameter_fields(module_ast)
    for name, (cls, props) in widgets.items():
        if cls != "qMRMLNodeComboBox" or "SlicerParameterName" not in props:
            continue
        annotation = fields[text(props["SlicerParameterName"])]
        node_types = text(props["nodeTypes"])
        assert sorted(node_types) == sorted(re.findall(r"vtkMRML\w+", annotation)), name
    # fixed and moving selectors do not offer label maps
    for name in ("fixedVolumeSelector", "movingVolumeSelector"):
        assert text(widgets[name][1]["showChildNodeTypes"]) == "false"
    # the output transform defaults to a new one
    assert text(widgets["outputTransformSelector"][1]["noneDisplay"]) == "Create new transform"


def test_module_defines_the_five_slicer_classes(module_ast):
    classes = {node.name: [ast.unparse(b) for b in node.bases]
               for node in module_ast.body if isinstance(node, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["EOIRRegistration"]
    assert "ScriptedLoadableModuleWidget" in classes["EOIRRegistrationWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["EOIRRegistrationLogic"]
    assert "ScriptedLoadableModuleTest" in classes["EOIRRegistrationTest"]
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert 'self.parent.categories = ["Registration"]' in source
    for method in ("def registerVolumes(", "def runTest(", "def test_RegisterSyntheticPair("):
        assert method in source


def test_nothing_heavy_is_imported_at_module_load(module_ast):
    allowed = {"logging", "os", "shutil", "sys", "typing", "ctk", "qt", "vtk", "slicer",
               "slicer.ScriptedLoadableModule", "slicer.util", "slicer.parameterNodeWrapper",
               "vtkSlicerSegmentationsModuleMRMLPython"}

    def top_level_imports(body):
        for node in body:
            if isinstance(node, ast.Import):
                yield from (alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                yield node.module
            elif isinstance(node, ast.Try):
                yield from top_level_imports(node.body)
                for handler in node.handlers:
                    yield from top_level_imports(handler.body)

    imported = set(top_level_imports(module_ast.body))
    assert imported <= allowed, f"heavy imports at module load: {sorted(imported - allowed)}"
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "import torch" not in source  # torch runs only in the worker process


def test_lazy_engine_imports_name_things_that_exist(module_ast):
    """Every ``from EOIRRegistrationLib.x import y`` inside the module's functions resolves."""
    pytest.importorskip("slicer")
    import importlib

    checked = 0
    for node in ast.walk(module_ast):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("EOIRRegistrationLib"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                checked += 1
    assert checked >= 5


def test_ui_loads_in_qt(widgets):
    """Load the .ui with Qt's own loader (PySide6, offscreen) when it is installed: custom Slicer
    widgets fall back to their declared base class, every named widget must be created."""
    QtUiTools = pytest.importorskip("PySide6.QtUiTools")
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6 import QtCore, QtWidgets

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    loader = QtUiTools.QUiLoader()
    ui_file = QtCore.QFile(str(UI_FILE))
    assert ui_file.open(QtCore.QFile.ReadOnly)
    panel = loader.load(ui_file)
    ui_file.close()
    assert panel is not None, loader.errorString()
    assert panel.objectName() == "EOIRRegistration"
    for name in set(widgets) - {"EOIRRegistration"}:
        assert panel.findChild(QtCore.QObject, name) is not None, name
    panel.deleteLater()
    app.processEvents()


@pytest.fixture
def module_with_stub_application(monkeypatch):
    """Import EOIRRegistration.py against slicer-core, with stand-ins for the pieces only the
    Slicer application has (ScriptedLoadableModule base classes, parameterNodeWrapper, qt, ctk,
    slicer.app). The logic and the self-test then run on a real MRML scene."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("slicer-core is not installed")
    import importlib.util
    import sys
    import types
    import unittest

    from EOIRRegistrationLib import slicer_bridge

    scene, app_logic = slicer_bridge.createStandaloneScene()

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
            print(message)

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
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    spec = importlib.util.spec_from_file_location("EOIRRegistration_under_test", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, scene


def test_module_logic_and_self_test_run_on_slicer_core(module_with_stub_application):
    module, scene = module_with_stub_application
    import types

    info = module.EOIRRegistration(types.SimpleNamespace())
    assert info.parent.title == "EOIR Registration"
    assert info.parent.categories == ["Registration"]
    assert "cite" in info.parent.helpText.lower() and "TransformFromParent" in info.parent.helpText
    # the module-level class names the parameter node fields the .ui binds
    assert "fixedVolume" in module.EOIRRegistrationParameterNode.__annotations__

    # the Slicer self-test's cancel case, for real on the MRML core
    test = module.EOIRRegistrationTest("test_CancelLeavesSceneAsItWas")
    test.setUp = lambda: scene.Clear(0)
    result = test.defaultTestResult()
    test.run(result)
    assert result.wasSuccessful(), result.errors + result.failures

    # the full self-test when the engine and a bundled model are present
    from EOIRRegistrationLib.slicer_logic import listBundledModels

    try:
        import EOIRRegistrationLib.pipeline  # noqa: F401
        engine = bool(listBundledModels())
    except ModuleNotFoundError:
        engine = False
    if engine:
        test = module.EOIRRegistrationTest("test_RegisterSyntheticPair")
        result = test.defaultTestResult()
        test.run(result)
        assert result.wasSuccessful(), result.errors + result.failures


def _form_rows(ui_tree, section):
    """Widget names inside the collapsible section ``section``."""
    for element in ui_tree.iter("widget"):
        if element.get("name") == section:
            return {w.get("name") for w in element.iter("widget")}
    raise AssertionError(section)


def test_initial_alignment_and_refinement_widgets(ui_tree, widgets, module_ast):
    fields = parameter_fields(module_ast)
    # Inputs: the initial alignment combo box, bound to a Choice of the engine's method names
    assert "initialAlignmentComboBox" in _form_rows(ui_tree, "inputsCollapsibleButton")
    cls, props = widgets["initialAlignmentComboBox"]
    assert cls == "QComboBox" and text(props["SlicerParameterName"]) == "initialAlignment"
    choices = re.search(r"Choice\((\[.*?\])\)", fields["initialAlignment"]).group(1)
    assert ast.literal_eval(choices) == ["auto", "none", "com", "rigid", "affine"]
    assert "linear transform" in text(props["toolTip"])
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert 'initialAlignment: Annotated[str, Choice(["auto", "none", "com", "rigid", "affine"])] = "auto"' \
        in source  # the engine's default
    # the .ui lists the same choices, in the same order, with the labels the code sets
    element = next(e for e in ui_tree.iter("widget") if e.get("name") == "initialAlignmentComboBox")
    items = [item.find("property/string").text for item in element.findall("item")]
    assert items == ["Automatic (affine unless already aligned)", "None (inputs already aligned)",
                     "Centres of mass", "Rigid", "Affine"]
    for label in items:
        assert f'"{label}"' in source
    # Advanced: refine iterations (0 = off, 0..1000), time budget (0 = no limit), similarity
    advanced = _form_rows(ui_tree, "advancedCollapsibleButton")
    assert {"refineIterationsSpinBox", "refineSecondsSpinBox", "refineSimilarityComboBox"} \
        <= advanced
    similarities = re.search(r"Choice\((\[.*?\])\)", fields["refineSimilarity"]).group(1)
    assert ast.literal_eval(similarities) == ["auto", "lncc", "mind"]
    assert source.split("\n    refineSimilarity: ")[1].splitlines()[0].endswith('= "auto"')
    element = next(e for e in ui_tree.iter("widget") if e.get("name") == "refineSimilarityComboBox")
    items = [item.find("property/string").text for item in element.findall("item")]
    assert items == ["Follow the contrast", "LNCC (same contrast)", "MIND-SSC (two contrasts)"]
    assert all(f'"{label}"' in source for label in items)
    # refine iterations: -1 = "default" (the engine's, by contrast), 0 = off, up to 1000
    cls, props = widgets["refineIterationsSpinBox"]
    assert cls == "QSpinBox" and text(props["SlicerParameterName"]) == "refineIterations"
    assert (text(props["minimum"]), text(props["maximum"]), text(props["value"])) == \
        ("-1", "1000", "-1")
    assert text(props["specialValueText"]) == "default"
    assert fields["refineIterations"] == "Annotated[int, WithinRange(-1, 1000)]"
    cls, props = widgets["refineSecondsSpinBox"]
    assert cls == "QDoubleSpinBox" and text(props["SlicerParameterName"]) == "refineSeconds"
    assert float(text(props["minimum"])) == 0.0 and float(text(props["value"])) == 0.0
    assert text(props["specialValueText"]) == "no limit"
    assert source.split("refineIterations: ")[1].splitlines()[0].endswith(
        "= ENGINE_DEFAULT_REFINE_ITERATIONS")
    assert "ENGINE_DEFAULT_REFINE_ITERATIONS = -1\n" in source
    assert slicer_logic.checkEngineOptions(refineIterations=-1)[1] is None  # engine's default
    assert "= 0.0" in source.split("refineSeconds: ")[1].splitlines()[0]
    # Advanced: the contrast choice (automatic by default, like the engine), in the engine's order
    assert "contrastComboBox" in advanced and "useNetwork" not in fields
    cls, props = widgets["contrastComboBox"]
    assert cls == "QComboBox" and text(props["SlicerParameterName"]) == "contrast"
    contrasts = re.search(r"Choice\((\[.*?\])\)", fields["contrast"]).group(1)
    assert tuple(ast.literal_eval(contrasts)) == slicer_logic.CONTRASTS
    assert source.split("\n    contrast: ")[1].splitlines()[0].endswith('= "auto"')
    element = next(e for e in ui_tree.iter("widget") if e.get("name") == "contrastComboBox")
    items = [item.find("property/string").text for item in element.findall("item")]
    assert items == ["Automatic (from the volumes)", "Same contrast",
                     "Different contrasts (e.g. T1 and T2)"]
    assert all(f'"{label}"' in source for label in items)


def test_panel_passes_alignment_and_refinement_to_the_worker(module_with_stub_application,
                                                             monkeypatch):
    """Apply: the widget hands the parameter node's choices to ProcessRegistration; the module
    logic's registerVolumes passes them to the engine."""
    import types

    module, scene = module_with_stub_application
    from EOIRRegistrationLib import slicer_bridge, slicer_logic

    fixed_img, moving_img, _, _ = slicer_logic.syntheticTestPair(size=16)
    fixed = slicer_bridge.imageToVolumeNode(fixed_img, scene, "fixed")
    moving = slicer_bridge.imageToVolumeNode(moving_img, scene, "moving")

    started = []

    class RecordingProcess:
        def __init__(self, inputs, **kwargs):
            self.inputs, self.kwargs = inputs, kwargs

        def start(self):
            started.append(self)
            return self

    monkeypatch.setattr(slicer_logic, "ProcessRegistration", RecordingProcess)
    widget = object.__new__(module.EOIRRegistrationWidget)
    widget.logic = module.EOIRRegistrationLogic()
    widget._parameterNode = types.SimpleNamespace(
        fixedVolume=fixed, movingVolume=moving, movingSegmentation=None, outputTransform=None,
        outputVolume=None, model="default", device="cpu", workingSpacing=0.0,
        useIntensityWindow=False, showJacobian=True, showFolding=False,
        initialAlignment="affine", refineIterations=40, refineSeconds=12.5,
        refineSimilarity="mind", contrast="different")
    widget._setRunning = lambda running: None
    widget._timer = types.SimpleNamespace(start=lambda: None)
    widget._startRegistration()
    (job,) = started
    assert job.kwargs["initialAlignment"] == "affine"
    assert job.kwargs["refineIterations"] == 40 and job.kwargs["refineSeconds"] == 12.5
    assert job.kwargs["refineSimilarity"] == "mind" and job.kwargs["contrast"] == "different"
    assert job.inputs.movingVolumeNode is moving

    calls = []

    def fake_register(fixed, moving, **kwargs):
        calls.append(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(slicer_logic, "_engineRegister", lambda: fake_register)
    with pytest.raises(RuntimeError, match="stop here"):
        module.EOIRRegistrationLogic().registerVolumes(fixed, moving, initialAlignment="com",
                                                       refineIterations=5, refineSeconds=2.0,
                                                       refineSimilarity="mind", useNetwork=False,
                                                       contrast="same")
    assert calls[0]["initial_alignment"] == "com" and calls[0]["network"] is False
    assert calls[0]["contrast"] == "same"
    assert calls[0]["refine"].iterations == 5 and calls[0]["refine"].time_budget_s == 2.0
    assert calls[0]["refine"].similarity == "mind"


def test_results_say_which_contrast_path_ran(module_with_stub_application):
    import types

    module, scene = module_with_stub_application
    from EOIRRegistrationLib import slicer_logic

    label = lambda: types.SimpleNamespace(text="")  # noqa: E731
    widget = object.__new__(module.EOIRRegistrationWidget)
    widget.ui = types.SimpleNamespace(
        resultsCollapsibleButton=types.SimpleNamespace(show=lambda: None),
        foldingValueLabel=label(), sdlogjValueLabel=label(), jacobianRangeValueLabel=label(),
        runValueLabel=label(), statusLabel=label())
    node = types.SimpleNamespace(GetName=lambda: "moving-to-fixed")
    method = "different contrasts (intensity correlation -0.24): MIND-SSC refinement alone, 40 steps"
    outputs = slicer_logic.RegistrationOutputs(transformNode=node, qa={"folding_percent": 0.0},
                                               modelName="eoir", device="cpu", method=method)
    widget._showResults(outputs, 12.0)
    assert widget.ui.statusLabel.text.endswith(
        "shown through it. Different contrasts (intensity correlation -0.24): MIND-SSC "
        "refinement alone, 40 steps.")
    outputs.method = ""
    widget._showResults(outputs, 12.0)
    assert widget.ui.statusLabel.text.endswith("shown through it.")
