"""Step 3 of a registration in Slicer: the engine's result into the scene, as one transaction.

The grid transform (the displacement in RAS, resampling direction, the moving volume placed under
it), the Jacobian-determinant overlay, the folding label map, an optional warped volume and the
propagated segmentation or label map; when the engine computed the inverse, a second grid
transform (the inverse direction: TransformFromParent maps a moving-space point to a fixed-space
point, on the moving grid; put the fixed volume under it to see it in the moving space) and the
fixed segmentation or label map carried into the moving grid (placed under the output transform,
like the moving volume it belongs to). After an error or a cancel every node added is removed
again and every node changed is put back (``transaction.py``). No Qt, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from EOIRRegistrationLib.core.errors import RegistrationCancelled
from EOIRRegistrationLib.engine.result import RegistrationResult
from EOIRRegistrationLib.slicer import bridge, display, segmentations
from EOIRRegistrationLib.slicer.transaction import SceneTransaction

#: Attribute of the output transform holding the engine's initial matrix (see createOutputs).
INITIAL_MATRIX_ATTRIBUTE = "EOIRRegistration.initial_matrix_lps"
QA_ATTRIBUTE_PREFIX = "EOIRRegistration."
#: overall progress fraction at which the engine's share ends and the outputs' share begins
ENGINE_END = 0.90


@dataclass
class RegistrationOutputs:
    """A registration in the scene: the nodes it created or filled, plus the engine's result
    (QA figures, timings, model, device, initial matrix, method: ``result``)."""

    transformNode: object
    result: RegistrationResult
    jacobianVolumeNode: object = None
    foldingVolumeNode: object = None
    warpedVolumeNode: object = None
    warpedSegmentationNode: object = None
    inverseTransformNode: object = None          # moving space -> fixed space (grid transform)
    fixedSegmentationInMovingNode: object = None  # the fixed labels on the moving grid

    @property
    def qa(self) -> dict:
        return self.result.qa

    @property
    def foldingPercent(self) -> float:
        return float(self.result.qa["folding_percent"])

    @property
    def sdLogJ(self) -> float:
        return float(self.result.qa["sdlogj"])

    def summary(self) -> str:
        return self.result.summary()


def initialMatrixToAttribute(matrix) -> str:
    """16 numbers, row-major, separated by spaces (the transform attribute's format)."""
    return " ".join(f"{float(v):.12g}" for v in np.asarray(matrix, dtype=np.float64).ravel())


def initialMatrixFromAttribute(text: str) -> np.ndarray:
    """4x4 matrix from :func:`initialMatrixToAttribute`'s text."""
    values = [float(v) for v in str(text).split()]
    if len(values) != 16:
        raise ValueError(f"an initial matrix needs 16 numbers, got {len(values)}")
    return np.array(values, dtype=np.float64).reshape(4, 4)


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


def _checkCancelled(cancelEvent) -> None:
    if cancelEvent is not None and (cancelEvent.is_set() if hasattr(cancelEvent, "is_set")
                                    else cancelEvent()):
        raise RegistrationCancelled("registration cancelled")


def createOutputs(scene, inputs, result: RegistrationResult, outputTransformNode=None,
                  outputVolumeNode=None, showJacobian=True, showFolding=True,
                  progressCallback=None, cancelEvent=None) -> RegistrationOutputs:
    """Put the engine's result into ``scene`` (one transaction, see the module docstring)."""
    fixedNode, movingNode = inputs.fixedVolumeNode, inputs.movingVolumeNode
    transaction = SceneTransaction(scene)
    steps = ["transform", "jacobian", "folding", "warped volume", "labels", "inverse", "views"]

    def step(index, name):
        _checkCancelled(cancelEvent)
        if progressCallback is not None:
            progressCallback(f"creating outputs: {name}",
                             ENGINE_END + (1.0 - ENGINE_END) * index / len(steps))

    _checkOnFixedGrid(result, inputs.fixedImage)
    try:
        movingName = movingNode.GetName()

        step(0, "transform")
        if outputTransformNode is None:
            transformNode = transaction.added(scene.AddNewNodeByClass(
                "vtkMRMLGridTransformNode",
                scene.GenerateUniqueName(f"{movingName} to {fixedNode.GetName()} (EOIR)")))
        else:
            transformNode = outputTransformNode
            transaction.backupContent(transformNode)
            transaction.backupReferences(transformNode, [
                transformNode.GetMovingNodeReferenceRole(),
                transformNode.GetFixedNodeReferenceRole()])
        qaAttributes = {QA_ATTRIBUTE_PREFIX + key: f"{float(value):.6g}"
                        for key, value in result.qa.items()}
        qaAttributes[QA_ATTRIBUTE_PREFIX + "model"] = result.model_name
        initialMatrix = np.asarray(result.initial_matrix, dtype=np.float64).reshape(4, 4)
        transaction.backupAttributes(transformNode,
                                     list(qaAttributes) + [INITIAL_MATRIX_ATTRIBUTE])
        bridge.setGridTransformFromDisplacement(transformNode, result.displacement)
        bridge.setRegistrationReferences(transformNode, fixedNode, movingNode)
        for name, value in qaAttributes.items():
            transformNode.SetAttribute(name, value)
        transformNode.SetAttribute(INITIAL_MATRIX_ATTRIBUTE,
                                   initialMatrixToAttribute(initialMatrix))
        bridge.placeMovingUnderTransform(movingNode, transformNode, transaction.undo)

        jacobianNode = None
        step(1, "Jacobian determinant")
        if showJacobian:
            jacobianNode = transaction.added(bridge.imageToVolumeNode(
                sitk.Cast(result.jacobian, sitk.sitkFloat32), scene,
                scene.GenerateUniqueName(f"{movingName} Jacobian determinant")))
            colorNode = display.getOrCreateJacobianColorNode(scene, transaction.created)
            display.showJacobianVolume(jacobianNode, colorNode)

        foldingNode = None
        step(2, "folding")
        if showFolding:
            foldingNode = transaction.added(bridge.imageToVolumeNode(
                sitk.Cast(result.folding, sitk.sitkUInt8), scene,
                scene.GenerateUniqueName(f"{movingName} folding"),
                className="vtkMRMLLabelMapVolumeNode"))
            colorNode = display.getOrCreateFoldingColorNode(scene, transaction.created)
            display.showFoldingLabelmap(foldingNode, colorNode)

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
            warpedNode = bridge.imageToVolumeNode(warped, scene, volumeNode=outputVolumeNode)

        warpedLabelsNode = None
        step(4, "propagated labels")
        labels = result.warped_labels
        if inputs.labelsKind is not None and labels is not None:
            sourceName = inputs.movingSegmentationNode.GetName()
            name = scene.GenerateUniqueName(f"{sourceName} registered")
            warpedLabelsNode = _labelsNode(scene, transaction, labels, name, inputs.labelsKind,
                                           inputs.segments, inputs.movingSegmentationNode,
                                           fixedNode, inputs.movingLabels.GetPixelID())

        step(5, "inverse")
        inverseNode, fixedLabelsNode = _createInverse(scene, transaction, inputs, result,
                                                      transformNode)

        step(6, "slice views")
        _recordSliceViews(scene, transaction)
        display.setSliceViewerLayers(
            scene, background=fixedNode,
            foreground=jacobianNode if jacobianNode is not None else movingNode,
            foregroundOpacity=0.5, label=foldingNode)
        _checkCancelled(cancelEvent)
    except BaseException:
        transaction.rollback()
        raise
    if progressCallback is not None:
        progressCallback("done", 1.0)
    return RegistrationOutputs(
        transformNode=transformNode, result=result, jacobianVolumeNode=jacobianNode,
        foldingVolumeNode=foldingNode, warpedVolumeNode=warpedNode,
        warpedSegmentationNode=warpedLabelsNode, inverseTransformNode=inverseNode,
        fixedSegmentationInMovingNode=fixedLabelsNode)


def _labelsNode(scene, transaction, labels, name, kind, segments, sourceNode, referenceNode,
                pixelType):
    """A new segmentation (the source's segment names, colours and IDs) or label map volume
    (the source's colour table) holding ``labels``."""
    if kind == "segmentation":
        return transaction.added(segmentations.labelImageToSegmentationNode(
            labels, scene, name, segments, referenceVolumeNode=referenceNode))
    node = transaction.added(bridge.imageToVolumeNode(
        sitk.Cast(labels, pixelType), scene, name, className="vtkMRMLLabelMapVolumeNode"))
    sourceDisplay = sourceNode.GetDisplayNode()
    if sourceDisplay is not None and sourceDisplay.GetColorNodeID():
        node.GetDisplayNode().SetAndObserveColorNodeID(sourceDisplay.GetColorNodeID())
    return node


def _createInverse(scene, transaction, inputs, result, transformNode):
    """The inverse grid transform node and the fixed labels on the moving grid (None, None when
    the engine computed no inverse)."""
    if result.inverse_displacement is None:
        return None, None
    fixedNode, movingNode = inputs.fixedVolumeNode, inputs.movingVolumeNode
    inverseNode = transaction.added(scene.AddNewNodeByClass(
        "vtkMRMLGridTransformNode",
        scene.GenerateUniqueName(f"{fixedNode.GetName()} to {movingNode.GetName()} (EOIR inverse)")))
    bridge.setGridTransformFromDisplacement(inverseNode, result.inverse_displacement)
    # the inverse moves the fixed volume onto the moving one
    bridge.setRegistrationReferences(inverseNode, movingNode, fixedNode)
    labels = result.fixed_labels_in_moving
    if inputs.fixedLabelsKind is None or labels is None:
        return inverseNode, None
    source = inputs.fixedSegmentationNode
    node = _labelsNode(scene, transaction, labels,
                       scene.GenerateUniqueName(f"{source.GetName()} in {movingNode.GetName()}"),
                       inputs.fixedLabelsKind, inputs.fixedSegments, source, movingNode,
                       inputs.fixedLabels.GetPixelID())
    # on the moving grid in the moving volume's world (the output transform ignored): it goes
    # where the moving volume goes, under the output transform
    transaction.undo.add(node.SetAndObserveTransformNodeID, node.GetTransformNodeID())
    node.SetAndObserveTransformNodeID(transformNode.GetID())
    return inverseNode, node



def _recordSliceViews(scene, transaction: SceneTransaction) -> None:
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        transaction.undo.add(composite.SetBackgroundVolumeID, composite.GetBackgroundVolumeID())
        transaction.undo.add(composite.SetForegroundVolumeID, composite.GetForegroundVolumeID())
        transaction.undo.add(composite.SetForegroundOpacity, composite.GetForegroundOpacity())
        transaction.undo.add(composite.SetLabelVolumeID, composite.GetLabelVolumeID())
