"""MRML <-> SimpleITK bridge: the only place where Slicer's RAS scene meets the engine's LPS images.

Scene-explicit and Qt-free: every function takes the ``vtkMRMLScene`` (or nodes) it works on and
uses only MRML / VTK classes, so it runs both inside the Slicer application and with the Qt-free
``slicer-core`` wheel the test suite uses. It never touches ``slicer.app``, ``slicer.mrmlScene``,
``slicer.modules`` or ``qt``, and it must be called from the thread that owns the scene (in the
application: the GUI thread).

Conventions (see ``geometry.py`` for the engine side):

* The MRML scene is **RAS**, SimpleITK images and files are **LPS** (millimetres). A position or a
  vector goes from one to the other by negating x and y: ``RAS = diag(-1, -1, 1) @ LPS``.
* A volume node's geometry is its IJK-to-RAS matrix (``direction @ diag(spacing)`` and origin, in
  RAS); the SimpleITK image has ``direction_LPS = diag(-1, -1, 1) @ direction_RAS`` and so on. The
  voxel array is shared as (k, j, i) in both worlds.
* The engine's displacement ``d`` lives on the fixed image's grid and maps a fixed point ``x`` to
  the moving point ``x + d(x)`` (the resampling direction, what ``sitk.DisplacementFieldTransform``
  takes). That is exactly Slicer's **TransformFromParent** of a transform node whose child is the
  moving volume: Slicer resamples the child at ``FromParent(x)`` to show it in the parent (world)
  frame. The grid transform is a ``vtkOrientedGridTransform`` with the fixed grid's RAS origin,
  spacing and direction and RAS displacement vectors, set as TransformFromParent, with linear
  interpolation (what ITK's displacement-field transform uses).
* Volumes under *linear* parent transforms are read in world coordinates (the parent matrices are
  folded into the image geometry). A non-linear parent transform is refused with a message asking
  to harden it first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

import slicer

from .errors import InputError

__all__ = [
    "LPS_TO_RAS",
    "ijkToRASFromImage",
    "imageGeometryFromIJKToRAS",
    "parentTransformChain",
    "worldMatrixOfNode",
    "volumeNodeToImage",
    "imageToVolumeNode",
    "displacementToGridTransform",
    "setGridTransformFromDisplacement",
    "createGridTransformNode",
    "gridTransformNodeToDisplacement",
    "placeMovingUnderTransform",
    "setRegistrationReferences",
    "getOrCreateJacobianColorNode",
    "getOrCreateFoldingColorNode",
    "showJacobianVolume",
    "showFoldingLabelmap",
    "setSliceViewerLayers",
    "SegmentInfo",
    "segmentationToLabelImage",
    "labelImageToSegmentationNode",
    "removeNodes",
    "UndoStack",
    "createStandaloneScene",
]

#: 3x3 matrix taking LPS coordinates (positions or vectors) to RAS and back (it is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

JACOBIAN_COLOR_NODE_NAME = "EOIR Jacobian (blue-white-red)"
FOLDING_COLOR_NODE_NAME = "EOIR folding (red)"
_COLOR_ATTRIBUTE = "EOIRRegistration.ColorTable"


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------

def _matrixToArray(vmatrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[vmatrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _arrayToMatrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    vmatrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vmatrix.SetElement(r, c, float(array[r, c]))
    return vmatrix


def ijkToRASFromImage(image: sitk.Image) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a 3D SimpleITK image (LPS geometry)."""
    if image.GetDimension() != 3:
        raise InputError(f"expected a 3D image, got a {image.GetDimension()}D image")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    m[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return m


def imageGeometryFromIJKToRAS(ijkToRAS: np.ndarray):
    """(spacing, origin, direction) of the SimpleITK (LPS) image with this IJK-to-RAS matrix.

    ``direction`` is the 9-tuple SimpleITK wants (row-major, columns = index axes).
    """
    ijkToRAS = np.asarray(ijkToRAS, dtype=np.float64)
    linear = LPS_TO_RAS @ ijkToRAS[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"volume has a zero voxel spacing (IJK-to-RAS columns {spacing})")
    direction = linear / spacing
    origin = LPS_TO_RAS @ ijkToRAS[:3, 3]
    return (tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
            tuple(float(d) for d in direction.ravel()))


def parentTransformChain(node, ignoreTransformNode=None) -> list:
    """Parent transform nodes of ``node`` from the nearest up, skipping ``ignoreTransformNode``."""
    chain = []
    ignoreID = ignoreTransformNode.GetID() if ignoreTransformNode is not None else None
    transformNode = node.GetParentTransformNode()
    while transformNode is not None:
        if transformNode.GetID() != ignoreID:
            chain.append(transformNode)
        transformNode = transformNode.GetParentTransformNode()
    return chain


def worldMatrixOfNode(node, ignoreTransformNode=None) -> np.ndarray:
    """4x4 RAS matrix from the node's local frame to world through its (linear) parent transforms.

    ``ignoreTransformNode`` is left out of the chain (the registration's own output transform when a
    registration is run again). Raises :class:`InputError` for a non-linear parent transform.
    """
    m = np.eye(4)
    for transformNode in parentTransformChain(node, ignoreTransformNode):
        if not transformNode.IsLinear():
            raise InputError(
                f"'{node.GetName()}' is under the non-linear transform '{transformNode.GetName()}'. "
                "Harden that transform on the volume (Data module, right-click > Harden transform) "
                "or remove it before registering.")
        tm = vtk.vtkMatrix4x4()
        transformNode.GetMatrixTransformToParent(tm)
        m = _matrixToArray(tm) @ m
    return m


def volumeNodeToImage(volumeNode, ignoreTransformNode=None) -> sitk.Image:
    """Scalar volume node -> SimpleITK image with the same voxels and LPS world geometry.

    The voxel type is kept; linear parent transforms are folded into the geometry.
    """
    if volumeNode is None:
        raise InputError("no volume given")
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetPointData() is None or \
            imageData.GetPointData().GetScalars() is None:
        raise InputError(f"volume '{volumeNode.GetName()}' has no voxels")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise InputError(f"volume '{volumeNode.GetName()}' has "
                         f"{imageData.GetNumberOfScalarComponents()} components per voxel; "
                         "a scalar (grey-level) volume is needed")
    dims = imageData.GetDimensions()
    if min(dims) < 1:
        raise InputError(f"volume '{volumeNode.GetName()}' is empty (dimensions {dims})")
    # a view of the VTK buffer; GetImageFromArray below makes the one copy
    array = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars())
    array = array.reshape(tuple(reversed(dims)))
    ijkToRAS = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRAS)
    world = worldMatrixOfNode(volumeNode, ignoreTransformNode) @ _matrixToArray(ijkToRAS)
    spacing, origin, direction = imageGeometryFromIJKToRAS(world)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _setVolumeVoxels(volumeNode, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D voxel array, got shape {array.shape}")
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(tuple(reversed(array.shape)))
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True,
                                         array_type=numpy_support.get_vtk_array_type(array.dtype))
    scalars.SetName("ImageScalars")
    imageData.GetPointData().SetScalars(scalars)
    volumeNode.SetAndObserveImageData(imageData)


