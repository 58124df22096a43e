"""EOIR Registration: fast learned deformable registration for 3D Slicer.

The panel is thin: it reads its choices from a typed parameter node, hands the volumes to
``EOIRRegistrationLib.slicer.logic`` (headless, scene-explicit, tested with ``slicer-core``), runs
the engine in a separate process so the GUI stays responsive, and puts the result into the scene
on the GUI thread. Nothing heavy happens at module load or panel creation: torch is never imported
in the Slicer process (only in the worker process, when Apply is pressed), and the engine modules
are imported lazily.
"""
import logging
import os
import shutil
import sys
from typing import Annotated, Union

import ctk  # noqa: F401  (Slicer convention: the module namespace provides ctk widgets)
import qt
import slicer
import vtk
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLTransformNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from EOIRRegistrationLib.engine.options import (
    CONTRASTS,
    DEVICES,
    INITIAL_ALIGNMENTS,
    MAX_REFINE_ITERATIONS,
    PRESETS,
    REFINE_SIMILARITIES,
    RegistrationOptions,
)
from EOIRRegistrationLib.slicer import panel, texts
from EOIRRegistrationLib.slicer.logic import RegistrationLogic
from EOIRRegistrationLib.slicer.panel import optionsFromParameterNode

try:  # non-core MRML classes must come from their own package (parameterNodeWrapper docs)
    from vtkSlicerSegmentationsModuleMRMLPython import vtkMRMLSegmentationNode
except ImportError:  # pragma: no cover - older layouts
    vtkMRMLSegmentationNode = slicer.vtkMRMLSegmentationNode

LOAD_MODEL_FILE = "__load_model_file__"
#: the engine's defaults, the parameter node's defaults
DEFAULTS = RegistrationOptions()
#: refineIterations value meaning "the engine's default" (``refine_iterations`` None); shown as
#: "default" in the panel
ENGINE_DEFAULT_REFINE_ITERATIONS = -1


class EOIRRegistration(ScriptedLoadableModule):
    """Module description (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "EOIR Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["The EOIRRegistration developers"]
        self.parent.helpText = texts.HELP_TEXT
        self.parent.acknowledgementText = texts.ACKNOWLEDGEMENT_TEXT


@parameterNodeWrapper
class EOIRRegistrationParameterNode:
    """The panel's choices, saved with the scene: the volumes and output nodes, the QA overlays,
    and the engine's options (``RegistrationOptions``, whose fields say what each means) mapped by
    :func:`optionsFromParameterNode`, with 0 / -1 / "auto" for the options the engine chooses.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    movingSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    fixedSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    fixedMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    movingMask: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    model: str = DEFAULTS.model
    device: Annotated[str, Choice(list(DEVICES))] = DEFAULTS.device
    outputTransform: vtkMRMLTransformNode
    outputVolume: vtkMRMLScalarVolumeNode
    showJacobian: bool = True
    showFolding: bool = True
    computeInverse: bool = DEFAULTS.inverse
    workingSpacing: Annotated[float, WithinRange(0.0, 20.0)] = 0.0
    useIntensityWindow: bool = False
    fixedWindowMin: float = 0.0
    fixedWindowMax: float = 1000.0
    movingWindowMin: float = 0.0
    movingWindowMax: float = 1000.0
    initialAlignment: Annotated[str, Choice(list(INITIAL_ALIGNMENTS))] = DEFAULTS.initial_alignment
    contrast: Annotated[str, Choice(list(CONTRASTS))] = DEFAULTS.contrast
    preset: Annotated[str, Choice(list(PRESETS))] = DEFAULTS.preset
    refineIterations: Annotated[int, WithinRange(-1, MAX_REFINE_ITERATIONS)] = \
        ENGINE_DEFAULT_REFINE_ITERATIONS
    refineSeconds: Annotated[float, WithinRange(0.0, 3600.0)] = 0.0
    refineSimilarity: Annotated[str, Choice(["auto", *REFINE_SIMILARITIES])] = "auto"


class EOIRRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Heavy work runs in a worker process; MRML is changed on the GUI thread only."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobInputs = None
        self._jobOptions = None
        self._timer = None
        self._updatingModelComboBox = False

    # -- setup --------------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/EOIRRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = EOIRRegistrationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.useIntensityWindowCheckBox.connect("toggled(bool)", self._updateWindowWidgets)
        self.ui.refineIterationsSpinBox.connect("valueChanged(int)", self._updateRefineWidgets)

        self.ui.progressBar.hide()
        self.ui.statusLabel.text = ""
        self.ui.resultsCollapsibleButton.hide()

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onTimer)

        self._populateModelComboBox()
        self.initializeParameterNode()

    def cleanup(self):
        if self._timer is not None:
            self._timer.stop()
        if self._job is not None:
            self._job.cancel()
            self._job = None
        self._disconnectParameterNode()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self._disconnectParameterNode()

    def _disconnectParameterNode(self):
        if self._parameterNode is not None:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self._checkCanApply)

    def onSceneStartClose(self, caller, event):
        if self._job is not None:  # the inputs are going away: stop and forget the run
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.fixedVolume = firstVolume

    def setParameterNode(self, inputParameterNode):
        self._disconnectParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            # Widgets are bound through the "SlicerParameterName" property set in the .ui file.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._decorateDeviceComboBox()
            self._decorateChoiceComboBoxes()
            self._selectModelInComboBox(self._parameterNode.model)
            self._updateWindowWidgets()
            self._updateRefineWidgets()
        self._checkCanApply()

    # -- model and device choices -------------------------------------------------------------
    def _populateModelComboBox(self):
        combo = self.ui.modelComboBox
        self._modelChoices = panel.modelChoices(LOAD_MODEL_FILE)
        self._updatingModelComboBox = True
        try:
            combo.clear()
            for label, data, tip in self._modelChoices:
                combo.addItem(label, data)
                combo.setItemData(combo.count - 1, tip, qt.Qt.ToolTipRole)
        finally:
            self._updatingModelComboBox = False

    def _selectModelInComboBox(self, model):
        combo = self.ui.modelComboBox
        self._updatingModelComboBox = True
        try:
            model = model or DEFAULTS.model
            index = combo.findData(model)
            if index < 0 and model == DEFAULTS.model and combo.count > 1:
                index = 0  # the first bundled model is the engine's default
            if index < 0 and (os.path.sep in model or model.endswith(".pt")):
                combo.insertItem(combo.count - 1, os.path.basename(model), model)
                index = combo.count - 2
                combo.setItemData(index, model, qt.Qt.ToolTipRole)
            combo.currentIndex = max(index, 0)
        finally:
            self._updatingModelComboBox = False
        self._showModelDescription()

    def _showModelDescription(self):
        combo = self.ui.modelComboBox
        self.ui.modelDescriptionLabel.text = panel.modelDescription(
            combo.itemData(combo.currentIndex), getattr(self, "_modelChoices", []))

    def onModelChanged(self, index):
        if self._updatingModelComboBox or self._parameterNode is None:
            return
        data = self.ui.modelComboBox.itemData(index)
        if data == LOAD_MODEL_FILE:
            path = qt.QFileDialog.getOpenFileName(
                self.parent, "Load an EOIRRegistration model", "",
                "EOIRRegistration models (*.pt);;All files (*)")
            if path:
                self._parameterNode.model = path
            self._selectModelInComboBox(self._parameterNode.model)
            return
        self._parameterNode.model = data
        self._showModelDescription()

    def _decorateDeviceComboBox(self):
        """Readable labels; GPU disabled with a tooltip when no CUDA GPU is found (no torch import:
        the check looks for the NVIDIA driver until torch is loaded)."""
        from EOIRRegistrationLib.slicer.catalog import gpuProbablyAvailable

        combo = self.ui.deviceComboBox
        panel.labelChoices(combo, texts.DEVICE_LABELS)
        gpu = gpuProbablyAvailable()
        gpuIndex = 2
        if combo.count > gpuIndex:
            model = combo.model()
            item = model.item(gpuIndex) if hasattr(model, "item") else None
            if item is not None:
                item.setEnabled(gpu)
            else:  # Qt's documented way for any model: Qt::UserRole - 1 holds the item flags
                combo.setItemData(gpuIndex, None if gpu else 0, qt.Qt.UserRole - 1)
            combo.setItemData(gpuIndex, panel.gpuTooltip(gpu), qt.Qt.ToolTipRole)
        if not gpu and self._parameterNode is not None and self._parameterNode.device == "cuda":
            self._parameterNode.device = DEFAULTS.device

    def _decorateChoiceComboBoxes(self):
        """Readable labels and per-item tooltips (the parameter node connector fills each combo
        box with the engine's names, in this order, and reads it by index)."""
        for combo, labels, tips in (
                (self.ui.initialAlignmentComboBox, texts.INITIAL_ALIGNMENT_LABELS, texts.INITIAL_ALIGNMENT_TIPS),
                (self.ui.refineSimilarityComboBox, texts.REFINE_SIMILARITY_LABELS, texts.REFINE_SIMILARITY_TIPS),
                (self.ui.contrastComboBox, texts.CONTRAST_LABELS, texts.CONTRAST_TIPS),
                (self.ui.presetComboBox, texts.PRESET_LABELS, texts.PRESET_TIPS)):
            panel.labelChoices(combo, labels, tips, qt.Qt.ToolTipRole)

    def _updateRefineWidgets(self, *args):
        enabled = int(self.ui.refineIterationsSpinBox.value) != 0
        self.ui.refineSecondsSpinBox.enabled = enabled
        self.ui.refineSimilarityComboBox.enabled = enabled

    def _updateWindowWidgets(self, *args):
        enabled = bool(self.ui.useIntensityWindowCheckBox.checked)
        for name in ("fixedWindowMinSpinBox", "fixedWindowMaxSpinBox",
                     "movingWindowMinSpinBox", "movingWindowMaxSpinBox"):
            getattr(self.ui, name).enabled = enabled

    def _checkCanApply(self, caller=None, event=None):
        if self._job is not None:
            return  # the button is the Cancel button while running
        p = self._parameterNode
        if p and p.fixedVolume and p.movingVolume and p.fixedVolume != p.movingVolume:
            self.ui.applyButton.toolTip = "Register the moving volume to the fixed volume"
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = "Select two different fixed and moving volumes"
            self.ui.applyButton.enabled = False

    # -- running ------------------------------------------------------------------------------
    def onApplyButton(self):
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = "Cancelling at the next stage..."
            self.ui.applyButton.enabled = False
            return
        with slicer.util.tryWithErrorDisplay("Could not start the registration.", waitCursor=True):
            if not self._ensureTorch():
                return
            self._startRegistration()

    def _ensureTorch(self) -> bool:
        ready, status = panel.torchReady(slicer.util.errorDisplay)
        if not ready:
            self.ui.statusLabel.text = status
        return ready

    def _startRegistration(self):
        from EOIRRegistrationLib.slicer.runners import ProcessRegistration

        p = self._parameterNode
        options = optionsFromParameterNode(p)  # checked before anything is read
        inputs = self.logic.prepareInputs(
            p.fixedVolume, p.movingVolume, movingSegmentationNode=p.movingSegmentation,
            outputTransformNode=p.outputTransform, outputVolumeNode=p.outputVolume,
            fixedSegmentationNode=p.fixedSegmentation, fixedMaskNode=p.fixedMask,
            movingMaskNode=p.movingMask)
        python = shutil.which("PythonSlicer") or shutil.which("PythonSlicer.exe") or sys.executable
        job = ProcessRegistration(inputs, options, pythonExecutable=python,
                                  tempDir=slicer.app.temporaryPath)
        job.start()
        self._job, self._jobInputs = job, inputs
        self._jobOptions = dict(outputTransformNode=p.outputTransform,
                                outputVolumeNode=p.outputVolume, showJacobian=p.showJacobian,
                                showFolding=p.showFolding)
        self._setRunning(True)
        self._timer.start()

    def _setRunning(self, running):
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.toolTip = ("Stop the registration; the scene is left as it was" if running
                                       else "Register the moving volume to the fixed volume")
        self.ui.applyButton.enabled = True
        for name in ("inputsCollapsibleButton", "outputsCollapsibleButton",
                     "advancedCollapsibleButton"):
            getattr(self.ui, name).enabled = not running
        self.ui.progressBar.visible = running
        if running:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting the registration process..."
        else:
            self._checkCanApply()

    def _onTimer(self):
        job = self._job
        if job is None:
            self._timer.stop()
            return
        stage, fraction, elapsed, remaining = job.poll()
        self.ui.progressBar.value = int(round(1000 * fraction))
        if not job.done:
            self.ui.statusLabel.text = panel.progressText(stage, elapsed, remaining)
            return
        self._timer.stop()
        self._finishRegistration(job)

    def _finishRegistration(self, job):
        inputs, options = self._jobInputs, self._jobOptions
        self._job = self._jobInputs = self._jobOptions = None
        self._setRunning(False)
        if job.error is not None:
            self.ui.statusLabel.text, message = panel.failureText(job.error)
            if message:
                slicer.util.errorDisplay(message)
            return
        if inputs.fixedVolumeNode.GetScene() is None or inputs.movingVolumeNode.GetScene() is None:
            self.ui.statusLabel.text = "The volumes were removed while registering; nothing added."
            return
        self.ui.statusLabel.text = "Creating the result nodes..."
        slicer.app.processEvents()
        try:
            with slicer.util.tryWithErrorDisplay("Registration failed while creating the results.",
                                                 waitCursor=True):
                outputs = self.logic.createOutputs(inputs, job.result, **options)
                self._showResults(outputs, job.poll()[2])
                slicer.util.setSliceViewerLayers(fit=True)
        except Exception as exc:  # tryWithErrorDisplay has shown the reason
            logging.error("EOIRRegistration: %s", exc)
            self.ui.statusLabel.text = "Registration failed; the scene was left as it was."

    def _showResults(self, outputs, seconds):
        self.ui.resultsCollapsibleButton.show()
        for name, text in panel.resultTexts(outputs, seconds).items():
            getattr(self.ui, name).text = text


