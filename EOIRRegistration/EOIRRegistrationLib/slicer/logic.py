"""Headless registration logic of the Slicer module: scene-explicit, no Qt, no ``slicer.app``.

``EOIRRegistration.py``'s ``EOIRRegistrationLogic`` delegates to :class:`RegistrationLogic`,
which also runs with the Qt-free ``slicer-core`` wheel (tests, batch scripts outside the
application). The work is split in three steps so that a GUI can run the heavy middle one off the
GUI thread:

1. :meth:`RegistrationLogic.prepareInputs` (thread owning the scene): reads the volumes (the
   moving and fixed segmentations or label maps, and the masks) into SimpleITK images in LPS.
   The scene is not modified.
2. :meth:`RegistrationLogic.runEngine` (any thread): the engine's ``register`` with a
   ``RegistrationOptions``; never touches MRML.
3. :meth:`RegistrationLogic.createOutputs` (thread owning the scene): ``outputs.py``, one
   transaction.

:meth:`RegistrationLogic.registerVolumes` runs the three in a row (blocking; for scripts);
``runners.py`` runs step 2 in a thread or a child process with progress and cancel.
torch is imported only inside :meth:`runEngine` (through the engine), never at import time.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import SimpleITK as sitk

from EOIRRegistrationLib.core.errors import EOIRError, InputError, RegistrationCancelled
from EOIRRegistrationLib.engine.options import RegistrationOptions, options_of
from EOIRRegistrationLib.engine.result import RegistrationResult
from EOIRRegistrationLib.slicer import bridge, segmentations
from EOIRRegistrationLib.slicer.outputs import ENGINE_END, RegistrationOutputs, createOutputs

#: overall progress fraction at which reading the volumes ends and the engine's share begins
PREPARE_END = 0.05


def _engineRegister():
    """The engine's ``register`` (imported lazily: it imports torch)."""
    from EOIRRegistrationLib.engine.pipeline import register

    return register


def engineProgress(progressCallback):
    """The engine's progress (0..1 of its own stages) as a fraction of the whole run."""
    if progressCallback is None:
        return None

    def progress(stage, fraction):
        overall = PREPARE_END + (ENGINE_END - PREPARE_END) * float(fraction)
        progressCallback(stage, min(max(overall, 0.0), 1.0))
    return progress


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
    #: the fixed segmentation or label map, carried into the moving space (through the inverse)
    fixedSegmentationNode: object = None
    fixedLabels: Optional[sitk.Image] = None
    fixedSegments: list = field(default_factory=list)
    fixedLabelsKind: Optional[str] = None
    #: similarity masks (nonzero: used), LPS, on the grid of their volume
    fixedMask: Optional[sitk.Image] = None
    movingMask: Optional[sitk.Image] = None

    def engineImages(self) -> dict:
        """The optional images ``register`` takes, by its keyword names: the moving labels (or
        None) and those of the others that were given."""
        images = {"fixed_labels": self.fixedLabels, "fixed_mask": self.fixedMask,
                  "moving_mask": self.movingMask}
        return {"moving_labels": self.movingLabels,
                **{name: image for name, image in images.items() if image is not None}}


def readLabels(node, referenceVolumeNode, scene, role: str, ignoreTransformNode=None):
    """A segmentation (every segment, on the reference volume's grid) or a label map volume as
    (label image LPS, segments, "segmentation" | "labelmap")."""
    if node.IsA("vtkMRMLSegmentationNode"):
        labels, segments = segmentations.segmentationToLabelImage(
            node, referenceVolumeNode, scene, ignoreTransformNode=ignoreTransformNode)
        return labels, segments, "segmentation"
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return (bridge.volumeNodeToImage(node, ignoreTransformNode=ignoreTransformNode), [],
                "labelmap")
    raise InputError(f"the {role} must be a segmentation or a label map volume")