def imageToVolumeNode(image: sitk.Image, scene, name: str | None = None,
                      className: str = "vtkMRMLScalarVolumeNode", volumeNode=None):
    """SimpleITK scalar image -> volume node in ``scene`` (a new one, or ``volumeNode`` updated).

    The node gets the image's voxels and geometry (as IJK-to-RAS) and default display nodes.
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("imageToVolumeNode expects a scalar image")
    if volumeNode is None:
        volumeNode = scene.AddNewNodeByClass(className, name or "")
    elif name:
        volumeNode.SetName(name)
    volumeNode.SetIJKToRASMatrix(_arrayToMatrix(ijkToRASFromImage(image)))
    _setVolumeVoxels(volumeNode, sitk.GetArrayFromImage(image))
    volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


# ---------------------------------------------------------------------------------------------
# Grid transform
# ---------------------------------------------------------------------------------------------

def displacementToGridTransform(displacement: sitk.Image):
    """Engine displacement (LPS mm, fixed grid, resampling direction) -> vtkOrientedGridTransform
    holding RAS displacements, meant to be set as a node's TransformFromParent."""
    if displacement.GetDimension() != 3 or displacement.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError("a displacement field must be a 3D image with 3 components per voxel")
    vectors = sitk.GetArrayFromImage(displacement).astype(np.float64)  # (k, j, i, 3) LPS
    vectors[..., 0] *= -1.0
    vectors[..., 1] *= -1.0
    grid = vtk.vtkImageData()
    grid.SetDimensions(displacement.GetSize())
    grid.SetSpacing(displacement.GetSpacing())
    grid.SetOrigin(tuple(LPS_TO_RAS @ np.asarray(displacement.GetOrigin(), dtype=np.float64)))
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(vectors).reshape(-1, 3), deep=True,
                                         array_type=vtk.VTK_DOUBLE)
    scalars.SetName("DisplacementRAS")
    grid.GetPointData().SetScalars(scalars)
    direction = np.eye(4)
    direction[:3, :3] = LPS_TO_RAS @ np.asarray(displacement.GetDirection()).reshape(3, 3)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetGridDirectionMatrix(_arrayToMatrix(direction))
    transform.SetDisplacementGridData(grid)
    transform.SetInterpolationModeToLinear()
    return transform


