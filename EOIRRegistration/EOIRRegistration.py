"""EOIR Registration: fast learned deformable registration for 3D Slicer.

The panel is thin: it reads its choices from a typed parameter node, hands the volumes to
``EOIRRegistrationLib.slicer_logic`` (headless, scene-explicit, tested with ``slicer-core``), runs
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
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLTransformNode

try:  # non-core MRML classes must come from their own package (parameterNodeWrapper docs)
    from vtkSlicerSegmentationsModuleMRMLPython import vtkMRMLSegmentationNode
except ImportError:  # pragma: no cover - older layouts
    vtkMRMLSegmentationNode = slicer.vtkMRMLSegmentationNode

LOAD_MODEL_FILE = "__load_model_file__"
#: refineIterations value meaning "the engine's default" (10 steps after the network, 40 without;
#: ``refine.DEFAULT_ITERATIONS[_ALONE]``); shown as "default" in the panel
ENGINE_DEFAULT_REFINE_ITERATIONS = -1
DEVICE_LABELS = {"auto": "Auto (GPU if available)", "cpu": "CPU", "cuda": "GPU (CUDA)"}
#: initial alignment choices (the engine's method names) and their labels in the panel
INITIAL_ALIGNMENT_LABELS = {
    "auto": "Automatic (affine unless already aligned)",
    "none": "None (inputs already aligned)",
    "com": "Centres of mass",
    "rigid": "Rigid",
    "affine": "Affine",
}
#: refinement similarities (the engine's names) and their labels in the panel
REFINE_SIMILARITY_LABELS = {
    "auto": "Follow the contrast",
    "lncc": "LNCC (same contrast)",
    "mind": "MIND-SSC (two contrasts)",
}
REFINE_SIMILARITY_TIPS = {
    "auto": "LNCC when the volumes share one contrast, MIND-SSC when they do not.",
    "lncc": "Local normalised cross-correlation: for two volumes of the same contrast.",
    "mind": "Modality-independent neighbourhood descriptors (MIND-SSC): for T1 and T2, MR and CT.",
}
INITIAL_ALIGNMENT_TIPS = {
    "auto": "Compute an affine alignment (mutual information, about a second) and use it unless "
            "the volumes are already aligned or it does not improve on no alignment.",
    "none": "Use the moving volume as it is (with its linear parent transform, if any).",
    "com": "Translate so the intensity centres of mass coincide.",
    "rigid": "Rotation and translation maximising mutual information (a few seconds).",
    "affine": "Rigid, then a full affine map maximising mutual information (a few seconds).",
}
#: contrast choices (the engine's names) and their labels in the panel
CONTRAST_LABELS = {
    "auto": "Automatic (from the volumes)",
    "same": "Same contrast",
    "different": "Different contrasts (e.g. T1 and T2)",
}
CONTRAST_TIPS = {
    "auto": "Decide from the volumes' intensity correlation after the initial alignment; the "
            "result line says which was used.",
    "same": "One contrast (e.g. two T1 scans): the model's network, then LNCC refinement "
            "(a few seconds).",
    "different": "Two contrasts (T1 and T2, MR and CT): the bundled models are single-contrast, "
                 "so the MIND-SSC refinement alone registers (about 8 s for a brain on a CPU).",
}


#
# EOIRRegistration
#

class EOIRRegistration(ScriptedLoadableModule):
    """Module description (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "EOIR Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["The EOIRRegistration developers"]
        self.parent.helpText = """
<p>Fast learned deformable registration of a <b>moving</b> volume to a <b>fixed</b> volume with
an encoder-only network (EOIR) run coarse to fine; a result takes seconds on a GPU and well under
a minute on a CPU for typical volumes.</p>
<p><b>What the models expect:</b> roughly aligned volumes. The default <i>Initial alignment</i>,
<i>Automatic</i>, computes an affine alignment first and uses it unless the volumes are already
aligned; you can also choose centres of mass, rigid, affine or none, or pre-align them yourself (e.g. with General Registration (BRAINS) or Elastix); a linear parent
transform of the moving volume is used as the starting point. Each bundled model states in
its card the kind of images it was trained on, the working spacing (volumes are resampled to it
internally; the result is always on the fixed volume's own grid) and how intensities are
normalised. Use <i>Advanced</i> to override the spacing, give intensity windows (e.g. CT in HU)
or tune the per-pair refinement that follows the network (<i>Refine iterations</i>: by
default 10 after the network, about 1.5 s for a brain on a CPU; 0 = the network alone).
The bundled models were trained on one contrast. <i>Contrasts</i> (Advanced) says whether the
two volumes share one: <i>Automatic</i> (the default) decides from their intensity correlation
after the initial alignment; for different contrasts (T1 and T2, MR and CT) the network is
skipped and a MIND-SSC refinement alone registers (40 steps, about 8 s for a brain). The
status line after a run says which path ran.
</p>
<p><b>Outputs:</b> a grid (displacement-field) transform, by default a new one named after the
volumes, with the moving volume placed under it so it shows aligned at once; it stores the
resampling direction (TransformFromParent) and carries the fixed and moving volumes as references.
Save it as .h5 or .nii.gz to use it in ITK, ANTs or elastix. Optional: the Jacobian determinant as
an overlay on the fixed volume (blue: compression, white: volume kept, red: expansion), folding
(det &le; 0) as a red label map, a resampled copy of the moving volume and the moving segmentation
or label map propagated to the fixed volume. The folding percentage, SDlogJ and the range of the
determinant are shown under <i>Results</i> and stored as attributes of the transform.</p>
<p>For scripting and batch use see the README (<code>EOIRRegistrationLogic().registerVolumes</code>).
Please cite EOIR (Chen et al., "Encoder-Only Image Registration", IEEE TCSVT 2026,
arXiv:2509.00451) and, when you use the GeoReg model, Sideri-Lampretsa, Stolt-Ans&oacute; et al.,
"Interpretable deformable image registration: a geometric deep learning perspective"
(arXiv:2412.13294).</p>
"""
        self.parent.acknowledgementText = """
This extension re-implements the EOIR and GeoReg methods from their publications; we thank their
authors. It builds on 3D Slicer, PyTorch (through the SlicerPyTorch extension) and SimpleITK.
"""


#
# Parameter node
#

@parameterNodeWrapper
class EOIRRegistrationParameterNode:
    """The panel's choices, saved with the scene.

    fixedVolume, movingVolume - the pair to register.
    movingSegmentation - optional labels on the moving volume to propagate.
    model - bundled model name or model file path (managed by the model combo box).
    device - "auto", "cpu" or "cuda".
    outputTransform - transform to fill; None creates a new one.
    outputVolume - optional resampled moving volume.
    showJacobian, showFolding - QA overlays.
    workingSpacing - isotropic mm, 0 = the model's own.
    useIntensityWindow and the four window bounds - optional intensity windows.
    initialAlignment - "auto", "none", "com", "rigid" or "affine": linear alignment before the
        network ("auto": affine unless the volumes are already aligned).
    contrast - "auto" (decided from the volumes), "same" (the network, then LNCC refinement)
        or "different" (two contrasts such as T1 and T2: the MIND-SSC refinement alone, after
        the network only for a contrast-agnostic model).
    refineIterations - per-pair refinement steps, -1 = the default (10 after the network, 40
        without it), 0 = off.
    refineSeconds - time budget of the refinement, 0 = no limit.
    refineSimilarity - "auto" (follows the contrast), "lncc" or "mind" (MIND-SSC).
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    movingSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    model: str = "default"
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    outputTransform: vtkMRMLTransformNode
    outputVolume: vtkMRMLScalarVolumeNode
    showJacobian: bool = True
    showFolding: bool = True
    workingSpacing: Annotated[float, WithinRange(0.0, 20.0)] = 0.0
    useIntensityWindow: bool = False
    fixedWindowMin: float = 0.0
    fixedWindowMax: float = 1000.0
    movingWindowMin: float = 0.0
    movingWindowMax: float = 1000.0
    initialAlignment: Annotated[str, Choice(["auto", "none", "com", "rigid", "affine"])] = "auto"
    contrast: Annotated[str, Choice(["auto", "same", "different"])] = "auto"
    refineIterations: Annotated[int, WithinRange(-1, 1000)] = ENGINE_DEFAULT_REFINE_ITERATIONS
    refineSeconds: Annotated[float, WithinRange(0.0, 3600.0)] = 0.0
    refineSimilarity: Annotated[str, Choice(["auto", "lncc", "mind"])] = "auto"


#
# EOIRRegistrationWidget
#

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
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode is not None:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

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
        if self._parameterNode is not None:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
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
        """Bundled models with their card's one-line description (read without torch)."""
        from EOIRRegistrationLib.slicer_logic import listBundledModels

        combo = self.ui.modelComboBox
        self._updatingModelComboBox = True
        try:
            combo.clear()
            models = listBundledModels()
            if not models:
                combo.addItem("default", "default")
                combo.setItemData(0, "The engine's default model", qt.Qt.ToolTipRole)
            for model in models:
                combo.addItem(model.name, model.name)
                combo.setItemData(combo.count - 1, model.description, qt.Qt.ToolTipRole)
            combo.addItem("Load model file...", LOAD_MODEL_FILE)
        finally:
            self._updatingModelComboBox = False
        self._modelDescriptions = {m.name: m.description for m in models}

    def _selectModelInComboBox(self, model):
        combo = self.ui.modelComboBox
        self._updatingModelComboBox = True
        try:
            model = model or "default"
            index = combo.findData(model)
            if index < 0 and model == "default" and combo.count > 1:
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
        data = combo.itemData(combo.currentIndex)
        description = self._modelDescriptions.get(data) if hasattr(self, "_modelDescriptions") else None
        if description is None:
            description = f"Model file: {data}" if data and os.path.sep in str(data) else ""
        self.ui.modelDescriptionLabel.text = description

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
        from EOIRRegistrationLib.slicer_logic import gpuProbablyAvailable

        combo = self.ui.deviceComboBox
        for index, value in enumerate(["auto", "cpu", "cuda"]):
            if index < combo.count:
                combo.setItemText(index, DEVICE_LABELS[value])
        gpu = gpuProbablyAvailable()
        gpuIndex = 2
        if combo.count > gpuIndex:
            model = combo.model()
            item = model.item(gpuIndex) if hasattr(model, "item") else None
            if item is not None:
                item.setEnabled(gpu)
            else:  # Qt's documented way for any model: Qt::UserRole - 1 holds the item flags
                combo.setItemData(gpuIndex, None if gpu else 0, qt.Qt.UserRole - 1)
            combo.setItemData(gpuIndex, "Run on the GPU (CUDA)." if gpu else
                              "No CUDA GPU was found on this computer (no NVIDIA driver); the CPU "
                              "is used. A registration takes longer on the CPU but gives the same "
                              "result.", qt.Qt.ToolTipRole)
        if not gpu and self._parameterNode is not None and self._parameterNode.device == "cuda":
            self._parameterNode.device = "auto"

    def _decorateChoiceComboBoxes(self):
        """Readable labels and per-item tooltips (the parameter node connector fills each combo
        box with the engine's names, in this order, and reads it by index)."""
        for combo, labels, tips in (
                (self.ui.initialAlignmentComboBox, INITIAL_ALIGNMENT_LABELS, INITIAL_ALIGNMENT_TIPS),
                (self.ui.refineSimilarityComboBox, REFINE_SIMILARITY_LABELS, REFINE_SIMILARITY_TIPS),
                (self.ui.contrastComboBox, CONTRAST_LABELS, CONTRAST_TIPS)):
            for index, value in enumerate(labels):
                if index < combo.count:
                    combo.setItemText(index, labels[value])
                    combo.setItemData(index, tips[value], qt.Qt.ToolTipRole)

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
        """torch comes from the PyTorch extension; offer to install it when it is missing.
        Nothing else is ever (re)installed."""
        import importlib.util

        if importlib.util.find_spec("torch") is not None:
            return True
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(
                "EOIR Registration needs PyTorch. Install the 'PyTorch' extension from the "
                "Extensions Manager, restart Slicer, and press Apply again.")
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            return True
        torch = torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=">=2.1")
        if torch is None:
            self.ui.statusLabel.text = "PyTorch is not installed; registration not started."
            return False
        return True

    def _intensityWindow(self):
        p = self._parameterNode
        if not p.useIntensityWindow:
            return None
        if p.fixedWindowMax <= p.fixedWindowMin or p.movingWindowMax <= p.movingWindowMin:
            raise ValueError("each intensity window needs a maximum above its minimum")
        return ((p.fixedWindowMin, p.fixedWindowMax), (p.movingWindowMin, p.movingWindowMax))

    def _startRegistration(self):
        from EOIRRegistrationLib.slicer_logic import ProcessRegistration

        p = self._parameterNode
        inputs = self.logic.prepareInputs(
            p.fixedVolume, p.movingVolume, movingSegmentationNode=p.movingSegmentation,
            outputTransformNode=p.outputTransform, outputVolumeNode=p.outputVolume)
        python = shutil.which("PythonSlicer") or shutil.which("PythonSlicer.exe") or sys.executable
        job = ProcessRegistration(
            inputs, pythonExecutable=python, model=p.model or "default", device=p.device,
            workingSpacing=p.workingSpacing if p.workingSpacing > 0 else None,
            intensityWindow=self._intensityWindow(), initialAlignment=p.initialAlignment,
            refineIterations=p.refineIterations, refineSeconds=p.refineSeconds,
            refineSimilarity=p.refineSimilarity, contrast=p.contrast,
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
        estimate = f", about {remaining:.0f} s left" if remaining is not None else ""
        if not job.done:
            self.ui.statusLabel.text = f"{stage} ({elapsed:.0f} s{estimate})"
            return
        self._timer.stop()
        self._finishRegistration(job)

    def _finishRegistration(self, job):
        from EOIRRegistrationLib.errors import RegistrationCancelled
        from EOIRRegistrationLib.slicer_logic import describeError

        inputs, options = self._jobInputs, self._jobOptions
        self._job = self._jobInputs = self._jobOptions = None
        self._setRunning(False)
        if job.error is not None:
            if isinstance(job.error, RegistrationCancelled):
                self.ui.statusLabel.text = "Cancelled. The scene was left as it was."
            else:
                self.ui.statusLabel.text = "Registration failed."
                slicer.util.errorDisplay(f"Registration failed: {describeError(job.error)}")
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
        qa = outputs.qa
        self.ui.resultsCollapsibleButton.show()
        self.ui.foldingValueLabel.text = f"{qa.get('folding_percent', float('nan')):.4f} % of voxels"
        self.ui.sdlogjValueLabel.text = f"{qa.get('sdlogj', float('nan')):.4f}"
        self.ui.jacobianRangeValueLabel.text = (f"{qa.get('jacobian_min', float('nan')):.3f} / "
                                                f"{qa.get('jacobian_max', float('nan')):.3f}")
        self.ui.runValueLabel.text = f"{outputs.modelName or 'model'} on {outputs.device or '?'}, {seconds:.1f} s"
        method = f" {outputs.method[:1].upper()}{outputs.method[1:]}." if outputs.method else ""
        self.ui.statusLabel.text = (f"Done: '{outputs.transformNode.GetName()}' holds the result; "
                                    f"the moving volume is shown through it.{method}")


#
# EOIRRegistrationLogic
#

class EOIRRegistrationLogic(ScriptedLoadableModuleLogic):
    """Headless logic (Python console, batch scripts, tests): delegates to
    ``EOIRRegistrationLib.slicer_logic.RegistrationLogic`` on ``slicer.mrmlScene``.

    Example::

        logic = slicer.util.getModuleLogic("EOIRRegistration")
        out = logic.registerVolumes(fixedNode, movingNode, device="cpu")
        print(out.transformNode.GetName(), out.qa)
    """

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene

    def getParameterNode(self):
        return EOIRRegistrationParameterNode(super().getParameterNode())

    @property
    def registrationLogic(self):
        from EOIRRegistrationLib.slicer_logic import RegistrationLogic

        return RegistrationLogic(self._scene or slicer.mrmlScene, slicer.app.applicationLogic())

    def prepareInputs(self, fixedVolumeNode, movingVolumeNode, movingSegmentationNode=None,
                      outputTransformNode=None, outputVolumeNode=None):
        return self.registrationLogic.prepareInputs(fixedVolumeNode, movingVolumeNode,
                                                    movingSegmentationNode, outputTransformNode,
                                                    outputVolumeNode)

    def createOutputs(self, inputs, result, **kwargs):
        return self.registrationLogic.createOutputs(inputs, result, **kwargs)

    def registerVolumes(self, fixedVolumeNode, movingVolumeNode, model="default", device="auto",
                        outputTransformNode=None, outputVolumeNode=None,
                        movingSegmentationNode=None, showJacobian=True, showFolding=True,
                        workingSpacing=None, intensityWindow=None, initialAlignment="auto",
                        refineIterations=None, refineSeconds=0.0, refineSimilarity=None,
                        useNetwork=None, contrast="auto", progressCallback=None, cancelEvent=None):
        """Register (blocking, in this process) and return the result nodes and QA figures
        (``RegistrationOutputs``: transformNode, jacobianVolumeNode, foldingVolumeNode,
        warpedVolumeNode, warpedSegmentationNode, qa, timings, modelName, device,
        initialMatrix, method). ``initialAlignment``: "auto" (default), "none", "com", "rigid" or
        "affine"; ``contrast``: "auto" (default), "same" or "different" (two contrasts: the
        MIND-SSC refinement alone); ``refineIterations``: None = the default, 0 = no refinement;
        ``refineSeconds``: 0 = no time limit; ``refineSimilarity``: None (follows the contrast),
        "lncc" or "mind"; ``useNetwork``: None (follows the contrast), False or True.
        See ``RegistrationLogic.registerVolumes`` for the parameters."""
        return self.registrationLogic.registerVolumes(
            fixedVolumeNode, movingVolumeNode, model=model, device=device,
            outputTransformNode=outputTransformNode, outputVolumeNode=outputVolumeNode,
            movingSegmentationNode=movingSegmentationNode, showJacobian=showJacobian,
            showFolding=showFolding, workingSpacing=workingSpacing,
            intensityWindow=intensityWindow, initialAlignment=initialAlignment,
            refineIterations=refineIterations, refineSeconds=refineSeconds,
            refineSimilarity=refineSimilarity, useNetwork=useNetwork, contrast=contrast,
            progressCallback=progressCallback, cancelEvent=cancelEvent)


#
# EOIRRegistrationTest
#

class EOIRRegistrationTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (``Slicer --testing``, or the Reload and Test button): registers a small
    pair the test builds itself, with the same assertions as the slicer-core tests."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RegisterSyntheticPair()
        self.setUp()
        self.test_CancelLeavesSceneAsItWas()

    def _addPair(self):
        import SimpleITK as sitk
        from EOIRRegistrationLib import slicer_bridge
        from EOIRRegistrationLib.slicer_logic import syntheticTestPair

        fixed, moving, fixedLabels, movingLabels = syntheticTestPair()
        scene = slicer.mrmlScene
        fixedNode = slicer_bridge.imageToVolumeNode(fixed, scene, "fixed")
        movingNode = slicer_bridge.imageToVolumeNode(moving, scene, "moving")
        labelNode = slicer_bridge.imageToVolumeNode(sitk.Cast(movingLabels, sitk.sitkUInt8), scene,
                                                    "moving labels",
                                                    className="vtkMRMLLabelMapVolumeNode")
        return fixedNode, movingNode, labelNode, fixed, fixedLabels, movingLabels

    def test_RegisterSyntheticPair(self):
        import numpy as np
        import SimpleITK as sitk
        from EOIRRegistrationLib.slicer_logic import diceCoefficient

        self.delayDisplay("Registering a synthetic pair")
        fixedNode, movingNode, labelNode, fixed, fixedLabels, movingLabels = self._addPair()
        outputVolume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
        logic = EOIRRegistrationLogic()
        out = logic.registerVolumes(fixedNode, movingNode, device="cpu",
                                    outputVolumeNode=outputVolume,
                                    movingSegmentationNode=labelNode)
        before = diceCoefficient(fixedLabels, movingLabels)
        after = diceCoefficient(fixedLabels, slicer.util.arrayFromVolume(out.warpedSegmentationNode))
        self.assertGreater(after, before + 0.05)
        fixedArray = sitk.GetArrayFromImage(fixed)
        mseBefore = np.mean((slicer.util.arrayFromVolume(movingNode) - fixedArray) ** 2)
        mseAfter = np.mean((slicer.util.arrayFromVolume(outputVolume) - fixedArray) ** 2)
        self.assertLess(mseAfter, mseBefore)
        self.assertLess(out.foldingPercent, 1.0)
        self.assertIs(movingNode.GetParentTransformNode(), out.transformNode)
        self.assertIs(out.transformNode.GetNodeReference("spatialRegistrationFixed"), fixedNode)
        self.delayDisplay(f"Dice {before:.3f} -> {after:.3f}; {out.summary()}")

    def test_CancelLeavesSceneAsItWas(self):
        import threading
        from EOIRRegistrationLib.errors import RegistrationCancelled

        fixedNode, movingNode, labelNode, *_ = self._addPair()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        cancel = threading.Event()
        with self.assertRaises(RegistrationCancelled):
            EOIRRegistrationLogic().registerVolumes(
                fixedNode, movingNode, device="cpu", movingSegmentationNode=labelNode,
                progressCallback=lambda stage, fraction: cancel.set(), cancelEvent=cancel)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.assertIsNone(movingNode.GetParentTransformNode())
        self.delayDisplay("Cancel test passed")
