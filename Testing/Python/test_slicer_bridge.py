"""The MRML bridge against Slicer's real MRML core (``slicer-core``): volumes, grid transforms,
storage, overlays and segmentations, checked with Slicer's own code where it exists
(vtkSlicerTransformLogic.hardenTransform, vtkMRMLTransformStorageNode)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: E402
import slicer  # slicer-core: Slicer's MRML core (a dev requirement; not skipped when missing)
import vtk  # noqa: E402
from helpers import add_grid_transform_node  # noqa: E402

from EOIRRegistrationLib.core.errors import InputError  # noqa: E402
from EOIRRegistrationLib.slicer import bridge, display, segmentations  # noqa: E402

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def scene():
    scene, appLogic = bridge.createStandaloneScene()
    scene._eoirAppLogic = appLogic  # keep alive with the scene
    return scene


def oblique_image(size=(20, 18, 16), spacing=(1.2, 0.9, 2.0), origin=(10.0, -5.0, 3.0),
                  axis=(0.3, 0.5, 0.8), angle=0.35, seed=0, pixel=sitk.sitkFloat32):
    """A smooth random image on an oblique, anisotropic grid."""
    rng = np.random.RandomState(seed)
    raw = sitk.GetImageFromArray(rng.rand(*reversed(size)).astype(np.float32))
    arr = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(raw, 1.5))
    arr = (arr - arr.min()) / (arr.max() - arr.min()) * 1000.0
    image = sitk.Cast(sitk.GetImageFromArray(arr.astype(np.float32)), pixel)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(sitk.VersorTransform(axis, angle).GetMatrix())
    return image


def smooth_displacement(reference: sitk.Image, amplitude=2.0, vanish_at_border=True):
    """A smooth LPS-mm displacement on ``reference``'s grid (sitkVectorFloat64); zero on the
    border faces when ``vanish_at_border`` (so Slicer's hardening keeps the grid)."""
    k, j, i = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in reversed(reference.GetSize())],
                          indexing="ij")
    d = np.stack([1.5 * np.sin(i / 5.0), -1.0 * np.cos(j / 4.0), 0.8 * np.sin(k / 3.0 + i / 7.0)],
                 axis=-1)
    if vanish_at_border:
        w = (np.sin(np.pi * i / i.max()) * np.sin(np.pi * j / j.max())
             * np.sin(np.pi * k / k.max()))
        d = d * w[..., None]
    field = sitk.GetImageFromArray(amplitude * d, isVector=True)
    field.CopyInformation(reference)
    return sitk.Cast(field, sitk.sitkVectorFloat64)


def itk_warp(moving, fixed, displacement):
    tx = sitk.DisplacementFieldTransform(sitk.Image(displacement))
    return sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def node_array(volume_node) -> np.ndarray:
    return np.array(slicer.util.arrayFromVolume(volume_node))


# ---------------------------------------------------------------------------------------------
# volumes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pixel", [sitk.sitkFloat32, sitk.sitkInt16])
def test_volume_round_trip_keeps_oblique_anisotropic_geometry(scene, pixel):
    image = oblique_image(pixel=pixel)
    node = bridge.imageToVolumeNode(image, scene, "vol")
    # The node's IJK-to-RAS maps every index where SimpleITK puts it (LPS -> RAS).
    m = ijk_to_ras(node)
    for index in [(0, 0, 0), (19, 0, 0), (0, 17, 0), (0, 0, 15), (7, 11, 3), (19, 17, 15)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(m @ np.append(index, 1.0), np.append(LPS_TO_RAS @ lps, 1.0),
                                   atol=1e-9)
    np.testing.assert_array_equal(node_array(node), sitk.GetArrayFromImage(image))
    back = bridge.volumeNodeToImage(node)
    assert back.GetPixelID() == image.GetPixelID()
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_volume_node_made_by_slicer_reads_with_lps_geometry(scene):
    # A volume built the Slicer way (RAS IJK-to-RAS set on the node) gives the LPS image ITK
    # would read from the same file.
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "slicerVolume")
    slicer.util.updateVolumeFromArray(node, np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6))
    node.SetSpacing(0.7, 1.1, 2.5)
    node.SetOrigin(-12.0, 30.0, 4.0)  # RAS
    image = bridge.volumeNodeToImage(node)
    np.testing.assert_allclose(image.GetOrigin(), (12.0, -30.0, 4.0))
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3),
                               np.diag([-1.0, -1.0, 1.0]), atol=1e-12)
    np.testing.assert_allclose(image.GetSpacing(), (0.7, 1.1, 2.5))
    assert image[5, 4, 3] == 3 * 30 + 4 * 6 + 5


