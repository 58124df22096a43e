"""Headless registration logic of the Slicer module: scene-explicit, no Qt, no ``slicer.app``.

``EOIRRegistration.py``'s ``EOIRRegistrationLogic`` (a ``ScriptedLoadableModuleLogic``) delegates to
:class:`RegistrationLogic`, which also runs with the Qt-free ``slicer-core`` wheel (tests, batch
scripts outside the application). The work is split in three steps so that a GUI can run the
heavy middle one off the GUI thread:

1. :meth:`RegistrationLogic.prepareInputs` (thread owning the scene): reads the volumes (and the
   moving segmentation or label map) into SimpleITK images, validates the choices. The scene is
   not modified.
2. :meth:`RegistrationLogic.runEngine` (any thread): the engine's ``register``; never touches MRML.
3. :meth:`RegistrationLogic.createOutputs` (thread owning the scene): grid transform node,
   Jacobian and folding overlays, optional warped volume and propagated segmentation. It is one
   transaction: after an error or a cancel every node it added is removed again and every node it
   changed is put back, so the scene is left as it was.

:meth:`RegistrationLogic.registerVolumes` runs the three in a row (blocking; for scripts).
:class:`ProcessRegistration` runs step 2 in a child Python process (``slicer_worker.py``) and is
what the Slicer panel uses: inside Slicer, background Python *threads* get little time while the
GUI thread runs Qt, so a thread would freeze the registration or the GUI. Both report progress and
can be cancelled; :class:`BackgroundRegistration` is the thread variant for plain Python hosts.

torch is imported only inside :meth:`runEngine` (through the engine), never at import time.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk

from . import slicer_bridge as bridge
from .errors import EOIRError, InputError, RegistrationCancelled

__all__ = [
    "RegistrationInputs",
    "RegistrationOutputs",
    "RegistrationLogic",
    "BundledModel",
    "listBundledModels",
    "defaultModelName",
    "gpuProbablyAvailable",
    "computeQA",
    "BackgroundRegistration",
    "ProcessRegistration",
    "EngineResult",
    "INITIAL_ALIGNMENTS",
    "INITIAL_MATRIX_ATTRIBUTE",
    "checkEngineOptions",
    "initialMatrixFromAttribute",
    "describeError",
    "syntheticTestPair",
    "diceCoefficient",
]

BUNDLED_MODELS_DIR = Path(__file__).resolve().parent / "bundled_models"

#: Initial (linear) alignment methods of the engine (``alignment.METHODS``; repeated here so the
#: panel and early checks need no torch): automatic (affine unless already aligned), none,
#: centres of mass, rigid, affine.
INITIAL_ALIGNMENTS = ("auto", "none", "com", "rigid", "affine")
#: Attribute of the output transform holding the engine's initial matrix (see createOutputs).
INITIAL_MATRIX_ATTRIBUTE = "EOIRRegistration.initial_matrix_lps"
MAX_REFINE_ITERATIONS = 1000
#: Refinement similarities of the engine (``refine.SIMILARITIES``): LNCC for one contrast,
#: MIND-SSC descriptors for two. None ("auto") follows the contrast.
REFINE_SIMILARITIES = ("lncc", "mind")
#: The engine's contrast choices (``contrast.CONTRASTS``): "same" runs the network then LNCC
#: refinement, "different" the MIND-SSC refinement alone, "auto" decides from the images.
CONTRASTS = ("auto", "same", "different")

#: Overall progress fractions of the three steps (the engine's own fractions are scaled into its
#: share, so a progress bar moves once from 0 to 1).
_PREPARE_END = 0.05
_ENGINE_END = 0.90


def _engineRegister():
    """The engine's ``register`` (imported lazily: it imports torch). Tests replace this."""
    from .pipeline import register

    return register


def _isCancelled(cancelEvent) -> bool:
    if cancelEvent is None:
        return False
    if hasattr(cancelEvent, "is_set"):
        return bool(cancelEvent.is_set())
    return bool(cancelEvent())


def _checkCancelled(cancelEvent) -> None:
    if _isCancelled(cancelEvent):
        raise RegistrationCancelled("registration cancelled")


def checkEngineOptions(initialAlignment="auto", refineIterations=None, refineSeconds=0.0,
                       refineSimilarity=None, useNetwork=None, contrast="auto"):
    """Validate the initial-alignment, refinement, network and contrast choices (no torch);
    returns them normalised as (method, iterations, seconds, similarity, network, contrast),
    where iterations, similarity and network may be None (the engine chooses by contrast).
    Raises :class:`InputError` with the reason."""
    method = str(initialAlignment or "auto").lower()
    if method not in INITIAL_ALIGNMENTS:
        raise InputError(f"unknown initial alignment {initialAlignment!r}; choose one of "
                         f"{', '.join(INITIAL_ALIGNMENTS)}")
    try:
        iterations = None if refineIterations is None else int(refineIterations)
        seconds = float(refineSeconds or 0.0)
    except (TypeError, ValueError) as exc:
        raise InputError(f"refinement settings must be numbers: {exc}") from exc
    if iterations is not None and (iterations != float(refineIterations)
                                   or iterations > MAX_REFINE_ITERATIONS):
        raise InputError(f"refine iterations must be a whole number from 0 (off) to "
                         f"{MAX_REFINE_ITERATIONS} (negative: the default), got "
                         f"{refineIterations!r}")
    if iterations is not None and iterations < 0:
        iterations = None
    if not np.isfinite(seconds) or seconds < 0:
        raise InputError(f"the refinement time budget must be 0 (no limit) or more seconds, "
                         f"got {refineSeconds!r}")
    similarity = str(refineSimilarity or "auto").lower()
    if similarity == "auto":
        similarity = None
    elif similarity not in REFINE_SIMILARITIES:
        raise InputError(f"unknown refinement similarity {refineSimilarity!r}; choose one of "
                         f"auto, {', '.join(REFINE_SIMILARITIES)}")
    network = None if useNetwork is None else bool(useNetwork)
    contrast = str(contrast or "auto").lower()
    if contrast not in CONTRASTS:
        raise InputError(f"unknown contrast {contrast!r}; choose one of {', '.join(CONTRASTS)}")
    if iterations == 0 and network is False:  # (a one-contrast model on "different": the engine)
        raise InputError("without the network the refinement is the whole registration: give "
                         "it iterations (e.g. 40)")
    return method, iterations, seconds, similarity, network, contrast