def setGridTransformFromDisplacement(transformNode, displacement: sitk.Image) -> None:
    """Make ``transformNode`` the grid transform of ``displacement`` (TransformFromParent)."""
    transformNode.SetAndObserveTransformFromParent(displacementToGridTransform(displacement))


def createGridTransformNode(scene, displacement: sitk.Image, name: str = "Transform"):
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    setGridTransformFromDisplacement(node, displacement)
    return node


def gridTransformNodeToDisplacement(transformNode) -> sitk.Image:
    """The displacement (LPS mm, resampling direction) stored as a grid TransformFromParent."""
    transform = transformNode.GetTransformFromParent()
    if transform is None:
        raise ValueError(f"transform '{transformNode.GetName()}' has no transform from parent")
    transform.Update()
    if not transform.IsA("vtkOrientedGridTransform") or transform.GetInverseFlag():
        raise ValueError(f"transform '{transformNode.GetName()}' does not store a grid transform "
                         "from parent")
    grid = transform.GetDisplacementGrid()
    dims = grid.GetDimensions()
    vectors = numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars()).astype(np.float64)
    vectors = vectors.reshape(tuple(reversed(dims)) + (3,)) * transform.GetDisplacementScale() \
        + transform.GetDisplacementShift()
    vectors[..., 0] *= -1.0
    vectors[..., 1] *= -1.0
    image = sitk.GetImageFromArray(vectors, isVector=True)
    image.SetSpacing(grid.GetSpacing())
    image.SetOrigin(tuple(float(v) for v in LPS_TO_RAS @ np.asarray(grid.GetOrigin())))
    directionRAS = np.eye(3)
    if transform.GetGridDirectionMatrix() is not None:
        directionRAS = _matrixToArray(transform.GetGridDirectionMatrix())[:3, :3]
    image.SetDirection(tuple(float(v) for v in (LPS_TO_RAS @ directionRAS).ravel()))
    return image


class UndoStack:
    """Records how to put back links that a caller changed (used by the logic's rollback)."""

    def __init__(self):
        self.actions = []

    def add(self, function, *args):
        self.actions.append((function, args))

    def run(self):
        while self.actions:
            function, args = self.actions.pop()
            function(*args)