def test_volume_under_linear_transform_is_read_in_world_coordinates(scene):
    image = oblique_image()
    node = bridge.imageToVolumeNode(image, scene, "vol")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rigid")
    world = np.eye(4)
    c, s = np.cos(0.4), np.sin(0.4)
    world[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    world[:3, 3] = [5.0, -3.0, 12.0]
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(world))
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = bridge.volumeNodeToImage(node)
    for index in [(0, 0, 0), (3, 9, 12), (19, 17, 15)]:
        ras_local = LPS_TO_RAS @ np.array(image.TransformIndexToPhysicalPoint(index))
        ras_world = (world @ np.append(ras_local, 1.0))[:3]
        np.testing.assert_allclose(LPS_TO_RAS @ np.array(moved.TransformIndexToPhysicalPoint(index)),
                                   ras_world, atol=1e-9)
    # ... unless that transform is the one to ignore (the registration's own output transform).
    local = bridge.volumeNodeToImage(node, ignoreTransformNode=transform)
    np.testing.assert_allclose(local.GetOrigin(), image.GetOrigin(), atol=1e-9)


def test_volume_under_nonlinear_transform_is_refused(scene):
    image = oblique_image()
    node = bridge.imageToVolumeNode(image, scene, "vol")
    grid = add_grid_transform_node(scene, smooth_displacement(image), "grid")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="non-linear"):
        bridge.volumeNodeToImage(node)