def initialMatrixToAttribute(matrix) -> str:
    """16 numbers, row-major, separated by spaces (the transform attribute's format)."""
    return " ".join(f"{float(v):.12g}" for v in np.asarray(matrix, dtype=np.float64).ravel())


def initialMatrixFromAttribute(text: str) -> np.ndarray:
    """4x4 matrix from :func:`initialMatrixToAttribute`'s text."""
    values = [float(v) for v in str(text).split()]
    if len(values) != 16:
        raise ValueError(f"an initial matrix needs 16 numbers, got {len(values)}")
    return np.array(values, dtype=np.float64).reshape(4, 4)


def gpuProbablyAvailable() -> bool:
    """Whether a CUDA GPU is likely usable, *without importing torch* when it is not loaded yet
    (an NVIDIA driver is present). Once torch is loaded its own answer is used."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return bool(torch.cuda.is_available())
        except Exception:  # a broken CUDA setup must not break the panel
            return False
    if os.path.exists("/proc/driver/nvidia/version"):
        return True
    import shutil

    return shutil.which("nvidia-smi") is not None


# ---------------------------------------------------------------------------------------------
# Bundled models, listed without torch
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BundledModel:
    name: str
    path: str
    description: str


class _CardOnlyUnpickler(pickle.Unpickler):
    """Reads the plain-Python parts of a ``torch.save`` payload (the model card) without torch:
    tensors and storages come back as None. Only containers and builtins are ever constructed."""

    _ALLOWED = {("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            import collections

            return getattr(collections, name)
        if module == "builtins" and name in ("set", "frozenset", "slice", "complex"):
            return getattr(__import__("builtins"), name)
        return lambda *args, **kwargs: None

    def persistent_load(self, pid):
        return None


def _readCardWithoutTorch(path: Path) -> dict:
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        with open(sidecar, encoding="utf-8") as f:
            data = json.load(f)
        return data.get("card", data) if isinstance(data, dict) else {}
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pickles:
            return {}
        with archive.open(pickles[0]) as f:
            payload = _CardOnlyUnpickler(f).load()
    card = payload.get("card") if isinstance(payload, dict) else None
    return dict(card) if isinstance(card, dict) else {}


def defaultModelName() -> str | None:
    """The engine's default model name (``modelfile.DEFAULT_MODEL``), read from the source without
    importing it (``modelfile`` imports torch)."""
    import ast

    try:
        tree = ast.parse((Path(__file__).resolve().parent / "modelfile.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and \
                any(getattr(target, "id", None) == "DEFAULT_MODEL" for target in node.targets):
            return str(node.value.value)
    return None


def listBundledModels() -> list[BundledModel]:
    """Models shipped in ``EOIRRegistrationLib/bundled_models`` with the one-line description of
    their model card, read without importing torch (a ``<name>.json`` card next to the ``.pt``
    file if present, else the card inside the file). The engine's default model comes first."""
    models = []
    if not BUNDLED_MODELS_DIR.is_dir():
        return models
    for path in sorted(BUNDLED_MODELS_DIR.glob("*.pt")):
        try:
            description = str(_readCardWithoutTorch(path).get("description", "")).strip()
        except Exception as exc:  # a damaged file must not break the panel; the engine reports it
            logging.warning("EOIRRegistration: cannot read the card of %s: %s", path, exc)
            description = ""
        models.append(BundledModel(path.stem, str(path), description.splitlines()[0]
                                   if description else ""))
    default = defaultModelName()
    models.sort(key=lambda m: (m.name != default, m.name))
    return models


# ---------------------------------------------------------------------------------------------
# Data passed between the steps
# ---------------------------------------------------------------------------------------------

@dataclass
class RegistrationInputs:
    """What :meth:`RegistrationLogic.prepareInputs` read from the scene (plain SimpleITK images)."""

    fixedVolumeNode: object
    movingVolumeNode: object
    fixedImage: sitk.Image
    movingImage: sitk.Image
    movingSegmentationNode: object = None
    movingLabels: Optional[sitk.Image] = None
    segments: list = field(default_factory=list)  # SegmentInfo for a segmentation node
    labelsKind: Optional[str] = None  # "segmentation", "labelmap" or None


