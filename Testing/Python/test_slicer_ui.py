"""The module panel without the Slicer application: the .ui file parses, every widget the code
looks up exists, every ``SlicerParameterName`` matches a parameter-node field of a type its widget
can show, and the module file keeps heavy imports out of module load."""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from EOIRRegistrationLib.engine import options as engine_options
from EOIRRegistrationLib.engine.options import RegistrationOptions
from EOIRRegistrationLib.slicer import texts

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


def parameter_defaults(module_ast) -> dict:
    """Fields of the @parameterNodeWrapper class: name -> default value source."""
    for node in module_ast.body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {stmt.target.id: ast.unparse(stmt.value) for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and stmt.value is not None}
    raise AssertionError("no @parameterNodeWrapper class in EOIRRegistration.py")


def choice_values(annotation: str) -> list:
    """The values of the ``Choice(...)`` in a field annotation, its argument evaluated with the
    engine's option constants (``engine.options``) it names."""
    calls = [n for n in ast.walk(ast.parse(annotation, mode="eval"))
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Choice"]
    assert len(calls) == 1, annotation
    names = {name: getattr(engine_options, name) for name in dir(engine_options) if name.isupper()}
    return list(eval(compile(ast.Expression(calls[0].args[0]), "<choice>", "eval"),
                     {"__builtins__": {}, "list": list, **names}))


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
    # the module logic is the headless RegistrationLogic (its registerVolumes) on the app's scene
    assert "RegistrationLogic" in classes["EOIRRegistrationLogic"]
    from EOIRRegistrationLib.slicer.logic import RegistrationLogic

    for method in ("registerVolumes", "prepareInputs", "runEngine", "createOutputs"):
        assert callable(getattr(RegistrationLogic, method))
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert 'self.parent.categories = ["Registration"]' in source
    for method in ("def runTest(", "def test_RegisterSyntheticPair(",
                   "def test_CancelLeavesSceneAsItWas(", "def test_SceneChecksWithoutTorch("):
        assert method in source


#: the package's modules EOIRRegistration.py may import at module load: none imports torch or
#: the engine's pipeline (checked below in a fresh interpreter)
LIGHT_PACKAGE_MODULES = {"EOIRRegistrationLib.engine.options", "EOIRRegistrationLib.slicer.texts",
                         "EOIRRegistrationLib.slicer.logic", "EOIRRegistrationLib.slicer.panel"}


def test_nothing_heavy_is_imported_at_module_load(module_ast):
    allowed = {"logging", "os", "shutil", "sys", "typing", "ctk", "qt", "vtk", "slicer",
               "slicer.ScriptedLoadableModule", "slicer.util", "slicer.parameterNodeWrapper",
               "vtkSlicerSegmentationsModuleMRMLPython"} | LIGHT_PACKAGE_MODULES

    def top_level_imports(body):
        for node in body:
            if isinstance(node, ast.Import):
                yield from (alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                package = MODULE_DIR.joinpath(*node.module.split("."))
                for alias in node.names:  # "from package import module" names the module
                    if (package / f"{alias.name}.py").is_file() or \
                            (package / alias.name / "__init__.py").is_file():
                        yield f"{node.module}.{alias.name}"
                    else:
                        yield node.module
            elif isinstance(node, ast.Try):
                yield from top_level_imports(node.body)
                for handler in node.handlers:
                    yield from top_level_imports(handler.body)

    imported = set(top_level_imports(module_ast.body))
    assert imported <= allowed, f"heavy imports at module load: {sorted(imported - allowed)}"
    assert LIGHT_PACKAGE_MODULES <= imported  # (the list above is not stale)
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "import torch" not in source  # torch runs only in the worker process

    # the package modules it imports pull in neither torch nor the engine's pipeline
    import subprocess
    import sys

    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(MODULE_DIR)!r})\n"
        + "".join(f"import {name}\n" for name in sorted(LIGHT_PACKAGE_MODULES))
        + "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')\n"
          "               or m == 'EOIRRegistrationLib.engine.pipeline')\n"
          "assert not heavy, heavy\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_lazy_engine_imports_name_things_that_exist(module_ast):
    """Every ``from EOIRRegistrationLib.x import y`` inside the module's functions resolves."""
    import importlib

    checked = 0
    for node in ast.walk(module_ast):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("EOIRRegistrationLib"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):  # a submodule: "from package import module"
                    importlib.import_module(f"{node.module}.{alias.name}")
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
                checked += 1
    assert checked >= 5