def _setParent(node, transformNodeID, undo: UndoStack | None):
    previous = node.GetTransformNodeID()
    if previous == transformNodeID:
        return
    if undo is not None:
        undo.add(node.SetAndObserveTransformNodeID, previous)
    node.SetAndObserveTransformNodeID(transformNodeID)


def placeMovingUnderTransform(movingNode, transformNode, undo: UndoStack | None = None) -> None:
    """Put the registration result above the moving volume so it shows aligned at once.

    The moving volume's own linear transforms (if any) stay below the output transform:
    local -> (moving's transforms) -> output transform -> world. The output transform itself is
    detached from any parent. ``undo`` (optional) records the previous links.
    """
    _setParent(transformNode, None, undo)
    chain = parentTransformChain(movingNode, ignoreTransformNode=transformNode)
    child = movingNode
    for parent in chain:
        _setParent(child, parent.GetID(), undo)
        child = parent
    _setParent(child, transformNode.GetID(), undo)


def setRegistrationReferences(transformNode, fixedNode, movingNode) -> None:
    """Standard Slicer references: the transform's fixed and moving volumes."""
    transformNode.SetNodeReferenceID(transformNode.GetMovingNodeReferenceRole(), movingNode.GetID())
    transformNode.SetNodeReferenceID(transformNode.GetFixedNodeReferenceRole(), fixedNode.GetID())


# ---------------------------------------------------------------------------------------------
# QA overlays
# ---------------------------------------------------------------------------------------------

def _findColorNode(scene, kind: str):
    nodes = scene.GetNodesByClass("vtkMRMLColorTableNode")
    try:
        for i in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(i)
            if node.GetAttribute(_COLOR_ATTRIBUTE) == kind:
                return node
    finally:
        nodes.UnRegister(None)
    return None


def _diverging(t: float) -> tuple[float, float, float]:
    """Blue (t=0) -> white (t=0.5) -> red (t=1), perceptually balanced-ish (ColorBrewer RdBu)."""
    blue = np.array([0.020, 0.188, 0.380])
    lightBlue = np.array([0.573, 0.773, 0.871])
    white = np.array([0.969, 0.969, 0.969])
    lightRed = np.array([0.957, 0.647, 0.510])
    red = np.array([0.404, 0.000, 0.122])
    stops = [(0.0, blue), (0.25, lightBlue), (0.5, white), (0.75, lightRed), (1.0, red)]
    for (t0, c0), (t1, c1) in zip(stops[:-1], stops[1:]):
        if t <= t1:
            w = (t - t0) / (t1 - t0)
            return tuple(float(v) for v in (1 - w) * c0 + w * c1)
    return tuple(float(v) for v in red)


def getOrCreateJacobianColorNode(scene, created: list | None = None):
    """A 256-entry diverging blue-white-red table (white in the middle), shared by all results.

    ``created`` (optional list) receives the node if this call added it to the scene.
    """
    colors = [(f"{i}", *_diverging(i / 255.0), 1.0) for i in range(256)]
    return _getOrCreateColorTable(scene, "jacobian", JACOBIAN_COLOR_NODE_NAME, colors, created)


def getOrCreateFoldingColorNode(scene, created: list | None = None):
    """Two-entry label table: 0 = background (transparent), 1 = folding (red)."""
    colors = [("background", 0.0, 0.0, 0.0, 0.0), ("folding", 1.0, 0.0, 0.0, 1.0)]
    return _getOrCreateColorTable(scene, "folding", FOLDING_COLOR_NODE_NAME, colors, created)


def _getOrCreateColorTable(scene, kind: str, name: str, colors, created: list | None):
    """The scene's colour table of this ``kind`` (tagged by attribute), or a new one with
    ``colors`` = [(label, r, g, b, a), ...]; a new node is appended to ``created``."""
    node = _findColorNode(scene, kind)
    if node is not None:
        return node
    node = slicer.vtkMRMLColorTableNode()
    node.SetTypeToUser()
    node.SetNumberOfColors(len(colors))
    for i, (label, r, g, b, a) in enumerate(colors):
        node.SetColor(i, label, r, g, b, a)
    node.SetName(name)
    node.SetAttribute(_COLOR_ATTRIBUTE, kind)
    node.SetAttribute("Category", "EOIRRegistration")
    scene.AddNode(node)
    if created is not None:
        created.append(node)
    return node