def test_vector_volume_is_refused(scene):
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(node, np.zeros((3, 4, 5, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="components"):
        bridge.volumeNodeToImage(node)


# ---------------------------------------------------------------------------------------------
# grid transform
# ---------------------------------------------------------------------------------------------

def engine_warp(moving: sitk.Image, fixed: sitk.Image, displacement: sitk.Image) -> np.ndarray:
    """The engine's own resampler (geometry.py): warped(x) = moving(x + d(x))."""
    import torch

    from EOIRRegistrationLib.core import geometry

    disp, _ = geometry.displacement_from_image(displacement)
    warped = geometry.sample_through_like_itk(geometry.image_to_tensor(moving, torch.float64),
                                              geometry.Grid.from_image(moving),
                                              geometry.Grid.from_image(fixed), displacement=disp)
    return warped[0, 0].numpy()


def test_hardened_grid_transform_reproduces_engine_warp(scene):
    """Slicer's own hardenTransform of the moving volume under the grid transform must give the
    engine's warped image: the displacement is TransformFromParent, in RAS, on the fixed grid."""
    fixed = oblique_image(seed=1)
    moving = oblique_image(seed=2)  # same grid as fixed: hardening keeps the moving grid
    displacement = smooth_displacement(fixed, amplitude=2.5)
    expected = engine_warp(moving, fixed, displacement)
    np.testing.assert_allclose(expected, sitk.GetArrayFromImage(itk_warp(moving, fixed, displacement)),
                               atol=1e-3)
    assert np.abs(expected - sitk.GetArrayFromImage(moving)).max() > 20.0  # a real deformation

    moving_node = bridge.imageToVolumeNode(moving, scene, "moving")
    transform = add_grid_transform_node(scene, displacement, "T")
    moving_node.SetAndObserveTransformNodeID(transform.GetID())
    transform_logic = slicer.vtkSlicerTransformLogic()
    transform_logic.SetMRMLScene(scene)
    transform_logic.hardenTransform(moving_node)
    assert moving_node.GetParentTransformNode() is None

    hardened = bridge.volumeNodeToImage(moving_node)
    assert hardened.GetSize() == fixed.GetSize()
    np.testing.assert_allclose(hardened.GetOrigin(), fixed.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(hardened.GetDirection(), fixed.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(sitk.GetArrayFromImage(hardened), expected, atol=1e-2)

    # The check is sensitive to the direction: the opposite displacement is far off.
    opposite = sitk.GetImageFromArray(-sitk.GetArrayFromImage(displacement), isVector=True)
    opposite.CopyInformation(displacement)
    wrong = engine_warp(moving, fixed, opposite)
    assert np.abs(sitk.GetArrayFromImage(hardened) - wrong).max() > 10.0


def test_points_through_transform_node_match_engine_and_itk(scene):
    fixed = oblique_image()
    displacement = smooth_displacement(fixed, amplitude=3.0, vanish_at_border=False)
    transform = add_grid_transform_node(scene, displacement, "T")
    from_parent = transform.GetTransformFromParent()
    to_parent = transform.GetTransformToParent()
    d = sitk.GetArrayFromImage(displacement)  # (k, j, i, 3) LPS

    # At voxel centres: FromParent(x) = x + d(x) exactly as stored by the engine.
    for index in [(1, 1, 1), (5, 9, 3), (12, 4, 10), (18, 16, 14)]:
        x = np.array(fixed.TransformIndexToPhysicalPoint(index))
        expected = LPS_TO_RAS @ (x + d[index[2], index[1], index[0]])
        np.testing.assert_allclose(from_parent.TransformPoint(LPS_TO_RAS @ x), expected, atol=1e-9)

    # Between voxels: the same linear interpolation as ITK's displacement-field transform.
    itk_tx = sitk.DisplacementFieldTransform(sitk.Image(displacement))
    rng = np.random.RandomState(3)
    for _ in range(25):
        continuous = rng.uniform(1.0, np.array(fixed.GetSize()) - 2.0)
        x = np.array(fixed.TransformContinuousIndexToPhysicalPoint(continuous.tolist()))
        y = np.array(from_parent.TransformPoint(LPS_TO_RAS @ x))
        np.testing.assert_allclose(y, LPS_TO_RAS @ np.array(itk_tx.TransformPoint(x.tolist())),
                                   atol=1e-4)
        # TransformToParent is the inverse (Slicer inverts the grid numerically).
        np.testing.assert_allclose(to_parent.TransformPoint(y), LPS_TO_RAS @ x, atol=0.05)


def test_grid_transform_node_gives_back_the_displacement(scene):
    fixed = oblique_image()
    displacement = smooth_displacement(fixed, vanish_at_border=False)
    transform = add_grid_transform_node(scene, displacement, "T")
    back = bridge.gridTransformNodeToDisplacement(transform)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(displacement),
                               atol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), displacement.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(back.GetDirection(), displacement.GetDirection(), atol=1e-12)
    np.testing.assert_allclose(back.GetSpacing(), displacement.GetSpacing(), atol=1e-12)


@pytest.mark.parametrize("extension", ["h5", "nii.gz"])
def test_saved_transform_reads_back_in_simpleitk(scene, tmp_path, extension):
    """vtkMRMLTransformStorageNode writes the node; SimpleITK reads the same LPS displacement."""
    fixed = oblique_image()
    displacement = smooth_displacement(fixed, vanish_at_border=False)
    transform = add_grid_transform_node(scene, displacement, "T")
    path = tmp_path / f"transform.{extension}"
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(transform) == 1
    if extension == "h5":
        tx = sitk.ReadTransform(str(path))
        if tx.GetName() == "CompositeTransform":
            tx = sitk.CompositeTransform(tx).GetNthTransform(0)
        assert tx.GetName() == "DisplacementFieldTransform"
        field = sitk.DisplacementFieldTransform(tx).GetDisplacementField()
    else:
        field = sitk.ReadImage(str(path))
    assert field.GetSize() == displacement.GetSize()
    np.testing.assert_allclose(field.GetOrigin(), displacement.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(field.GetSpacing(), displacement.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(field.GetDirection(), displacement.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(sitk.GetArrayFromImage(field), sitk.GetArrayFromImage(displacement),
                               atol=1e-5)
    # and the file resamples like the engine's field
    moving = oblique_image(seed=5)
    from_file = sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(
        sitk.Cast(field, sitk.sitkVectorFloat64)), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(sitk.GetArrayFromImage(from_file),
                               sitk.GetArrayFromImage(itk_warp(moving, fixed, displacement)),
                               atol=1e-3)


def test_moving_goes_under_the_transform_above_its_own_linear_transforms(scene):
    image = oblique_image()
    moving = bridge.imageToVolumeNode(image, scene, "moving")
    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "prealign")
    moving.SetAndObserveTransformNodeID(linear.GetID())
    other = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "other")
    grid = add_grid_transform_node(scene, smooth_displacement(image), "T")
    grid.SetAndObserveTransformNodeID(other.GetID())

    undo = bridge.UndoStack()
    bridge.placeMovingUnderTransform(moving, grid, undo)
    # local -> prealign -> T -> world
    assert moving.GetTransformNodeID() == linear.GetID()
    assert linear.GetTransformNodeID() == grid.GetID()
    assert grid.GetTransformNodeID() is None
    # placing again is a no-op
    bridge.placeMovingUnderTransform(moving, grid)
    assert linear.GetTransformNodeID() == grid.GetID()

    undo.run()
    assert moving.GetTransformNodeID() == linear.GetID()
    assert linear.GetTransformNodeID() is None
    assert grid.GetTransformNodeID() == other.GetID()


def test_registration_references(scene):
    fixed = bridge.imageToVolumeNode(oblique_image(), scene, "fixed")
    moving = bridge.imageToVolumeNode(oblique_image(seed=3), scene, "moving")
    transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "T")
    bridge.setRegistrationReferences(transform, fixed, moving)
    assert transform.GetNodeReference("spatialRegistrationFixed") is fixed
    assert transform.GetNodeReference("spatialRegistrationMoving") is moving


# ---------------------------------------------------------------------------------------------
# overlays
# ---------------------------------------------------------------------------------------------

def test_jacobian_overlay_uses_a_diverging_table_centred_on_one(scene):
    det = np.full((6, 7, 8), 1.0, dtype=np.float32)
    det[0, 0, 0], det[-1, -1, -1] = 0.4, 1.3
    image = sitk.GetImageFromArray(det)
    node = bridge.imageToVolumeNode(image, scene, "jac")
    created = []
    color = display.getOrCreateJacobianColorNode(scene, created)
    assert created == [color]
    assert display.getOrCreateJacobianColorNode(scene, created) is color  # shared, not duplicated
    assert len(created) == 1
    low, high = display.showJacobianVolume(node, color)
    displayNode = node.GetDisplayNode()
    assert displayNode.GetColorNodeID() == color.GetID()
    assert not displayNode.GetAutoWindowLevel()
    assert displayNode.GetLevel() == pytest.approx(1.0)
    assert (low, high) == pytest.approx((0.4, 1.6))
    lut = color.GetLookupTable()
    n = color.GetNumberOfColors()
    first, middle, last = (lut.GetTableValue(0), lut.GetTableValue(n // 2), lut.GetTableValue(n - 1))
    assert first[2] > first[0]  # blue: compression
    assert last[0] > last[2]  # red: expansion
    assert min(middle[:3]) > 0.9  # white: volume preserved


def test_folding_label_map_is_red(scene):
    folding = sitk.Image(5, 5, 5, sitk.sitkUInt8)
    folding[2, 2, 2] = 1
    node = bridge.imageToVolumeNode(folding, scene, "folding", className="vtkMRMLLabelMapVolumeNode")
    color = display.getOrCreateFoldingColorNode(scene)
    display.showFoldingLabelmap(node, color)
    assert node.GetDisplayNode().GetColorNodeID() == color.GetID()
    assert color.GetLookupTable().GetTableValue(1) == pytest.approx((1.0, 0.0, 0.0, 1.0))
    assert color.GetLookupTable().GetTableValue(0)[3] == 0.0


def test_slice_viewer_layers(scene):
    composites = []
    for name in ("Red", "Green"):
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        scene.AddNode(composite)
        composites.append(composite)
    fixed = bridge.imageToVolumeNode(oblique_image(), scene, "fixed")
    jac = bridge.imageToVolumeNode(oblique_image(seed=2), scene, "jac")
    fold = bridge.imageToVolumeNode(sitk.Image(4, 4, 4, sitk.sitkUInt8), scene, "fold",
                                    className="vtkMRMLLabelMapVolumeNode")
    assert display.setSliceViewerLayers(scene, background=fixed, foreground=jac,
                                       foregroundOpacity=0.5, label=fold) == 2
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == fixed.GetID()
        assert composite.GetForegroundVolumeID() == jac.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.5)
        assert composite.GetLabelVolumeID() == fold.GetID()


# ---------------------------------------------------------------------------------------------
# segmentations
# ---------------------------------------------------------------------------------------------

def make_segmentation(scene, reference_node):
    labels = np.zeros(tuple(reversed(bridge.volumeNodeToImage(reference_node).GetSize())), np.uint8)
    labels[2:6, 3:8, 4:9] = 3
    labels[8:12, 10:15, 10:16] = 9
    label_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(label_node, labels)
    label_node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras(reference_node)))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "organs")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        label_node, segmentation)
    segments = segmentation.GetSegmentation()
    segments.GetNthSegment(0).SetName("liver")
    segments.GetNthSegment(1).SetName("kidney")
    segments.GetNthSegment(1).SetColor(0.1, 0.2, 0.9)
    bridge.removeNodes(scene, [label_node])
    return segmentation, labels