class EOIRRegistrationLogic(ScriptedLoadableModuleLogic, RegistrationLogic):
    """Headless logic (Python console, batch scripts, tests): ``RegistrationLogic`` on
    ``slicer.mrmlScene``.

    Example::

        logic = slicer.util.getModuleLogic("EOIRRegistration")
        out = logic.registerVolumes(fixedNode, movingNode, device="cpu")
        print(out.transformNode.GetName(), out.result.summary())
    """

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        RegistrationLogic.__init__(self, scene or slicer.mrmlScene)

    def getParameterNode(self):
        return EOIRRegistrationParameterNode(super().getParameterNode())


class EOIRRegistrationTest(ScriptedLoadableModuleTest):
    """``Slicer --testing`` runs each test_ method, Reload and Test ``runTest``. Only the registration
    of a synthetic pair needs torch; without it, it is skipped with a message saying so."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        import unittest
        for name in sorted(name for name in dir(self) if name.startswith("test_")):
            self.setUp()
            try:
                getattr(self, name)()
            except unittest.SkipTest as skip:
                self.delayDisplay(f"{name} skipped: {skip}")

    def test_SceneChecksWithoutTorch(self):
        from EOIRRegistrationLib.slicer.selftest_scene import SCENE_CHECKS
        for check in SCENE_CHECKS:
            self.setUp()
            self.delayDisplay(check(slicer.mrmlScene, EOIRRegistrationLogic()))

    def test_CancelLeavesSceneAsItWas(self):
        from EOIRRegistrationLib.slicer.selftest import checkCancelLeavesSceneAsItWas
        checkCancelLeavesSceneAsItWas(slicer.mrmlScene, EOIRRegistrationLogic().registerVolumes)
        self.delayDisplay("Cancel before the engine: scene left as it was")

    def test_RegisterSyntheticPair(self):
        from EOIRRegistrationLib.slicer.selftest import checkRegistration, torchMissing
        if torchMissing():
            self.skipTest(torchMissing())
        self.delayDisplay(checkRegistration(slicer.mrmlScene, EOIRRegistrationLogic().registerVolumes))