@dataclass
class RegistrationOutputs:
    """Result of a registration in the scene, plus the QA figures."""

    transformNode: object
    jacobianVolumeNode: object = None
    foldingVolumeNode: object = None
    warpedVolumeNode: object = None
    warpedSegmentationNode: object = None
    qa: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    modelName: str = ""
    device: str = ""
    #: 4x4 LPS matrix (fixed point -> moving point, in the frame of the moving volume with its
    #: linear parent transforms applied) that the engine started from and that the transform
    #: contains; None when the engine did not report one.
    initialMatrix: Optional[np.ndarray] = None
    #: what ran, e.g. "different contrasts (intensity correlation -0.24): MIND-SSC
    #: refinement alone, 40 steps"
    method: str = ""

    @property
    def foldingPercent(self) -> float:
        return float(self.qa.get("folding_percent", float("nan")))

    @property
    def sdLogJ(self) -> float:
        return float(self.qa.get("sdlogj", float("nan")))

    def summary(self) -> str:
        qa = self.qa
        method = f"{self.method}; " if self.method else ""
        return (f"{method}folding {qa.get('folding_percent', float('nan')):.3f} % of voxels, "
                f"SDlogJ {qa.get('sdlogj', float('nan')):.3f}, det(J) in "
                f"[{qa.get('jacobian_min', float('nan')):.3f}, "
                f"{qa.get('jacobian_max', float('nan')):.3f}]")


def computeQA(jacobian: sitk.Image) -> dict:
    """QA figures of a Jacobian-determinant image (same keys as the engine's ``qa``): the share of
    voxels with det <= 0 (percent), the standard deviation of log(det) over voxels with det > 0,
    and the extremes."""
    det = sitk.GetArrayViewFromImage(jacobian).astype(np.float64)
    positive = det[det > 0]
    return {
        "folding_percent": float(100.0 * np.count_nonzero(det <= 0) / det.size),
        "sdlogj": float(np.std(np.log(positive))) if positive.size else float("nan"),
        "jacobian_min": float(det.min()),
        "jacobian_max": float(det.max()),
    }


# ---------------------------------------------------------------------------------------------
# The logic
# ---------------------------------------------------------------------------------------------

class _Transaction:
    """Nodes added and changes made while creating outputs, undone together on failure.

    Every node added to the scene after the transaction started (new outputs, colour tables,
    display nodes created for existing nodes) is removed on rollback; changes to existing nodes
    are undone from the records made before changing them.
    """

    def __init__(self, scene):
        self.scene = scene
        self.created = []
        self.undo = bridge.UndoStack()
        self._nodeIDsBefore = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}

    def added(self, node):
        if node is not None:
            self.created.append(node)
        return node

    def backupContent(self, node):
        """Remember ``node``'s content (transform, voxels, geometry) to restore it on failure."""
        backup = self.scene.CreateNodeByClass(node.GetClassName())
        backup.CopyContent(node, True)
        self.undo.add(node.CopyContent, backup, True)
        name = node.GetName()
        self.undo.add(node.SetName, name)

    def backupReferences(self, node, roles):
        for role in roles:
            self.undo.add(node.SetNodeReferenceID, role, node.GetNodeReferenceID(role))

    def backupAttributes(self, node, names):
        for name in names:
            previous = node.GetAttribute(name)
            if previous is None:
                self.undo.add(node.RemoveAttribute, name)
            else:
                self.undo.add(node.SetAttribute, name, previous)

    def rollback(self):
        try:
            self.undo.run()
        finally:
            added = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())
                     if self.scene.GetNthNode(i).GetID() not in self._nodeIDsBefore]
            bridge.removeNodes(self.scene, list(reversed(self.created)) + added[::-1])
            self.created = []


QA_ATTRIBUTE_PREFIX = "EOIRRegistration."


def _checkOnFixedGrid(result, fixedImage: sitk.Image) -> None:
    """The engine contract: every output lies on the fixed image's grid. Checked before anything
    is put into the scene, so a broken contract cannot produce a misplaced transform."""
    for name in ("displacement", "warped", "jacobian", "folding"):
        image = getattr(result, name, None)
        if image is None:
            raise RuntimeError(f"the engine returned no {name} image")
        same = (image.GetSize() == fixedImage.GetSize()
                and np.allclose(image.GetSpacing(), fixedImage.GetSpacing(), rtol=1e-6, atol=1e-9)
                and np.allclose(image.GetOrigin(), fixedImage.GetOrigin(), rtol=1e-6, atol=1e-6)
                and np.allclose(image.GetDirection(), fixedImage.GetDirection(), atol=1e-6))
        if not same:
            raise RuntimeError(f"the engine's {name} image is not on the fixed volume's grid")
    if result.displacement.GetNumberOfComponentsPerPixel() != 3:
        raise RuntimeError("the engine's displacement is not a 3-component vector image")