class RegistrationLogic:
    """Registration in a given MRML scene (see the module docstring for the three steps)."""

    def __init__(self, scene):
        if scene is None:
            raise ValueError("RegistrationLogic needs a vtkMRMLScene")
        self.scene = scene

    # -- step 1 -------------------------------------------------------------------------------
    def prepareInputs(self, fixedVolumeNode, movingVolumeNode, movingSegmentationNode=None,
                      outputTransformNode=None, outputVolumeNode=None,
                      fixedSegmentationNode=None, fixedMaskNode=None,
                      movingMaskNode=None) -> RegistrationInputs:
        """Read the inputs into SimpleITK images (world LPS geometry) and check the choices.
        Masks and label inputs are segmentations (every segment) or label map volumes."""
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
            inputs.movingLabels, inputs.segments, inputs.labelsKind = readLabels(
                movingSegmentationNode, movingVolumeNode, self.scene, "moving labels", ignore)
        if fixedSegmentationNode is not None:
            inputs.fixedSegmentationNode = fixedSegmentationNode
            inputs.fixedLabels, inputs.fixedSegments, inputs.fixedLabelsKind = readLabels(
                fixedSegmentationNode, fixedVolumeNode, self.scene, "fixed labels")
        if fixedMaskNode is not None:
            inputs.fixedMask = readLabels(fixedMaskNode, fixedVolumeNode, self.scene,
                                          "fixed mask")[0]
        if movingMaskNode is not None:
            inputs.movingMask = readLabels(movingMaskNode, movingVolumeNode, self.scene,
                                           "moving mask", ignore)[0]
        return inputs

    # -- step 2 -------------------------------------------------------------------------------
    @staticmethod
    def runEngine(inputs: RegistrationInputs, options: RegistrationOptions,
                  progressCallback: Callable[[str, float], None] | None = None,
                  cancelEvent=None) -> RegistrationResult:
        """Run the engine on prepared inputs (any thread; touches no MRML); raises
        ``RegistrationCancelled`` when ``cancelEvent`` is set."""
        if cancelEvent is not None and (cancelEvent.is_set() if hasattr(cancelEvent, "is_set")
                                        else cancelEvent()):
            raise RegistrationCancelled("registration cancelled")
        return _engineRegister()(inputs.fixedImage, inputs.movingImage, options,
                                 **inputs.engineImages(),
                                 progress=engineProgress(progressCallback), cancel=cancelEvent)

    # -- step 3 -------------------------------------------------------------------------------
    def createOutputs(self, inputs: RegistrationInputs, result: RegistrationResult,
                      **kwargs) -> RegistrationOutputs:
        """Put the engine's result into the scene (``outputs.createOutputs``)."""
        return createOutputs(self.scene, inputs, result, **kwargs)

    # -- all three ----------------------------------------------------------------------------
    def registerVolumes(self, fixedVolumeNode, movingVolumeNode,
                        options: RegistrationOptions | None = None, outputTransformNode=None,
                        outputVolumeNode=None, movingSegmentationNode=None, showJacobian=True,
                        showFolding=True, fixedSegmentationNode=None, fixedMaskNode=None,
                        movingMaskNode=None,
                        progressCallback: Callable[[str, float], None] | None = None,
                        cancelEvent=None, **optionChanges) -> RegistrationOutputs:
        """Register the moving volume to the fixed volume (blocking) and return the result nodes
        and the engine's result.

        :param options: every choice of the engine (``RegistrationOptions``: model, device,
            initial alignment, contrast, refinement, ...); keyword ``optionChanges`` in the
            engine's names (e.g. ``device="cpu"``) are applied on top. A linear parent transform
            of the moving volume is the starting point: the moving volume is read with it
            applied, the initial alignment is computed on top of it, and it stays below the
            output transform. The matrix used is stored on the transform (attribute
            ``EOIRRegistration.initial_matrix_lps``).
        :param outputTransformNode: transform node to fill; None creates a new grid transform.
        :param outputVolumeNode: scalar volume node to receive the moving volume resampled on the
            fixed grid; None: no warped volume (the moving volume is shown through the transform).
        :param movingSegmentationNode: segmentation or label map on the moving volume to
            propagate (nearest neighbour) into a new node on the fixed grid.
        :param fixedSegmentationNode: segmentation or label map on the fixed volume to carry into
            the moving space (implies the inverse): a new node on the moving grid, under the
            output transform like the moving volume.
        :param fixedMaskNode, movingMaskNode: segmentations or label maps; where the similarity
            may match the images (e.g. leave out a lesion present in one image only).
        The inverse (``inverse=True``, or a fixed segmentation) becomes a second grid transform
        node, moving space -> fixed space (``RegistrationOutputs.inverseTransformNode``).
        :param showJacobian: add the Jacobian determinant volume as foreground overlay.
        :param showFolding: add the folding (det <= 0) label map in red.
        :param progressCallback: ``f(stage: str, fraction: float)``, fraction of the whole run.
        :param cancelEvent: ``threading.Event`` (or callable returning bool) to stop the run;
            raises ``RegistrationCancelled`` and leaves the scene as it was.
        """
        started = time.perf_counter()
        options = options_of(options, **optionChanges)  # checked before any work
        if progressCallback is not None:
            progressCallback("reading volumes", 0.0)
        inputs = self.prepareInputs(fixedVolumeNode, movingVolumeNode, movingSegmentationNode,
                                    outputTransformNode, outputVolumeNode,
                                    fixedSegmentationNode, fixedMaskNode, movingMaskNode)
        if progressCallback is not None:
            progressCallback("reading volumes", PREPARE_END)
        result = self.runEngine(inputs, options, progressCallback=progressCallback,
                                cancelEvent=cancelEvent)
        outputs = self.createOutputs(inputs, result, outputTransformNode=outputTransformNode,
                                     outputVolumeNode=outputVolumeNode, showJacobian=showJacobian,
                                     showFolding=showFolding, progressCallback=progressCallback,
                                     cancelEvent=cancelEvent)
        logging.info("EOIRRegistration: %s -> %s done in %.1f s; %s", movingVolumeNode.GetName(),
                     fixedVolumeNode.GetName(), time.perf_counter() - started, outputs.summary())
        return outputs


def describeError(exc: BaseException) -> str:
    """A readable reason for a message box."""
    if isinstance(exc, RegistrationCancelled):
        return "Registration cancelled. The scene was left as it was."
    if isinstance(exc, EOIRError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "Out of memory. Try a coarser working spacing (Advanced) or the CPU device."
    return f"{exc.__class__.__name__}: {exc}"