def showJacobianVolume(jacobianNode, colorNode, halfRange: float | None = None) -> tuple:
    """Display the determinant with the diverging table centred on 1 (white = volume preserved,
    blue = compression, red = expansion). Returns the displayed (min, max)."""
    if halfRange is None:
        array = numpy_support.vtk_to_numpy(jacobianNode.GetImageData().GetPointData().GetScalars())
        finite = array[np.isfinite(array)]
        spread = float(np.max(np.abs(finite - 1.0))) if finite.size else 1.0
        halfRange = float(np.clip(spread, 0.1, 1.0))
    jacobianNode.CreateDefaultDisplayNodes()
    display = jacobianNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(colorNode.GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(1.0 - halfRange, 1.0 + halfRange)
    return (1.0 - halfRange, 1.0 + halfRange)


def showFoldingLabelmap(foldingNode, colorNode) -> None:
    foldingNode.CreateDefaultDisplayNodes()
    foldingNode.GetDisplayNode().SetAndObserveColorNodeID(colorNode.GetID())


def setSliceViewerLayers(scene, background=None, foreground=None, foregroundOpacity=None,
                         label=None) -> int:
    """Set the layers of every slice view of ``scene`` (nodes or None to leave a layer alone).
    Returns the number of slice views changed (0 in a scene without views)."""
    count = scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(count):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        if foreground is not None:
            composite.SetForegroundVolumeID(foreground.GetID())
        if foregroundOpacity is not None:
            composite.SetForegroundOpacity(foregroundOpacity)
        if label is not None:
            composite.SetLabelVolumeID(label.GetID())
    return count


# ---------------------------------------------------------------------------------------------
# Segmentations and label maps
# ---------------------------------------------------------------------------------------------

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


def removeNodes(scene, nodes: Iterable) -> None:
    """Remove nodes (and their display and storage nodes) from ``scene``; None entries and nodes
    that are no longer in the scene are skipped."""
    for node in nodes:
        if node is None or node.GetScene() is not scene:
            continue
        extra = []
        if hasattr(node, "GetNumberOfDisplayNodes"):
            extra += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if hasattr(node, "GetNumberOfStorageNodes"):
            extra += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        scene.RemoveNode(node)
        for other in extra:
            if other is not None and other.GetScene() is scene:
                scene.RemoveNode(other)


def createStandaloneScene():
    """A scene with Slicer's application and module logics set up the way the application does,
    for use *outside* the Slicer application (batch scripts and tests with ``slicer-core``).

    Returns ``(scene, applicationLogic)``. Inside Slicer use ``slicer.mrmlScene`` instead.
    """
    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    appLogic.GetColorLogic().SetMRMLScene(scene)
    appLogic.GetColorLogic().AddDefaultColorNodes()
    appLogic.SetSliceLogics(vtk.vtkCollection())
    appLogic.SetViewLogics(vtk.vtkCollection())
    logics = {}
    appLogic.SetModuleLogic("Colors", appLogic.GetColorLogic())
    for moduleName, className in (("Volumes", "vtkSlicerVolumesLogic"),
                                  ("Transforms", "vtkSlicerTransformLogic"),
                                  ("Segmentations", "vtkSlicerSegmentationsModuleLogic")):
        logicClass = getattr(slicer, className, None)
        if logicClass is None:
            continue
        logic = logicClass()
        logic.SetMRMLApplicationLogic(appLogic)
        logic.SetMRMLScene(scene)
        appLogic.SetModuleLogic(moduleName, logic)
        logics[moduleName] = logic
    # Keep the Python wrappers of the module logics alive as long as the application logic.
    appLogic._eoirModuleLogics = logics
    return scene, appLogic
