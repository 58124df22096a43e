"""The inverse and the fixed segmentation carried into the moving space, in a real MRML scene
(``slicer-core``) with the real engine: the inverse grid transform undoes the output transform
through Slicer's own transform classes (RAS), and the carried segmentation rides with the moving
volume. Masks reach the engine from label map nodes."""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core is not installed", allow_module_level=True)
pytest.importorskip("torch")

import SimpleITK as sitk  # noqa: E402
from helpers import oblique_image, write_tiny_model  # noqa: E402

from EOIRRegistrationLib.engine import pipeline  # noqa: E402
from EOIRRegistrationLib.slicer import bridge  # noqa: E402
from EOIRRegistrationLib.slicer import logic as slicer_logic  # noqa: E402


def _segmentation_on(scene, volume_node, image):
    labels = np.zeros(tuple(reversed(image.GetSize())), np.uint8)
    labels[3:9, 4:12, 4:12] = 5
    labels[9:14, 10:18, 8:16] = 2
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    label_node = bridge.imageToVolumeNode(label_image, scene, "labels",
                                          className="vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "organs")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        label_node, segmentation)
    segmentation.GetSegmentation().GetNthSegment(0).SetName("spleen")
    segmentation.GetSegmentation().GetNthSegment(1).SetName("liver")
    return segmentation


def test_the_inverse_and_the_fixed_segmentation_land_in_the_moving_space(tmp_path, monkeypatch):
    scene, _ = bridge.createStandaloneScene()
    results, calls = [], []

    def spy(*args, **kwargs):
        calls.append(sorted(kwargs))
        results.append(pipeline.register(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(slicer_logic, "_engineRegister", lambda: spy)
    fixed_img = oblique_image(size=(24, 22, 20), spacing=(1.5, 1.7, 2.0), seed=3)
    moving_img = oblique_image(size=(22, 24, 18), spacing=(1.6, 1.5, 2.1), origin=(-9.0, 4.0, 1.0),
                               angles=(0.1, 0.2, -0.1), seed=4)
    fixed = bridge.imageToVolumeNode(fixed_img, scene, "fixed")
    moving = bridge.imageToVolumeNode(moving_img, scene, "moving")
    segmentation = _segmentation_on(scene, fixed, fixed_img)
    mask = sitk.Cast(moving_img > -1, sitk.sitkUInt8)
    mask_node = bridge.imageToVolumeNode(mask, scene, "mask", className="vtkMRMLLabelMapVolumeNode")
    model = write_tiny_model(tmp_path / "untrained.pt", 0.05, spacing=(2.0, 2.0, 2.0))
    out = slicer_logic.RegistrationLogic(scene).registerVolumes(
        fixed, moving, model=model, device="cpu", initial_alignment="none", refine_iterations=0,
        fixedSegmentationNode=segmentation, movingMaskNode=mask_node)
    result = results[0]
    assert "fixed_labels" in calls[0] and "moving_mask" in calls[0]
    assert result.masks == ("moving",) and result.inverse_displacement is not None
    inverse_node = out.inverseTransformNode
    # the node holds the engine's inverse, on the moving grid
    held = bridge.gridTransformNodeToDisplacement(inverse_node)
    assert held.GetSize() == moving_img.GetSize()
    np.testing.assert_allclose(held.GetOrigin(), moving_img.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(sitk.GetArrayFromImage(held),
                               sitk.GetArrayFromImage(result.inverse_displacement), atol=1e-5)
    assert inverse_node.GetNodeReference(inverse_node.GetMovingNodeReferenceRole()) is fixed
    assert inverse_node.GetNodeReference(inverse_node.GetFixedNodeReferenceRole()) is moving
    # Slicer's own transforms (RAS): the output transform after the inverse is the identity at
    # the moving voxels (between them the inverse is interpolated, like any grid transform)
    forward = out.transformNode.GetTransformFromParent()
    backward = inverse_node.GetTransformFromParent()
    to_index = np.linalg.inv(bridge.ijkToRASFromImage(fixed_img))
    errors = []
    rng = np.random.default_rng(0)
    for _ in range(300):
        index = [int(rng.integers(2, s - 2)) for s in moving_img.GetSize()]  # voxel centres
        y = (bridge.ijkToRASFromImage(moving_img) @ np.append(index, 1.0))[:3]
        x = np.asarray(backward.TransformPoint(tuple(y)))
        inside = (to_index @ np.append(x, 1.0))[:3]
        if np.all((inside > 1) & (inside < np.asarray(fixed_img.GetSize()) - 2)):
            errors.append(np.linalg.norm(np.asarray(forward.TransformPoint(tuple(x))) - y))
    assert len(errors) > 50 and max(errors) < 1e-3, (len(errors), max(errors))
    assert np.abs(sitk.GetArrayFromImage(held)).max() > 0.5  # a real deformation
    # the fixed segmentation on the moving grid, riding with the moving volume
    carried = out.fixedSegmentationInMovingNode
    assert carried.IsA("vtkMRMLSegmentationNode")
    names = {carried.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(carried.GetSegmentation().GetNumberOfSegments())}
    assert names == {"spleen", "liver"}
    assert carried.GetTransformNodeID() == out.transformNode.GetID()
    assert moving.GetTransformNodeID() == out.transformNode.GetID()
    values = set(np.unique(sitk.GetArrayFromImage(result.fixed_labels_in_moving)).tolist())
    assert values == {0, 1, 2}  # segment i exported as label i + 1