class RegistrationLogic:
    """Registration in a given MRML scene (see the module docstring for the three steps)."""

    def __init__(self, scene, applicationLogic=None):
        if scene is None:
            raise ValueError("RegistrationLogic needs a vtkMRMLScene")
        self.scene = scene
        self.applicationLogic = applicationLogic

    # -- step 1 -------------------------------------------------------------------------------
    def prepareInputs(self, fixedVolumeNode, movingVolumeNode, movingSegmentationNode=None,
                      outputTransformNode=None, outputVolumeNode=None) -> RegistrationInputs:
        """Read the inputs into SimpleITK images (world LPS geometry) and check the choices."""
        if fixedVolumeNode is None or movingVolumeNode is None:
            raise InputError("select both a fixed and a moving volume")
        for node, what in ((fixedVolumeNode, "fixed"), (movingVolumeNode, "moving")):
            if node.GetScene() is not self.scene:
                raise InputError(f"the {what} volume is not in this scene")
            if node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise InputError(f"the {what} volume '{node.GetName()}' is a label map; choose a "
                                 "grey-level volume")
        if fixedVolumeNode.GetID() == movingVolumeNode.GetID():
            raise InputError("the fixed and moving volumes are the same node")
        if outputTransformNode is not None:
            if not outputTransformNode.IsA("vtkMRMLTransformNode"):
                raise InputError("the output transform must be a transform node")
            fixedChain = [t.GetID() for t in bridge.parentTransformChain(fixedVolumeNode)]
            if outputTransformNode.GetID() in fixedChain:
                raise InputError(f"the output transform '{outputTransformNode.GetName()}' is "
                                 "applied to the fixed volume; choose another output transform")
        if outputVolumeNode is not None and outputVolumeNode.GetID() in (
                fixedVolumeNode.GetID(), movingVolumeNode.GetID()):
            raise InputError("the output volume must differ from the fixed and moving volumes")
        ignore = outputTransformNode
        fixedImage = bridge.volumeNodeToImage(fixedVolumeNode)
        movingImage = bridge.volumeNodeToImage(movingVolumeNode, ignoreTransformNode=ignore)
        inputs = RegistrationInputs(fixedVolumeNode, movingVolumeNode, fixedImage, movingImage)
        if movingSegmentationNode is not None:
            inputs.movingSegmentationNode = movingSegmentationNode
            if movingSegmentationNode.IsA("vtkMRMLSegmentationNode"):
                labels, segments = bridge.segmentationToLabelImage(
                    movingSegmentationNode, movingVolumeNode, self.scene,
                    ignoreTransformNode=ignore)
                inputs.movingLabels, inputs.segments = labels, segments
                inputs.labelsKind = "segmentation"
            elif movingSegmentationNode.IsA("vtkMRMLLabelMapVolumeNode"):
                inputs.movingLabels = bridge.volumeNodeToImage(movingSegmentationNode,
                                                               ignoreTransformNode=ignore)
                inputs.labelsKind = "labelmap"
            else:
                raise InputError("the moving labels must be a segmentation or a label map volume")
        return inputs

    # -- step 2 -------------------------------------------------------------------------------
    @staticmethod
    def runEngine(inputs: RegistrationInputs, model="default", device="auto",
                  workingSpacing=None, intensityWindow=None, initialAlignment="auto",
                  refineIterations=None, refineSeconds=0.0, refineSimilarity=None,
                  useNetwork=None, contrast="auto",
                  progressCallback: Callable[[str, float], None] | None = None, cancelEvent=None):
        """Run the engine on prepared inputs (any thread; touches no MRML). Returns the engine's
        ``RegistrationResult``; raises ``RegistrationCancelled`` when ``cancelEvent`` is set.
        ``initialAlignment``, ``refineIterations``, ``refineSeconds``, ``refineSimilarity``,
        ``useNetwork`` and ``contrast``: see :meth:`registerVolumes`."""
        method, iterations, seconds, similarity, network, contrast = checkEngineOptions(
            initialAlignment, refineIterations, refineSeconds, refineSimilarity, useNetwork,
            contrast)
        _checkCancelled(cancelEvent)
        register = _engineRegister()
        from .refine import config_from_options  # torch: imported with the engine

        def progress(stage, fraction):
            if progressCallback is not None:
                overall = _PREPARE_END + (_ENGINE_END - _PREPARE_END) * float(fraction)
                progressCallback(stage, min(max(overall, 0.0), 1.0))

        if workingSpacing is not None and not isinstance(workingSpacing, (list, tuple)):
            workingSpacing = (float(workingSpacing),) * 3
        return register(inputs.fixedImage, inputs.movingImage, model=model, device=device,
                        moving_labels=inputs.movingLabels, working_spacing=workingSpacing,
                        intensity_window=intensityWindow,
                        refine=config_from_options(iterations, seconds, similarity),
                        initial_alignment=method, contrast=contrast, network=network,
                        progress=progress, cancel=cancelEvent)

    # -- step 3 -------------------------------------------------------------------------------
    def createOutputs(self, inputs: RegistrationInputs, result, outputTransformNode=None,
                      outputVolumeNode=None, showJacobian=True, showFolding=True,
                      progressCallback=None, cancelEvent=None) -> RegistrationOutputs:
        """Put the engine's result into the scene (one transaction, see the module docstring)."""
        fixedNode, movingNode = inputs.fixedVolumeNode, inputs.movingVolumeNode
        transaction = _Transaction(self.scene)
        steps = ["transform", "jacobian", "folding", "warped volume", "labels", "views"]

        def step(index, name):
            _checkCancelled(cancelEvent)
            if progressCallback is not None:
                progressCallback(f"creating outputs: {name}",
                                 _ENGINE_END + (1.0 - _ENGINE_END) * index / len(steps))

        _checkOnFixedGrid(result, inputs.fixedImage)
        try:
            qa = dict(result.qa) if getattr(result, "qa", None) else computeQA(result.jacobian)
            movingName = movingNode.GetName()

            step(0, "transform")
            if outputTransformNode is None:
                transformNode = transaction.added(self.scene.AddNewNodeByClass(
                    "vtkMRMLGridTransformNode",
                    self.scene.GenerateUniqueName(f"{movingName} to {fixedNode.GetName()} (EOIR)")))
            else:
                transformNode = outputTransformNode
                transaction.backupContent(transformNode)
                transaction.backupReferences(transformNode, [
                    transformNode.GetMovingNodeReferenceRole(),
                    transformNode.GetFixedNodeReferenceRole()])
            qaAttributes = {QA_ATTRIBUTE_PREFIX + key: f"{float(value):.6g}"
                            for key, value in qa.items()}
            qaAttributes[QA_ATTRIBUTE_PREFIX + "model"] = str(getattr(result, "model_name", ""))
            initialMatrix = getattr(result, "initial_matrix", None)
            if initialMatrix is not None:
                initialMatrix = np.array(initialMatrix, dtype=np.float64).reshape(4, 4)
            transaction.backupAttributes(transformNode,
                                         list(qaAttributes) + [INITIAL_MATRIX_ATTRIBUTE])
            bridge.setGridTransformFromDisplacement(transformNode, result.displacement)
            bridge.setRegistrationReferences(transformNode, fixedNode, movingNode)
            for name, value in qaAttributes.items():
                transformNode.SetAttribute(name, value)
            if initialMatrix is not None:
                transformNode.SetAttribute(INITIAL_MATRIX_ATTRIBUTE,
                                           initialMatrixToAttribute(initialMatrix))
            elif transformNode.GetAttribute(INITIAL_MATRIX_ATTRIBUTE) is not None:
                transformNode.RemoveAttribute(INITIAL_MATRIX_ATTRIBUTE)  # not from this run
            bridge.placeMovingUnderTransform(movingNode, transformNode, transaction.undo)

            jacobianNode = None
            step(1, "Jacobian determinant")
            if showJacobian:
                jacobianNode = transaction.added(bridge.imageToVolumeNode(
                    sitk.Cast(result.jacobian, sitk.sitkFloat32), self.scene,
                    self.scene.GenerateUniqueName(f"{movingName} Jacobian determinant")))
                colorNode = bridge.getOrCreateJacobianColorNode(self.scene, transaction.created)
                bridge.showJacobianVolume(jacobianNode, colorNode)

            foldingNode = None
            step(2, "folding")
            if showFolding:
                foldingNode = transaction.added(bridge.imageToVolumeNode(
                    sitk.Cast(result.folding, sitk.sitkUInt8), self.scene,
                    self.scene.GenerateUniqueName(f"{movingName} folding"),
                    className="vtkMRMLLabelMapVolumeNode"))
                colorNode = bridge.getOrCreateFoldingColorNode(self.scene, transaction.created)
                bridge.showFoldingLabelmap(foldingNode, colorNode)

            warpedNode = None
            step(3, "warped volume")
            if outputVolumeNode is not None:
                transaction.backupContent(outputVolumeNode)
                transaction.undo.add(outputVolumeNode.SetAndObserveTransformNodeID,
                                     outputVolumeNode.GetTransformNodeID())
                outputVolumeNode.SetAndObserveTransformNodeID(None)
                warped = result.warped
                if warped.GetPixelID() != inputs.movingImage.GetPixelID() and \
                        inputs.movingImage.GetPixelID() in (sitk.sitkInt16, sitk.sitkUInt16,
                                                            sitk.sitkInt8, sitk.sitkUInt8,
                                                            sitk.sitkInt32, sitk.sitkUInt32):
                    warped = sitk.Cast(sitk.Round(warped), inputs.movingImage.GetPixelID())
                warpedNode = bridge.imageToVolumeNode(warped, self.scene, volumeNode=outputVolumeNode)

            warpedLabelsNode = None
            step(4, "propagated labels")
            labels = getattr(result, "warped_labels", None)
            if inputs.labelsKind is not None and labels is not None:
                sourceName = inputs.movingSegmentationNode.GetName()
                name = self.scene.GenerateUniqueName(f"{sourceName} registered")
                if inputs.labelsKind == "segmentation":
                    warpedLabelsNode = transaction.added(bridge.labelImageToSegmentationNode(
                        labels, self.scene, name, inputs.segments, referenceVolumeNode=fixedNode))
                else:
                    labelImage = sitk.Cast(labels, inputs.movingLabels.GetPixelID())
                    warpedLabelsNode = transaction.added(bridge.imageToVolumeNode(
                        labelImage, self.scene, name, className="vtkMRMLLabelMapVolumeNode"))
                    sourceDisplay = inputs.movingSegmentationNode.GetDisplayNode()
                    if sourceDisplay is not None and sourceDisplay.GetColorNodeID():
                        warpedLabelsNode.GetDisplayNode().SetAndObserveColorNodeID(
                            sourceDisplay.GetColorNodeID())

            step(5, "slice views")
            self._recordSliceViews(transaction)
            bridge.setSliceViewerLayers(
                self.scene, background=fixedNode,
                foreground=jacobianNode if jacobianNode is not None else movingNode,
                foregroundOpacity=0.5, label=foldingNode)
            _checkCancelled(cancelEvent)
        except BaseException:
            transaction.rollback()
            raise
        if progressCallback is not None:
            progressCallback("done", 1.0)
        return RegistrationOutputs(
            transformNode=transformNode, jacobianVolumeNode=jacobianNode,
            foldingVolumeNode=foldingNode, warpedVolumeNode=warpedNode,
            warpedSegmentationNode=warpedLabelsNode, qa=qa,
            timings=dict(getattr(result, "timings", {}) or {}),
            modelName=str(getattr(result, "model_name", "")), device=str(getattr(result, "device", "")),
            initialMatrix=initialMatrix, method=str(getattr(result, "method", "")))

    def _recordSliceViews(self, transaction: _Transaction) -> None:
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = self.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            transaction.undo.add(composite.SetBackgroundVolumeID, composite.GetBackgroundVolumeID())
            transaction.undo.add(composite.SetForegroundVolumeID, composite.GetForegroundVolumeID())
            transaction.undo.add(composite.SetForegroundOpacity, composite.GetForegroundOpacity())
            transaction.undo.add(composite.SetLabelVolumeID, composite.GetLabelVolumeID())

    # -- all three ----------------------------------------------------------------------------
    def registerVolumes(self, fixedVolumeNode, movingVolumeNode, model="default", device="auto",
                        outputTransformNode=None, outputVolumeNode=None,
                        movingSegmentationNode=None, showJacobian=True, showFolding=True,
                        workingSpacing=None, intensityWindow=None, initialAlignment="auto",
                        refineIterations=None, refineSeconds=0.0, refineSimilarity=None,
                        useNetwork=None, contrast="auto",
                        progressCallback: Callable[[str, float], None] | None = None,
                        cancelEvent=None) -> RegistrationOutputs:
        """Register the moving volume to the fixed volume (blocking) and return the result nodes
        and QA figures.

        :param model: a bundled model name ("default"), a model file path or a loaded model.
        :param device: "auto", "cpu" or "cuda".
        :param outputTransformNode: transform node to fill; None creates a new grid transform.
        :param outputVolumeNode: scalar volume node to receive the moving volume resampled on the
            fixed grid; None: no warped volume (the moving volume is shown through the transform).
        :param movingSegmentationNode: segmentation or label map on the moving volume to
            propagate (nearest neighbour) into a new node on the fixed grid.
        :param showJacobian: add the Jacobian determinant volume as foreground overlay.
        :param showFolding: add the folding (det <= 0) label map in red.
        :param workingSpacing: mm (one value or three) or None for the model's own.
        :param intensityWindow: ((fixedLow, fixedHigh), (movingLow, movingHigh)) or None.
        :param initialAlignment: linear alignment computed before the deformable step and
            contained in the output transform: "auto" (default: affine unless the inputs are
            already aligned or the affine does not improve the mutual information), "none",
            "com" (centres of mass), "rigid" or "affine" (mutual information). A linear parent
            transform of the moving volume is the starting point: the moving volume is read with
            it applied, the alignment is computed on top of it, and it stays below the output
            transform. The matrix used is returned (``initialMatrix``) and stored on the
            transform (attribute ``EOIRRegistration.initial_matrix_lps``).
        :param contrast: "auto" (default: decided from the volumes after the initial
            alignment), "same" (one contrast: the network, then LNCC refinement) or "different"
            (two contrasts such as T1 and T2: the MIND-SSC refinement alone, as the bundled
            models are single-contrast). The outputs say which ran (``method``).
        :param refineIterations: per-pair refinement (instance optimisation) steps; None or
            negative = the default (10 after the network, 40 without it), 0 = off.
        :param refineSeconds: time budget of the refinement in seconds, 0 = no limit.
        :param refineSimilarity: None or "auto" (follows the contrast), "lncc" (one contrast)
            or "mind" (MIND-SSC descriptors, two contrasts such as T1 and T2 or MR and CT).
        :param useNetwork: None follows the contrast; False skips the network (the refinement
            alone registers, from the initial alignment); True runs it whatever the contrast.
        :param progressCallback: ``f(stage: str, fraction: float)``, fraction of the whole run.
        :param cancelEvent: ``threading.Event`` (or callable returning bool) to stop the run;
            raises ``RegistrationCancelled`` and leaves the scene as it was.
        """
        started = time.perf_counter()
        checkEngineOptions(initialAlignment, refineIterations, refineSeconds,
                           refineSimilarity, useNetwork, contrast)  # before any work
        if progressCallback is not None:
            progressCallback("reading volumes", 0.0)
        inputs = self.prepareInputs(fixedVolumeNode, movingVolumeNode, movingSegmentationNode,
                                    outputTransformNode, outputVolumeNode)
        if progressCallback is not None:
            progressCallback("reading volumes", _PREPARE_END)
        result = self.runEngine(inputs, model=model, device=device, workingSpacing=workingSpacing,
                                intensityWindow=intensityWindow,
                                initialAlignment=initialAlignment,
                                refineIterations=refineIterations, refineSeconds=refineSeconds,
                                refineSimilarity=refineSimilarity, useNetwork=useNetwork,
                                contrast=contrast, progressCallback=progressCallback,
                                cancelEvent=cancelEvent)
        outputs = self.createOutputs(inputs, result, outputTransformNode=outputTransformNode,
                                     outputVolumeNode=outputVolumeNode, showJacobian=showJacobian,
                                     showFolding=showFolding, progressCallback=progressCallback,
                                     cancelEvent=cancelEvent)
        outputs.timings.setdefault("total_with_scene", time.perf_counter() - started)
        logging.info("EOIRRegistration: %s -> %s done in %.1f s; %s", movingVolumeNode.GetName(),
                     fixedVolumeNode.GetName(), time.perf_counter() - started, outputs.summary())
        return outputs


