"""Segmentations and label maps between a Slicer scene and label images: a segmentation exported
on a reference volume's grid (LPS label image plus its segments), and a propagated label image
turned back into a segmentation with the same names, colours and IDs. Scene-explicit and
Qt-free, as ``bridge.py``."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from EOIRRegistrationLib.core.errors import InputError
from EOIRRegistrationLib.slicer.bridge import imageToVolumeNode, removeNodes, volumeNodeToImage


@dataclass(frozen=True)
class SegmentInfo:
    """One segment of a propagated segmentation: its label value in the exported label image."""

    labelValue: int
    segmentId: str
    name: str
    color: tuple


def _segmentationLogicClass():
    return slicer.vtkSlicerSegmentationsModuleLogic


def _nodeIDs(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _nodesAddedSince(scene, before: set) -> list:
    return [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())
            if scene.GetNthNode(i).GetID() not in before]


def segmentationToLabelImage(segmentationNode, referenceVolumeNode, scene,
                             ignoreTransformNode=None):
    """Segmentation node -> (uint16 label image on the reference volume's grid (LPS world), list of
    :class:`SegmentInfo`). Segment i (in the segmentation's order) gets label value i + 1; where
    segments overlap the later one wins. The temporary nodes this needs are removed again."""
    segmentation = segmentationNode.GetSegmentation()
    count = segmentation.GetNumberOfSegments()
    if count == 0:
        raise InputError(f"segmentation '{segmentationNode.GetName()}' has no segments")
    if count > 65535:
        raise InputError("too many segments to propagate (at most 65535)")
    segmentIds = vtk.vtkStringArray()
    infos = []
    for i in range(count):
        segmentId = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(segmentId)
        segmentIds.InsertNextValue(segmentId)
        infos.append(SegmentInfo(i + 1, segmentId, segment.GetName(), tuple(segment.GetColor())))
    before = _nodeIDs(scene)
    try:
        labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__EOIR_temp__")
        ok = _segmentationLogicClass().ExportSegmentsToLabelmapNode(
            segmentationNode, segmentIds, labelmapNode, referenceVolumeNode)
        if not ok:
            raise InputError(f"could not export segmentation '{segmentationNode.GetName()}' to a "
                             "label map on the moving volume's grid")
        # The exported label map is in the segmentation's own frame: give it the same parents.
        if segmentationNode.GetTransformNodeID():
            labelmapNode.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())
        image = volumeNodeToImage(labelmapNode, ignoreTransformNode=ignoreTransformNode)
    finally:
        removeNodes(scene, _nodesAddedSince(scene, before))
    return sitk.Cast(image, sitk.sitkUInt16), infos


def labelImageToSegmentationNode(labelImage: sitk.Image, scene, name: str,
                                 segments: Sequence[SegmentInfo], referenceVolumeNode=None):
    """Label image (LPS, world) -> new segmentation node whose segments keep the source ids, names
    and colours; the segment with label value v gets the voxels equal to v (it may end up empty)."""
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    try:
        segmentationNode.CreateDefaultDisplayNodes()
        if referenceVolumeNode is not None:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        segmentation = segmentationNode.GetSegmentation()
        array = sitk.GetArrayFromImage(labelImage)
        remapped = np.zeros(array.shape, dtype=np.uint16)
        segmentIds = vtk.vtkStringArray()
        for order, info in enumerate(segments, start=1):
            segmentation.AddEmptySegment(info.segmentId, info.name, list(info.color))
            remapped[array == info.labelValue] = order
            segmentIds.InsertNextValue(info.segmentId)
        if remapped.any():
            remappedImage = sitk.GetImageFromArray(remapped)
            remappedImage.CopyInformation(labelImage)
            before = _nodeIDs(scene)
            try:
                labelmapNode = imageToVolumeNode(remappedImage, scene, "__EOIR_temp__",
                                                 className="vtkMRMLLabelMapVolumeNode")
                ok = _segmentationLogicClass().ImportLabelmapToSegmentationNode(
                    labelmapNode, segmentationNode, segmentIds)
            finally:
                removeNodes(scene, _nodesAddedSince(scene, before))
            if not ok:
                raise RuntimeError("could not import the propagated labels into a segmentation")
    except Exception:
        removeNodes(scene, [segmentationNode])
        raise
    return segmentationNode
