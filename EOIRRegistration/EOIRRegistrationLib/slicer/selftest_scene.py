"""The module self-test's checks that need no torch (run by ``EOIRRegistrationTest`` inside Slicer
and by the slicer-core tests): the scene round trip of an oblique, anisotropic volume, a known
displacement put into the scene by the module's own output code and checked against Slicer's
hardening, the Jacobian and folding overlays, and the scene left as it was after a cancel or an
error while the outputs are made.

Each ``check*(scene, logic)`` builds what it needs in ``scene``, raises AssertionError when the
module misbehaves and returns a one-line summary. ``logic`` is a ``RegistrationLogic`` on
``scene``. The references are independent of the module's bridge: ITK's own index-to-point and
displacement-field transform, Slicer's own NRRD writer, transform logic and point mapping.
numpy, SimpleITK and MRML only.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from EOIRRegistrationLib.core.errors import RegistrationCancelled
from EOIRRegistrationLib.core.qa import jacobian_summary
from EOIRRegistrationLib.engine.options import RegistrationOptions
from EOIRRegistrationLib.engine.result import RegistrationResult
from EOIRRegistrationLib.slicer import bridge, display
from EOIRRegistrationLib.slicer.outputs import QA_ATTRIBUTE_PREFIX

#: RAS = FLIP * LPS for points and vectors
FLIP = np.array([-1.0, -1.0, 1.0])


def obliqueImage(size=(24, 20, 16), spacing=(1.5, 1.2, 2.5), origin=(10.0, -5.0, 3.0),
                 axis=(0.3, 0.5, 0.8), angle=0.35, phase=0.0) -> sitk.Image:
    """A smooth float32 image (ITK size order x, y, z) on an oblique, anisotropic LPS grid; its
    intensity (0..1000) is a function of the physical position, so two grids sample one scene."""
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(sitk.VersorTransform(axis, angle).GetMatrix())
    p = physicalPoints(image)
    values = 500.0 + 250.0 * np.sin(p[..., 0] / 6.0 + phase) * np.cos(p[..., 1] / 7.0) \
        + 250.0 * np.sin(p[..., 2] / 9.0 - phase)
    result = sitk.GetImageFromArray(values.astype(np.float32))
    result.CopyInformation(image)
    return result


def physicalPoints(image: sitk.Image) -> np.ndarray:
    """LPS mm of every voxel centre, array order (k, j, i, 3), from ITK's index-to-point of the
    corner voxels (the map is affine)."""
    size = image.GetSize()
    origin = np.array(image.TransformIndexToPhysicalPoint((0, 0, 0)))
    steps = [np.array(image.TransformIndexToPhysicalPoint(tuple(int(a == b) for b in range(3))))
             - origin for a in range(3)]
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in reversed(size)],
                          indexing="ij")
    return origin + i[..., None] * steps[0] + j[..., None] * steps[1] + k[..., None] * steps[2]


def knownDisplacement(fixed: sitk.Image) -> sitk.Image:
    """A displacement on ``fixed``'s grid (LPS mm, resampling direction): a smooth 2 mm wave plus
    a 10 mm Gaussian bump along x (sigma 4 mm) that folds where d(d_x)/dx < -1."""
    p = physicalPoints(fixed)
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2.0 for n in fixed.GetSize()]))
    bump = 10.0 * np.exp(-np.sum((p - centre) ** 2, axis=-1) / (2 * 4.0 ** 2))
    d = np.stack([2.0 * np.sin(p[..., 1] / 5.0) + bump, -2.0 * np.cos(p[..., 0] / 4.0),
                  1.0 * np.sin(p[..., 2] / 3.0)], axis=-1)
    field = sitk.GetImageFromArray(d, isVector=True)
    field.CopyInformation(fixed)
    return sitk.Cast(field, sitk.sitkVectorFloat64)


def jacobianDeterminant(displacement: sitk.Image) -> np.ndarray:
    """det(I + dd/dx), x in mm, by central differences on the (oblique) grid: (k, j, i) array."""
    d = sitk.GetArrayFromImage(displacement)
    perIndex = np.stack([np.gradient(d, axis=axis) for axis in (2, 1, 0)], axis=-1)  # d/di, dj, dk
    toIndex = np.linalg.inv(np.asarray(displacement.GetDirection()).reshape(3, 3)
                            @ np.diag(displacement.GetSpacing()))
    return np.linalg.det(np.eye(3) + perIndex @ toIndex)


def knownResult(fixed: sitk.Image, moving: sitk.Image, movingLabels=None) -> RegistrationResult:
    """What the engine would return for :func:`knownDisplacement`, made with ITK and numpy."""
    displacement = knownDisplacement(fixed)
    transform = sitk.DisplacementFieldTransform(sitk.Image(displacement))
    det = jacobianDeterminant(displacement).astype(np.float32)
    jacobian = sitk.GetImageFromArray(det)
    jacobian.CopyInformation(fixed)
    folding = sitk.GetImageFromArray((det <= 0).astype(np.uint8))
    folding.CopyInformation(fixed)
    labels = None
    if movingLabels is not None:
        labels = sitk.Resample(movingLabels, fixed, transform, sitk.sitkNearestNeighbor, 0,
                               movingLabels.GetPixelID())
    return RegistrationResult(
        displacement=displacement, jacobian=jacobian, folding=folding, warped_labels=labels,
        warped=sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32),
        qa=jacobian_summary(det), options=RegistrationOptions(), model_name="self-test field",
        device="cpu", network=False, refinement=None)


def addPair(scene, labels=False):
    """Fixed and moving volumes on different oblique grids (and a label map on the moving)."""
    fixed = bridge.imageToVolumeNode(obliqueImage(), scene, "self-test fixed")
    moving = bridge.imageToVolumeNode(
        obliqueImage(size=(22, 24, 18), spacing=(1.6, 1.3, 2.2), origin=(8.0, -3.0, 2.0),
                     axis=(0.6, -0.2, 0.7), angle=0.25, phase=0.4), scene, "self-test moving")
    if not labels:
        return fixed, moving, None
    image = bridge.volumeNodeToImage(moving)
    labelImage = sitk.Cast(sitk.BinaryThreshold(image, 700.0, 1e9, 1, 0), sitk.sitkUInt8)
    labelNode = bridge.imageToVolumeNode(labelImage, scene, "self-test labels",
                                         className="vtkMRMLLabelMapVolumeNode")
    return fixed, moving, labelNode


def _matrix(getter) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    getter(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _close(a, b, atol, what):
    error = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    assert error <= atol, f"{what}: off by {error:.3g} (tolerance {atol:g})"


def checkVolumeRoundTrip(scene, logic) -> str:
    """An oblique, anisotropic volume into the scene and back; Slicer's NRRD writer of the node
    read back by SimpleITK gives the same geometry and voxels."""
    image = obliqueImage()
    node = bridge.imageToVolumeNode(image, scene, "self-test round trip")
    ijkToRAS = _matrix(node.GetIJKToRASMatrix)
    size = image.GetSize()
    for corner in np.ndindex(2, 2, 2):
        index = [c * (n - 1) for c, n in zip(corner, size)]
        ras = ijkToRAS @ np.array([*index, 1.0])
        _close(ras[:3], FLIP * np.array(image.TransformIndexToPhysicalPoint(index)), 1e-9,
               f"RAS position of voxel {index}")
    expected = sitk.GetArrayFromImage(image)
    assert np.array_equal(slicer.util.arrayFromVolume(node), expected), "voxels changed in the scene"
    back = bridge.volumeNodeToImage(node)
    for name in ("GetSpacing", "GetOrigin", "GetDirection"):
        _close(getattr(back, name)(), getattr(image, name)(), 1e-9, f"read back {name[3:]}")
    assert np.array_equal(sitk.GetArrayFromImage(back), expected), "voxels changed on reading back"

    folder = tempfile.mkdtemp(prefix="EOIRRegistration-selftest-")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        path = os.path.join(folder, "round trip.nrrd")
        storage.SetFileName(path)
        assert storage.WriteData(node), "Slicer could not write the volume"
        written = sitk.ReadImage(path)
    finally:
        scene.RemoveNode(storage)
        shutil.rmtree(folder, ignore_errors=True)
    for name in ("GetSpacing", "GetOrigin", "GetDirection"):
        _close(getattr(written, name)(), getattr(image, name)(), 1e-6, f"NRRD {name[3:]}")
    assert np.array_equal(sitk.GetArrayFromImage(written), expected), "NRRD voxels differ"
    return f"round trip of a {size} oblique volume with spacing {image.GetSpacing()} mm: exact"


def _insideMask(image: sitk.Image, reference: sitk.Image, transform) -> np.ndarray:
    """Voxels of ``reference`` that ``transform`` maps at least 1.5 voxels inside ``image``."""
    ones = sitk.GetArrayFromImage(image) * 0 + 1
    ones[:2], ones[-2:], ones[:, :2], ones[:, -2:], ones[..., :2], ones[..., -2:] = 0, 0, 0, 0, 0, 0
    mask = sitk.GetImageFromArray(ones.astype(np.uint8))
    mask.CopyInformation(image)
    return sitk.GetArrayFromImage(sitk.Resample(mask, reference, transform,
                                                sitk.sitkNearestNeighbor, 0)).astype(bool)


def checkKnownTransform(scene, logic) -> str:
    """A known displacement through the module's output code: the grid transform maps fixed
    points where ITK's displacement-field transform does, and Slicer's hardening of the moving
    volume equals ITK's resampling through the field."""
    fixed, moving, _ = addPair(scene)
    inputs = logic.prepareInputs(fixed, moving)
    result = knownResult(inputs.fixedImage, inputs.movingImage)
    warped = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "self-test warped")
    out = logic.createOutputs(inputs, result, outputVolumeNode=warped)
    assert moving.GetParentTransformNode() is out.transformNode, "moving volume not under result"
    assert out.transformNode.GetNodeReference("spatialRegistrationFixed") is fixed
    assert np.array_equal(slicer.util.arrayFromVolume(warped), sitk.GetArrayFromImage(result.warped))

    itkField = sitk.DisplacementFieldTransform(sitk.Image(result.displacement))
    fromParent = out.transformNode.GetTransformFromParent()
    points = physicalPoints(inputs.fixedImage).reshape(-1, 3)[::7]
    for p in points:
        _close(fromParent.TransformPoint(*(FLIP * p)), FLIP * np.array(itkField.TransformPoint(p)),
               1e-6, f"fixed point {np.round(p, 2)} (LPS mm) through the transform")

    transformLogic = slicer.vtkSlicerTransformLogic()
    transformLogic.SetMRMLScene(scene)
    assert transformLogic.hardenTransform(moving), "Slicer could not harden the transform"
    hardened = bridge.volumeNodeToImage(moving)
    itk = sitk.GetArrayFromImage(sitk.Resample(inputs.movingImage, hardened, itkField,
                                               sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    inside = _insideMask(inputs.fixedImage, hardened, sitk.Transform()) & \
        _insideMask(inputs.movingImage, hardened, itkField)
    assert inside.sum() > 1000, f"only {inside.sum()} hardened voxels to compare"
    _close(sitk.GetArrayFromImage(hardened)[inside], itk[inside], 0.05,
           "hardened moving volume against ITK's resampling (intensities 0..1000)")
    return (f"known field: {len(points)} points map as in ITK, hardening matches ITK on "
            f"{int(inside.sum())} voxels")


def checkOverlays(scene, logic) -> str:
    """The Jacobian overlay holds the result's determinant on the fixed grid in the diverging
    table centred on 1; the folding label map is 1 exactly where det <= 0, in red; the slice
    views show them; the transform's QA attributes match the label map."""
    fixed, moving, _ = addPair(scene)
    inputs = logic.prepareInputs(fixed, moving)
    result = knownResult(inputs.fixedImage, inputs.movingImage)
    det = sitk.GetArrayFromImage(result.jacobian)
    assert (det <= 0).any() and (det > 0).any(), "the known field must fold somewhere (test input)"
    out = logic.createOutputs(inputs, result)
    jacobianNode, foldingNode = out.jacobianVolumeNode, out.foldingVolumeNode
    assert np.array_equal(slicer.util.arrayFromVolume(jacobianNode), det)
    _close(_matrix(jacobianNode.GetIJKToRASMatrix), _matrix(fixed.GetIJKToRASMatrix), 1e-9,
           "Jacobian volume geometry")
    jacobianDisplay = jacobianNode.GetDisplayNode()
    assert jacobianDisplay.GetColorNode().GetName() == display.JACOBIAN_COLOR_NODE_NAME
    low, high = jacobianDisplay.GetWindowLevelMin(), jacobianDisplay.GetWindowLevelMax()
    _close((low + high) / 2.0, 1.0, 1e-6, "Jacobian window centre")

    assert foldingNode.IsA("vtkMRMLLabelMapVolumeNode")
    folds = slicer.util.arrayFromVolume(foldingNode)
    assert np.array_equal(folds, (det <= 0).astype(np.uint8)), "folding map is not det <= 0"
    colors = foldingNode.GetDisplayNode().GetColorNode()
    assert colors.GetName() == display.FOLDING_COLOR_NODE_NAME
    rgba = [0.0] * 4
    colors.GetColor(1, rgba)
    assert rgba == [1.0, 0.0, 0.0, 1.0], f"folding colour {rgba}"
    percent = float(out.transformNode.GetAttribute(QA_ATTRIBUTE_PREFIX + "folding_percent"))
    _close(percent, 100.0 * folds.mean(), 1e-4 * max(1.0, percent), "folding_percent attribute")
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        assert (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID(),
                composite.GetLabelVolumeID()) == (fixed.GetID(), jacobianNode.GetID(),
                                                  foldingNode.GetID()), "slice view layers"
    return (f"overlays: det in [{det.min():.2f}, {det.max():.2f}], "
            f"{100.0 * folds.mean():.2f} % folding shown in red")


def sceneState(scene) -> dict:
    """What a cancelled or failed run must leave as it was: every node's class, name, parent
    transform, attributes it may set, voxels, matrices and the slice views' layers."""
    state = {}
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        entry = [node.GetClassName(), node.GetName()]
        if node.IsA("vtkMRMLTransformableNode"):
            entry.append(node.GetTransformNodeID())
        if node.IsA("vtkMRMLTransformNode"):
            entry += [node.IsLinear(), node.GetNodeReferenceID("spatialRegistrationMoving"),
                      sorted((name, node.GetAttribute(name)) for name in node.GetAttributeNames()
                             if name.startswith(QA_ATTRIBUTE_PREFIX))]
            if node.IsLinear():
                entry.append(_matrix(node.GetMatrixTransformToParent).tobytes())
        if node.IsA("vtkMRMLVolumeNode") and node.GetImageData() is not None:
            entry += [slicer.util.arrayFromVolume(node).tobytes(),
                      _matrix(node.GetIJKToRASMatrix).tobytes()]
        if node.IsA("vtkMRMLSliceCompositeNode"):
            entry += [node.GetBackgroundVolumeID(), node.GetForegroundVolumeID(),
                      node.GetLabelVolumeID(), node.GetForegroundOpacity()]
        state[node.GetID()] = entry
    return state


class SelfTestError(RuntimeError):
    """Raised on purpose while the outputs are made."""


def checkSceneCleanAfterCancelAndError(scene, logic) -> str:
    """A cancel and an error at several points while the outputs are made (into an existing
    output transform and volume, with labels) leave every node as it was."""
    fixed, moving, labels = addPair(scene, labels=True)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "self-test output")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 4.0)
    transform.SetMatrixTransformToParent(matrix)
    output = bridge.imageToVolumeNode(obliqueImage(size=(8, 8, 8), phase=1.0), scene,
                                      "self-test output volume")
    inputs = logic.prepareInputs(fixed, moving, labels, outputTransformNode=transform,
                                 outputVolumeNode=output)
    result = knownResult(inputs.fixedImage, inputs.movingImage, inputs.movingLabels)
    before = sceneState(scene)
    stages = ("Jacobian determinant", "propagated labels", "slice views")
    for stage in stages:
        for kind, expected in (("cancel", RegistrationCancelled), ("error", SelfTestError)):
            cancel = threading.Event()

            def progress(name, fraction, stage=stage, kind=kind, cancel=cancel):
                if name.endswith(stage):
                    if kind == "error":
                        raise SelfTestError(f"self-test error at '{stage}'")
                    cancel.set()
            try:
                logic.createOutputs(inputs, result, outputTransformNode=transform,
                                    outputVolumeNode=output, progressCallback=progress,
                                    cancelEvent=cancel)
            except expected:
                pass
            else:
                raise AssertionError(f"a {kind} at '{stage}' did not stop the outputs")
            assert sceneState(scene) == before, f"a {kind} at '{stage}' changed the scene"
    return f"scene left as it was after a cancel and an error at each of {len(stages)} stages"


#: every check, in the order the module's self-test runs them (each on a cleared scene)
SCENE_CHECKS = (checkVolumeRoundTrip, checkKnownTransform, checkOverlays,
                checkSceneCleanAfterCancelAndError)