class BackgroundRegistration:
    """Runs :meth:`RegistrationLogic.runEngine` in a worker thread (plain Python hosts, e.g. a
    notebook with slicer-core; inside the Slicer application use :class:`ProcessRegistration`).

    The owner polls :meth:`poll` from its own thread; MRML is touched only by the owner.
    ``progress`` holds the latest (stage, fraction, elapsed seconds).
    """

    def __init__(self, inputs: RegistrationInputs, **engineKwargs):
        self.inputs = inputs
        self.cancelEvent = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self.progress = ("starting", 0.0, 0.0)
        self._started = time.perf_counter()
        self._lock = threading.Lock()
        self._engineKwargs = engineKwargs
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
                self.inputs, progressCallback=self._onProgress, cancelEvent=self.cancelEvent,
                **self._engineKwargs)
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


@dataclass
class EngineResult:
    """An engine result read back from a worker process (same fields as the engine's
    ``RegistrationResult`` that :meth:`RegistrationLogic.createOutputs` uses)."""

    displacement: sitk.Image
    warped: sitk.Image
    jacobian: sitk.Image
    folding: sitk.Image
    warped_labels: Optional[sitk.Image] = None
    qa: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    model_name: str = ""
    device: str = ""
    initial_matrix: Optional[np.ndarray] = None  # 4x4 LPS, fixed point -> moving point
    method: str = ""  # what ran (the engine's ``RegistrationResult.method``)