def node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def test_segmentation_round_trip_keeps_ids_names_colours_and_voxels(scene):
    reference = bridge.imageToVolumeNode(oblique_image(), scene, "moving")
    segmentation, labels = make_segmentation(scene, reference)
    before = node_ids(scene)
    label_image, infos = segmentations.segmentationToLabelImage(segmentation, reference, scene)
    assert node_ids(scene) == before  # no temporary node left behind
    assert [i.name for i in infos] == ["liver", "kidney"]
    assert [i.labelValue for i in infos] == [1, 2]
    array = sitk.GetArrayFromImage(label_image)
    np.testing.assert_array_equal(array == 1, labels == 3)
    np.testing.assert_array_equal(array == 2, labels == 9)
    np.testing.assert_allclose(label_image.GetOrigin(), bridge.volumeNodeToImage(reference).GetOrigin())

    # Back into a new segmentation (as the propagated labels come back from the engine).
    new = segmentations.labelImageToSegmentationNode(label_image, scene, "organs registered", infos,
                                              referenceVolumeNode=reference)
    added = node_ids(scene) - before
    assert added == {new.GetID(), new.GetDisplayNode().GetID()}
    seg = new.GetSegmentation()
    assert [seg.GetNthSegmentID(i) for i in range(2)] == [i.segmentId for i in infos]
    assert [seg.GetNthSegment(i).GetName() for i in range(2)] == ["liver", "kidney"]
    assert seg.GetNthSegment(1).GetColor() == pytest.approx((0.1, 0.2, 0.9))
    again, _ = segmentations.segmentationToLabelImage(new, reference, scene)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(again), array)


def test_remove_nodes_takes_display_and_storage_nodes(scene):
    node = bridge.imageToVolumeNode(oblique_image(), scene, "vol")
    node.AddDefaultStorageNode()
    before = scene.GetNumberOfNodes()
    assert node.GetDisplayNode() is not None and node.GetStorageNode() is not None
    bridge.removeNodes(scene, [node, None])
    assert scene.GetNumberOfNodes() == before - 3
