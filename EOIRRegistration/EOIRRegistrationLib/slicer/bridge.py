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

The QA overlays are in ``display.py``, segmentations and label maps in ``segmentations.py``.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from EOIRRegistrationLib.core.errors import InputError

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
    "gridTransformNodeToDisplacement",
    "placeMovingUnderTransform",
    "setRegistrationReferences",
    "removeNodes",
    "UndoStack",
    "createStandaloneScene",
]

#: 3x3 matrix taking LPS coordinates (positions or vectors) to RAS and back (it is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])



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