def _errorFromWorker(info: dict) -> BaseException:
    from . import errors

    errorClass = getattr(errors, str(info.get("type", "")), None)
    message = str(info.get("message", "")) or "the registration process failed"
    if isinstance(errorClass, type) and issubclass(errorClass, BaseException):
        return errorClass(message)
    return RuntimeError(f"{info.get('type', 'Error')}: {message}")


class ProcessRegistration:
    """Runs the engine in a child Python process (what the Slicer panel uses).

    Same interface as :class:`BackgroundRegistration`: ``start()``, ``poll()``, ``done``,
    ``cancel()``, ``wait()``, then ``result`` (an :class:`EngineResult`) or ``error``.
    ``pythonExecutable`` is ``PythonSlicer`` inside Slicer (any Python with torch and SimpleITK
    elsewhere). Temporary files are removed when the run ends (``poll``/``wait`` see it end).
    Only string models (a bundled name or a file path) can be passed to another process.
    """

    #: seconds a cancelled worker gets to stop at the next stage before it is killed
    CANCEL_GRACE = 5.0

    def __init__(self, inputs: RegistrationInputs, pythonExecutable: str | None = None,
                 model="default", device="auto", workingSpacing=None, intensityWindow=None,
                 initialAlignment="auto", refineIterations=None, refineSeconds=0.0,
                 refineSimilarity=None, useNetwork=None, contrast="auto", engine: str | None = None,
                 tempDir: str | None = None):
        if not isinstance(model, (str, os.PathLike)):
            raise InputError("a model object cannot be sent to the registration process; give a "
                             "bundled model name or a model file path")
        self.inputs = inputs
        self.pythonExecutable = pythonExecutable or sys.executable
        if workingSpacing is not None and not isinstance(workingSpacing, (list, tuple)):
            workingSpacing = (float(workingSpacing),) * 3
        method, iterations, seconds, similarity, network, contrast = checkEngineOptions(
            initialAlignment, refineIterations, refineSeconds, refineSimilarity, useNetwork,
            contrast)
        self._job = {"model": str(model), "device": str(device),
                     "working_spacing": list(workingSpacing) if workingSpacing else None,
                     "intensity_window": intensityWindow, "initial_alignment": method,
                     "refine_iterations": iterations, "refine_seconds": seconds,
                     "refine_similarity": similarity, "use_network": network,
                     "contrast": contrast,
                     "engine": engine}
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
        import subprocess
        import tempfile

        from . import slicer_worker as worker

        self.jobDir = Path(tempfile.mkdtemp(prefix="EOIRRegistration-", dir=self._tempDir))
        try:
            sitk.WriteImage(self.inputs.fixedImage, str(self.jobDir / "fixed.mha"),
                            useCompression=False)
            sitk.WriteImage(self.inputs.movingImage, str(self.jobDir / "moving.mha"),
                            useCompression=False)
            job = dict(self._job, fixed="fixed.mha", moving="moving.mha", labels=None)
            if self.inputs.movingLabels is not None:
                sitk.WriteImage(self.inputs.movingLabels, str(self.jobDir / "labels.mha"),
                                useCompression=False)
                job["labels"] = "labels.mha"
            with open(self.jobDir / worker.JOB_FILE, "w", encoding="utf-8") as f:
                json.dump(job, f)
            self._log = open(self.jobDir / worker.LOG_FILE, "w", encoding="utf-8")
            env = dict(os.environ)
            env["PYTHONUNBUFFERED"] = "1"
            self._started = time.perf_counter()
            self.process = subprocess.Popen(
                [self.pythonExecutable, str(Path(worker.__file__).resolve()), str(self.jobDir)],
                stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            self._cleanup()
            raise
        return self

    def cancel(self):
        from . import slicer_worker as worker

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
                self.process.kill()
                self.process.wait()
                self.error = RegistrationCancelled("registration cancelled")
                self._cleanup()
            return
        try:
            self._collect()
        except BaseException as exc:
            self.error = exc
        finally:
            self._cleanup()

    def _collect(self):
        from . import slicer_worker as worker

        if self._cancelledAt is not None and self.process.returncode != worker.EXIT_OK:
            self.error = RegistrationCancelled("registration cancelled")
            return
        errorFile = self.jobDir / worker.ERROR_FILE
        if errorFile.exists():
            with open(errorFile, encoding="utf-8") as f:
                self.error = _errorFromWorker(json.load(f))
            return
        resultFile = self.jobDir / worker.RESULT_FILE
        if self.process.returncode != worker.EXIT_OK or not resultFile.exists():
            self.error = RuntimeError(
                f"the registration process stopped unexpectedly (exit status "
                f"{self.process.returncode}); its last output:\n{self.logTail()}")
            return
        with open(resultFile, encoding="utf-8") as f:
            info = json.load(f)
        images = {}
        for name in worker.OUTPUT_IMAGES:
            path = self.jobDir / f"{name}.mha"
            images[name] = sitk.ReadImage(str(path)) if path.exists() else None
        matrix = info.get("initial_matrix")
        self.result = EngineResult(qa=info.get("qa", {}), timings=info.get("timings", {}),
                                   model_name=info.get("model_name", ""),
                                   device=info.get("device", ""),
                                   method=info.get("method", ""),
                                   initial_matrix=(np.array(matrix, dtype=np.float64).reshape(4, 4)
                                                   if matrix is not None else None), **images)

    def logTail(self, characters: int = 2000) -> str:
        from . import slicer_worker as worker

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
        from . import slicer_worker as worker

        stage, fraction = "starting", 0.0
        if not self._finished and self.jobDir is not None:
            try:
                with open(self.jobDir / worker.PROGRESS_FILE, encoding="utf-8") as f:
                    info = json.load(f)
                stage = str(info.get("stage", stage))
                fraction = _PREPARE_END + (_ENGINE_END - _PREPARE_END) * float(info.get("fraction", 0))
            except (OSError, ValueError):
                pass
        elif self._finished:
            stage, fraction = ("cancelled" if isinstance(self.error, RegistrationCancelled) else
                               "failed" if self.error is not None else "done"), _ENGINE_END
        elapsed = time.perf_counter() - self._started
        remaining = None
        engineFraction = (fraction - _PREPARE_END) / (_ENGINE_END - _PREPARE_END)
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


def syntheticTestPair(size: int = 32, spacing: float = 2.0):
    """A tiny known registration problem for self-tests (slicer-core tests and the module's test
    inside Slicer): (fixed, moving, fixedLabels, movingLabels) SimpleITK images.

    The fixed image holds two ellipsoids; the moving image is the same scene under a smooth
    deformation (a shift plus bends of a few voxels), blurred a little like a real scan.
    """
    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float64)] * 3, indexing="ij"))
    k, j, i = grid - (size - 1) / 2.0
    scale = size / 32.0

    def shapes(k, j, i):
        big = ((i / (9.0 * scale)) ** 2 + (j / (7.0 * scale)) ** 2 + (k / (6.0 * scale)) ** 2) < 1
        small = (((i - 4.0 * scale) / (3.5 * scale)) ** 2 + ((j + 2.0 * scale) / (3.0 * scale)) ** 2
                 + ((k - 1.0 * scale) / (3.0 * scale)) ** 2) < 1
        return big, small

    fixedShapes = shapes(k, j, i)
    movingShapes = shapes(k + 2.0 * scale * np.sin(i / (6.0 * scale)), j - 2.5 * scale,
                          i + 1.5 * scale * np.cos(j / (7.0 * scale)))
    images = []
    for big, small in (fixedShapes, movingShapes):
        intensity = sitk.GetImageFromArray((400.0 * big + 400.0 * small).astype(np.float32))
        labels = sitk.GetImageFromArray((big.astype(np.uint8) + small.astype(np.uint8) * 2)
                                        .clip(0, 2).astype(np.uint8))
        for image in (intensity, labels):
            image.SetSpacing((spacing,) * 3)
            image.SetOrigin((-(size - 1) * spacing / 2.0,) * 3)
        images.append((sitk.SmoothingRecursiveGaussian(intensity, spacing * 0.75), labels))
    (fixed, fixedLabels), (moving, movingLabels) = images
    return fixed, moving, fixedLabels, movingLabels


def diceCoefficient(a, b) -> float:
    """Dice overlap of the foreground (> 0) of two label arrays (numpy or SimpleITK)."""
    a = sitk.GetArrayViewFromImage(a) if isinstance(a, sitk.Image) else np.asarray(a)
    b = sitk.GetArrayViewFromImage(b) if isinstance(b, sitk.Image) else np.asarray(b)
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / total) if total else 1.0


def describeError(exc: BaseException) -> str:
    """A readable reason for a message box."""
    if isinstance(exc, RegistrationCancelled):
        return "Registration cancelled. The scene was left as it was."
    if isinstance(exc, EOIRError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "Out of memory. Try a coarser working spacing (Advanced) or the CPU device."
    return f"{exc.__class__.__name__}: {exc}"