def test_ui_loads_in_qt(widgets):
    """Load the .ui with Qt's own loader (PySide6, a pinned development requirement, offscreen:
    no display needed): custom Slicer widgets fall back to their declared base class, every named
    widget must be created."""
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6 import QtCore, QtUiTools, QtWidgets

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
    Slicer application has (``slicer_app_stub``); undone after the test. The logic and the
    self-test then run on a real MRML scene."""
    from slicer_app_stub import load_module

    return load_module(monkeypatch.setitem,
                       lambda obj, name, value: monkeypatch.setattr(obj, name, value, raising=False))


def test_module_description_and_parameter_node(module_with_stub_application):
    """(The self-test itself runs in Slicer's way in test_slicer_selftest.py.)"""
    module, scene = module_with_stub_application
    import types

    info = module.EOIRRegistration(types.SimpleNamespace())
    assert info.parent.title == "EOIR Registration"
    assert info.parent.categories == ["Registration"]
    assert "cite" in info.parent.helpText.lower() and "TransformFromParent" in info.parent.helpText
    # the module-level class names the parameter node fields the .ui binds
    assert "fixedVolume" in module.EOIRRegistrationParameterNode.__annotations__


def _form_rows(ui_tree, section):
    """Widget names inside the collapsible section ``section``."""
    for element in ui_tree.iter("widget"):
        if element.get("name") == section:
            return {w.get("name") for w in element.iter("widget")}
    raise AssertionError(section)


def test_initial_alignment_and_refinement_widgets(ui_tree, widgets, module_ast):
    fields = parameter_fields(module_ast)
    defaults = parameter_defaults(module_ast)
    source = MODULE_FILE.read_text(encoding="utf-8")
    # the parameter node's defaults are the engine's (RegistrationOptions())
    assert "\nDEFAULTS = RegistrationOptions()\n" in source
    # Inputs: the initial alignment combo box, bound to a Choice of the engine's method names
    assert "initialAlignmentComboBox" in _form_rows(ui_tree, "inputsCollapsibleButton")
    cls, props = widgets["initialAlignmentComboBox"]
    assert cls == "QComboBox" and text(props["SlicerParameterName"]) == "initialAlignment"
    assert choice_values(fields["initialAlignment"]) == ["auto", "none", "com", "rigid", "affine"]
    assert choice_values(fields["initialAlignment"]) == list(engine_options.INITIAL_ALIGNMENTS)
    assert "linear transform" in text(props["toolTip"])
    assert defaults["initialAlignment"] == "DEFAULTS.initial_alignment"
    assert RegistrationOptions().initial_alignment == "auto"  # the engine's default
    # the .ui lists the same choices, in the same order, with the labels the code sets
    element = next(e for e in ui_tree.iter("widget") if e.get("name") == "initialAlignmentComboBox")
    items = [item.find("property/string").text for item in element.findall("item")]
    assert items == ["Automatic (affine unless already aligned)", "None (inputs already aligned)",
                     "Centres of mass", "Rigid", "Affine"]
    assert list(texts.INITIAL_ALIGNMENT_LABELS) == list(engine_options.INITIAL_ALIGNMENTS)
    assert list(texts.INITIAL_ALIGNMENT_LABELS.values()) == items
    assert set(texts.INITIAL_ALIGNMENT_TIPS) == set(texts.INITIAL_ALIGNMENT_LABELS)
    assert "texts.INITIAL_ALIGNMENT_LABELS, texts.INITIAL_ALIGNMENT_TIPS" in source
    # Advanced: refine iterations (0 = off, 0..1000), time budget (0 = no limit), similarity
    advanced = _form_rows(ui_tree, "advancedCollapsibleButton")
    assert {"refineIterationsSpinBox", "refineSecondsSpinBox", "refineSimilarityComboBox"} \
        <= advanced
    assert choice_values(fields["refineSimilarity"]) == ["auto", "lncc", "mind"]
    assert choice_values(fields["refineSimilarity"]) == \
        ["auto", *engine_options.REFINE_SIMILARITIES]
    assert defaults["refineSimilarity"] == "'auto'"
    element = next(e for e in ui_tree.iter("widget") if e.get("name") == "refineSimilarityComboBox")
    items = [item.find("property/string").text for item in element.findall("item")]
    assert items == ["Follow the contrast", "LNCC (same contrast)", "MIND-SSC (two contrasts)"]
    assert list(texts.REFINE_SIMILARITY_LABELS) == ["auto", *engine_options.REFINE_SIMILARITIES]
    assert list(texts.REFINE_SIMILARITY_LABELS.values()) == items
    assert set(texts.REFINE_SIMILARITY_TIPS) == set(texts.REFINE_SIMILARITY_LABELS)
    assert "texts.REFINE_SIMILARITY_LABELS, texts.REFINE_SIMILARITY_TIPS" in source
    # refine iterations: -1 = "default" (the engine's, by contrast), 0 = off, up to 1000
    cls, props = widgets["refineIterationsSpinBox"]
    assert cls == "QSpinBox" and text(props["SlicerParameterName"]) == "refineIterations"
    assert (text(props["minimum"]), text(props["maximum"]), text(props["value"])) == \
        ("-1", "1000", "-1")
    assert text(props["specialValueText"]) == "default"
    assert fields["refineIterations"] == "Annotated[int, WithinRange(-1, MAX_REFINE_ITERATIONS)]"
    assert engine_options.MAX_REFINE_ITERATIONS == 1000
    cls, props = widgets["refineSecondsSpinBox"]
    assert cls == "QDoubleSpinBox" and text(props["SlicerParameterName"]) == "refineSeconds"
    assert float(text(props["minimum"])) == 0.0 and float(text(props["value"])) == 0.0
    assert text(props["specialValueText"]) == "no limit"
    assert defaults["refineIterations"] == "ENGINE_DEFAULT_REFINE_ITERATIONS"
    assert "ENGINE_DEFAULT_REFINE_ITERATIONS = -1\n" in source
    assert defaults["refineSeconds"] == "0.0"
    # (that -1 and 0.0 mean the engine's default and no limit: test_parameter_node_maps_...)
    # Advanced: the contrast choice (automatic by default, like the engine), in the engine's order
    assert "contrastComboBox" in advanced and "useNetwork" not in fields
    cls, props = widgets["contrastComboBox"]
    assert cls == "QComboBox" and text(props["SlicerParameterName"]) == "contrast"
    assert tuple(choice_values(fields["contrast"])) == engine_options.CONTRASTS
    assert defaults["contrast"] == "DEFAULTS.contrast" and RegistrationOptions().contrast == "auto"
    element = next(e for e in ui_tree.iter("widget") if e.get("name") == "contrastComboBox")
    items = [item.find("property/string").text for item in element.findall("item")]
    assert items == ["Automatic (from the volumes)", "Same contrast",
                     "Different contrasts (e.g. T1 and T2)"]
    assert list(texts.CONTRAST_LABELS) == list(engine_options.CONTRASTS)
    assert list(texts.CONTRAST_LABELS.values()) == items
    assert set(texts.CONTRAST_TIPS) == set(texts.CONTRAST_LABELS)
    assert "texts.CONTRAST_LABELS, texts.CONTRAST_TIPS" in source
    # Advanced: the optimisation preset, the engine's presets in order, default the engine's
    cls, props = widgets["presetComboBox"]
    assert cls == "QComboBox" and text(props["SlicerParameterName"]) == "preset"
    assert "presetComboBox" in advanced
    assert tuple(choice_values(fields["preset"])) == engine_options.PRESETS
    assert defaults["preset"] == "DEFAULTS.preset"
    element = next(e for e in ui_tree.iter("widget") if e.get("name") == "presetComboBox")
    items = [item.find("property/string").text for item in element.findall("item")]
    assert list(texts.PRESET_LABELS) == list(engine_options.PRESETS)
    assert list(texts.PRESET_LABELS.values()) == items
    assert set(texts.PRESET_TIPS) == set(texts.PRESET_LABELS)
    assert "texts.PRESET_LABELS, texts.PRESET_TIPS" in source
    # the device choice: the engine's devices, default the engine's
    assert choice_values(fields["device"]) == list(engine_options.DEVICES)
    assert list(texts.DEVICE_LABELS) == list(engine_options.DEVICES)
    assert defaults["device"] == "DEFAULTS.device"


def test_parameter_node_maps_to_the_engine_options(module_with_stub_application):
    """The panel's "unset" values (-1 iterations, 0 s, "auto" similarity, 0 mm spacing) are the
    engine's defaults; the other choices reach the options unchanged, and the field types the
    wrapper sees name the engine's choices."""
    import types
    import typing

    from EOIRRegistrationLib.core.errors import InputError

    module, scene = module_with_stub_application
    hints = typing.get_type_hints(module.EOIRRegistrationParameterNode, include_extras=True)
    assert hints["initialAlignment"].__metadata__ == \
        (("Choice", engine_options.INITIAL_ALIGNMENTS),)
    assert hints["contrast"].__metadata__ == (("Choice", engine_options.CONTRASTS),)
    assert hints["device"].__metadata__ == (("Choice", engine_options.DEVICES),)
    assert hints["refineSimilarity"].__metadata__ == \
        (("Choice", ("auto", *engine_options.REFINE_SIMILARITIES)),)
    assert hints["refineIterations"].__metadata__ == \
        (("WithinRange", -1, engine_options.MAX_REFINE_ITERATIONS),)
    assert module.DEFAULTS == RegistrationOptions()

    node = module.EOIRRegistrationParameterNode  # the plain class: its defaults
    unset = types.SimpleNamespace(
        model=node.model, device=node.device, workingSpacing=node.workingSpacing,
        useIntensityWindow=node.useIntensityWindow, fixedWindowMin=node.fixedWindowMin,
        fixedWindowMax=node.fixedWindowMax, movingWindowMin=node.movingWindowMin,
        movingWindowMax=node.movingWindowMax, initialAlignment=node.initialAlignment,
        contrast=node.contrast, preset=node.preset, refineIterations=node.refineIterations,
        refineSeconds=node.refineSeconds, refineSimilarity=node.refineSimilarity,
        computeInverse=node.computeInverse)
    options = module.optionsFromParameterNode(unset)
    assert options == RegistrationOptions()
    assert options.refine_iterations is None  # -1: the engine's default (by contrast)
    assert options.refine_seconds is None and options.refine_similarity is None
    assert options.working_spacing is None and options.intensity_window is None
    assert module.optionsFromParameterNode(types.SimpleNamespace(
        **{**vars(unset), "model": ""})).model == RegistrationOptions().model

    chosen = types.SimpleNamespace(
        model="/models/mine.pt", device="cpu", workingSpacing=1.5, useIntensityWindow=True,
        fixedWindowMin=-100.0, fixedWindowMax=900.0, movingWindowMin=0.0, movingWindowMax=1200.0,
        initialAlignment="rigid", contrast="different", preset="accurate", refineIterations=0,
        refineSeconds=5.0, refineSimilarity="mind", computeInverse=True)
    assert module.optionsFromParameterNode(chosen) == RegistrationOptions(
        model="/models/mine.pt", device="cpu", working_spacing=1.5,
        intensity_window=((-100.0, 900.0), (0.0, 1200.0)), initial_alignment="rigid",
        contrast="different", preset="accurate", refine_iterations=0, refine_seconds=5.0,
        refine_similarity="mind", inverse=True)
    # a bad choice is refused by the options' own checks (before anything is read)
    with pytest.raises(InputError, match="intensity window"):
        module.optionsFromParameterNode(types.SimpleNamespace(
            **{**vars(chosen), "fixedWindowMax": -200.0}))


def test_panel_passes_alignment_and_refinement_to_the_worker(module_with_stub_application,
                                                             monkeypatch):
    """Apply: the widget hands the parameter node's choices to ProcessRegistration as one
    RegistrationOptions; the module logic's registerVolumes passes them to the engine."""
    import types

    module, scene = module_with_stub_application
    from EOIRRegistrationLib.slicer import bridge as slicer_bridge
    from EOIRRegistrationLib.slicer import logic as slicer_logic
    from EOIRRegistrationLib.slicer import runners
    from EOIRRegistrationLib.slicer.selftest import syntheticTestPair

    fixed_img, moving_img, _, _ = syntheticTestPair(size=16)
    fixed = slicer_bridge.imageToVolumeNode(fixed_img, scene, "fixed")
    moving = slicer_bridge.imageToVolumeNode(moving_img, scene, "moving")

    started = []

    class RecordingProcess:
        def __init__(self, inputs, options, **kwargs):
            self.inputs, self.options, self.kwargs = inputs, options, kwargs

        def start(self):
            started.append(self)
            return self

    monkeypatch.setattr(runners, "ProcessRegistration", RecordingProcess)
    widget = object.__new__(module.EOIRRegistrationWidget)
    widget.logic = module.EOIRRegistrationLogic()
    widget._parameterNode = types.SimpleNamespace(
        fixedVolume=fixed, movingVolume=moving, movingSegmentation=None, outputTransform=None,
        outputVolume=None, model="default", device="cpu", workingSpacing=0.0,
        useIntensityWindow=False, showJacobian=True, showFolding=False,
        initialAlignment="affine", refineIterations=40, refineSeconds=12.5,
        refineSimilarity="mind", contrast="different", preset="fast", computeInverse=True,
        fixedSegmentation=None, fixedMask=None, movingMask=None)
    widget._setRunning = lambda running: None
    widget._timer = types.SimpleNamespace(start=lambda: None)
    widget._startRegistration()
    (job,) = started
    assert isinstance(job.options, RegistrationOptions)
    assert job.options == RegistrationOptions(
        model="default", device="cpu", initial_alignment="affine", refine_iterations=40,
        refine_seconds=12.5, refine_similarity="mind", contrast="different", preset="fast",
        inverse=True)
    assert job.options.initial_alignment == "affine"
    assert job.options.refine_iterations == 40 and job.options.refine_seconds == 12.5
    assert job.options.refine_similarity == "mind" and job.options.contrast == "different"
    assert set(job.kwargs) == {"pythonExecutable", "tempDir"} and job.kwargs["tempDir"] == "/tmp"
    assert job.inputs.movingVolumeNode is moving
    assert widget._jobOptions == dict(outputTransformNode=None, outputVolumeNode=None,
                                      showJacobian=True, showFolding=False)

    calls = []

    def fake_register(fixed, moving, options=None, **kwargs):
        calls.append((options, kwargs))
        raise RuntimeError("stop here")

    monkeypatch.setattr(slicer_logic, "_engineRegister", lambda: fake_register)
    with pytest.raises(RuntimeError, match="stop here"):
        module.EOIRRegistrationLogic().registerVolumes(fixed, moving, initial_alignment="com",
                                                       refine_iterations=5, refine_seconds=2.0,
                                                       refine_similarity="mind", network=False,
                                                       contrast="same")
    options, kwargs = calls[0]
    assert options == RegistrationOptions(initial_alignment="com", refine_iterations=5,
                                          refine_seconds=2.0, refine_similarity="mind",
                                          network=False, contrast="same")
    assert options.initial_alignment == "com" and options.network is False
    assert options.contrast == "same"
    assert options.refine_iterations == 5 and options.refine_seconds == 2.0
    assert options.refine_similarity == "mind"
    assert set(kwargs) == {"moving_labels", "progress", "cancel"}


def test_results_say_which_contrast_path_ran(module_with_stub_application):
    import math
    import types

    import SimpleITK as sitk

    module, scene = module_with_stub_application
    from helpers import registration_result

    from EOIRRegistrationLib.slicer.outputs import RegistrationOutputs

    label = lambda: types.SimpleNamespace(text="")  # noqa: E731
    widget = object.__new__(module.EOIRRegistrationWidget)
    widget.ui = types.SimpleNamespace(
        resultsCollapsibleButton=types.SimpleNamespace(show=lambda: None),
        foldingValueLabel=label(), sdlogjValueLabel=label(), jacobianRangeValueLabel=label(),
        runValueLabel=label(), statusLabel=label())
    node = types.SimpleNamespace(GetName=lambda: "moving-to-fixed")
    image = sitk.Image(6, 5, 4, sitk.sitkFloat32)
    displacement = sitk.Image([6, 5, 4], sitk.sitkVectorFloat64, 3)
    result = registration_result(
        image, image, displacement, model_name="eoir", device="cpu", contrast="different",
        contrast_correlation=-0.24, network=False,
        refinement={"similarity": "mind", "preset": "default", "scales_mm": [2.0, 1.0],
                    "iterations": [40, 2]})
    method = ("different contrasts (intensity correlation -0.24): MIND-SSC optimisation alone at "
              "2/1 mm, 40/2 steps (default)")
    assert result.method == method
    widget._showResults(RegistrationOutputs(transformNode=node, result=result), 12.0)
    assert widget.ui.statusLabel.text.endswith(
        "shown through it. Different contrasts (intensity correlation -0.24): MIND-SSC "
        "optimisation alone at 2/1 mm, 40/2 steps (default).")
    # the QA figures and the run come from the result
    assert widget.ui.foldingValueLabel.text == "0.0000 % of voxels"
    assert widget.ui.sdlogjValueLabel.text == "0.0000"
    assert widget.ui.jacobianRangeValueLabel.text == "1.000 / 1.000"
    assert widget.ui.runValueLabel.text == "eoir on cpu, 12.0 s"
    # the other path, without a correlation figure
    result.contrast, result.contrast_correlation, result.network = "same", math.nan, True
    result.refinement = {"similarity": "lncc", "preset": "fast", "scales_mm": [4.0, 2.0, 1.0],
                         "iterations": [10, 5, 2]}
    widget._showResults(RegistrationOutputs(transformNode=node, result=result), 12.0)
    assert widget.ui.statusLabel.text.endswith(
        "shown through it. Same contrast: network + LNCC optimisation at 4/2/1 mm, 10/5/2 steps "
        "(fast).")
    # the engine's warnings (a partial overlap of the inputs) follow the method
    result.warnings = ["only 38 % of the fixed image's field of view lies inside the moving image"]
    widget._showResults(RegistrationOutputs(transformNode=node, result=result), 12.0)
    assert widget.ui.statusLabel.text.endswith(
        "(fast). WARNING: only 38 % of the fixed image's field of view lies inside the moving "
        "image.")
