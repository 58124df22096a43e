"""The headless registration logic against Slicer's real MRML core (``slicer-core``).

Most tests replace the engine's ``register`` by a fake that returns a known analytic deformation
(so they check the scene work exactly); ``test_real_engine_*`` runs the real engine on a tiny
pair the test builds.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: E402
import slicer  # slicer-core: Slicer's MRML core (a dev requirement; not skipped when missing)
from helpers import registration_result  # noqa: E402

from EOIRRegistrationLib.core import qa  # noqa: E402
from EOIRRegistrationLib.core.errors import InputError, RegistrationCancelled  # noqa: E402
from EOIRRegistrationLib.engine import optimise  # noqa: E402
from EOIRRegistrationLib.engine.options import RegistrationOptions, options_of  # noqa: E402
from EOIRRegistrationLib.engine.result import RegistrationResult  # noqa: E402
from EOIRRegistrationLib.slicer import bridge, catalog, display, runners, segmentations, selftest, worker  # noqa: E402  # noqa: E402
from EOIRRegistrationLib.slicer import logic as slicer_logic  # noqa: E402
from EOIRRegistrationLib.slicer import outputs as slicer_outputs  # noqa: E402

LIB_PARENT = Path(slicer_logic.__file__).resolve().parents[2]
TESTS_DIR = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# fixtures and the fake engine
# ---------------------------------------------------------------------------------------------

def oblique_image(size=(20, 18, 16), spacing=(1.2, 0.9, 2.0), origin=(10.0, -5.0, 3.0),
                  axis=(0.3, 0.5, 0.8), angle=0.35, seed=0):
    rng = np.random.RandomState(seed)
    raw = sitk.GetImageFromArray(rng.rand(*reversed(size)).astype(np.float32))
    arr = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(raw, 1.5))
    image = sitk.GetImageFromArray(((arr - arr.min()) / (arr.max() - arr.min()) * 1000.0)
                                   .astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(sitk.VersorTransform(axis, angle).GetMatrix())
    return image


def translation_matrix(x, y, z) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = (x, y, z)
    return m


def analytic_displacement(reference: sitk.Image, amplitude=2.0) -> sitk.Image:
    k, j, i = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in reversed(reference.GetSize())],
                          indexing="ij")
    d = amplitude * np.stack([np.sin(i / 5.0), -np.cos(j / 4.0), 0.5 * np.sin(k / 3.0)], axis=-1)
    field = sitk.GetImageFromArray(d, isVector=True)
    field.CopyInformation(reference)
    return sitk.Cast(field, sitk.sitkVectorFloat64)


class FakeEngine:
    """Stands in for ``pipeline.register``: same signature, known analytic displacement, a real
    ``RegistrationResult``. ``calls`` records the images and the options each call received."""

    stages = [("loading model", 0.1), ("features", 0.4), ("flow", 0.8), ("warping", 1.0)]

    def __init__(self, amplitude=2.0, delay=0.0):
        self.amplitude = amplitude
        self.delay = delay
        self.calls = []
        self.initial_matrix = np.eye(4)  # what the result reports as the initial matrix

    def __call__(self, fixed, moving, options=None, *, moving_labels=None, loaded_model=None,
                 progress=None, cancel=None, **option_changes):
        options = options_of(options, **option_changes)
        self.calls.append(dict(fixed=fixed, moving=moving, options=options,
                               moving_labels=moving_labels))
        for stage, fraction in self.stages:
            if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
                raise RegistrationCancelled("cancelled")
            time.sleep(self.delay)
            if progress is not None:
                progress(stage, fraction)
        return registration_result(fixed, moving, analytic_displacement(fixed, self.amplitude),
                                   moving_labels, options=options,
                                   initial_matrix=np.array(self.initial_matrix, dtype=float))


@pytest.fixture
def fake_engine(monkeypatch):
    engine = FakeEngine()
    monkeypatch.setattr(slicer_logic, "_engineRegister", lambda: engine)
    return engine


@pytest.fixture
def scene():
    scene, app_logic = bridge.createStandaloneScene()
    scene._eoirAppLogic = app_logic
    for name in ("Red", "Yellow", "Green"):
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        scene.AddNode(composite)
    return scene


@pytest.fixture
def volumes(scene):
    fixed = bridge.imageToVolumeNode(oblique_image(seed=1), scene, "fixed")
    moving = bridge.imageToVolumeNode(
        oblique_image(size=(18, 20, 14), spacing=(1.0, 1.1, 2.2), origin=(8.0, -3.0, 2.0), seed=2),
        scene, "moving")
    return fixed, moving


def add_segmentation(scene, reference_node):
    # on the reference's own voxel grid (its local frame, whatever transform it is under)
    image = bridge.volumeNodeToImage(reference_node,
                                     ignoreTransformNode=reference_node.GetParentTransformNode())
    labels = np.zeros(tuple(reversed(image.GetSize())), np.uint8)
    labels[3:8, 4:10, 4:10] = 5
    labels[8:12, 10:16, 8:14] = 2
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    label_node = bridge.imageToVolumeNode(label_image, scene, "labels",
                                          className="vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "organs")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        label_node, segmentation)
    segmentation.GetSegmentation().GetNthSegment(0).SetName("spleen")
    segmentation.GetSegmentation().GetNthSegment(1).SetName("liver")
    return segmentation, label_node


def scene_state(scene):
    """Everything a failed or cancelled run must leave untouched."""
    nodes = {}
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        entry = [node.GetClassName(), node.GetName()]
        if node.IsA("vtkMRMLTransformableNode"):
            entry.append(node.GetTransformNodeID())
        if node.IsA("vtkMRMLTransformNode"):
            entry.append(node.GetNodeReferenceID("spatialRegistrationMoving"))
            entry.append(node.GetAttribute("EOIRRegistration.folding_percent"))
            entry.append(node.GetAttribute(slicer_outputs.INITIAL_MATRIX_ATTRIBUTE))
            entry.append(node.IsLinear())
        if node.IsA("vtkMRMLVolumeNode") and node.GetImageData() is not None:
            entry.append(np.array(slicer.util.arrayFromVolume(node)).tobytes())
            entry.append(tuple(bridge.ijkToRASFromImage(bridge.volumeNodeToImage(node)).ravel())
                         if node.GetParentTransformNode() is None or
                         node.GetParentTransformNode().IsTransformToWorldLinear() else None)
        if node.IsA("vtkMRMLSliceCompositeNode"):
            entry += [node.GetBackgroundVolumeID(), node.GetForegroundVolumeID(),
                      node.GetLabelVolumeID(), node.GetForegroundOpacity()]
        nodes[node.GetID()] = entry
    return nodes


# ---------------------------------------------------------------------------------------------
# the result in the scene
# ---------------------------------------------------------------------------------------------

def test_register_volumes_builds_the_result_in_the_scene(scene, volumes, fake_engine):
    fixed, moving = volumes
    output_volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    progress = []
    logic = slicer_logic.RegistrationLogic(scene)
    out = logic.registerVolumes(fixed, moving, model="some-model", device="cpu",
                                outputVolumeNode=output_volume, working_spacing=2.0,
                                intensity_window=((0, 900), (0, 900)),
                                progressCallback=lambda s, f: progress.append((s, f)))
    call = fake_engine.calls[0]
    result = FakeEngine()(call["fixed"], call["moving"])
    # the engine saw the volumes with their LPS geometry and the options
    assert call["options"] == RegistrationOptions(model="some-model", device="cpu",
                                                  working_spacing=2.0,
                                                  intensity_window=((0, 900), (0, 900)))
    assert call["options"].model == "some-model" and call["options"].device == "cpu"
    assert call["options"].working_spacing == (2.0, 2.0, 2.0)
    assert call["options"].intensity_window == ((0, 900), (0, 900))
    np.testing.assert_allclose(call["fixed"].GetOrigin(), oblique_image(seed=1).GetOrigin())

    # transform: a new grid transform holding the engine's displacement, with references
    transform = out.transformNode
    assert transform.IsA("vtkMRMLGridTransformNode") and transform.GetScene() is scene
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(bridge.gridTransformNodeToDisplacement(transform)),
        sitk.GetArrayFromImage(result.displacement), atol=1e-12)
    assert transform.GetNodeReference("spatialRegistrationMoving") is moving
    assert transform.GetNodeReference("spatialRegistrationFixed") is fixed
    assert moving.GetParentTransformNode() is transform
    assert fixed.GetParentTransformNode() is None

    # Jacobian overlay centred on 1, folding in red, warped volume
    np.testing.assert_allclose(slicer.util.arrayFromVolume(out.jacobianVolumeNode),
                               sitk.GetArrayFromImage(result.jacobian))
    displayNode = out.jacobianVolumeNode.GetDisplayNode()
    assert displayNode.GetLevel() == pytest.approx(1.0)
    assert displayNode.GetColorNode().GetName() == display.JACOBIAN_COLOR_NODE_NAME
    assert out.foldingVolumeNode.IsA("vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(out.foldingVolumeNode),
                                  sitk.GetArrayFromImage(result.folding))
    assert out.foldingVolumeNode.GetDisplayNode().GetColorNode().GetName() == \
        display.FOLDING_COLOR_NODE_NAME
    assert out.warpedVolumeNode is output_volume
    np.testing.assert_allclose(slicer.util.arrayFromVolume(output_volume),
                               sitk.GetArrayFromImage(result.warped), atol=1e-4)
    warped_geometry = bridge.volumeNodeToImage(output_volume)
    np.testing.assert_allclose(warped_geometry.GetDirection(), call["fixed"].GetDirection(),
                               atol=1e-12)

    # QA figures returned (the engine's result's) and stored on the transform
    assert out.result is not None and out.qa is out.result.qa
    assert out.qa == pytest.approx(qa.jacobian_summary(
        slicer.util.arrayFromVolume(out.jacobianVolumeNode)))
    assert out.qa == pytest.approx(result.qa)
    assert 0.0 <= out.foldingPercent < 100.0
    assert out.foldingPercent == out.qa["folding_percent"] and out.sdLogJ == out.qa["sdlogj"]
    assert float(transform.GetAttribute("EOIRRegistration.sdlogj")) == \
        pytest.approx(out.qa["sdlogj"], rel=1e-5)
    assert transform.GetAttribute("EOIRRegistration.model") == "fake-model"
    assert out.result.model_name == "fake-model" and "folding" in out.summary()

    # slice views: fixed + Jacobian overlay + folding labels
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        assert composite.GetBackgroundVolumeID() == fixed.GetID()
        assert composite.GetForegroundVolumeID() == out.jacobianVolumeNode.GetID()
        assert composite.GetLabelVolumeID() == out.foldingVolumeNode.GetID()

    # progress: named stages, monotonic, from 0 to 1
    fractions = [f for _, f in progress]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    stages = [s for s, _ in progress]
    assert "reading volumes" in stages and "flow" in stages
    assert any(s.startswith("creating outputs") for s in stages)


def test_overlays_can_be_switched_off(scene, volumes, fake_engine):
    fixed, moving = volumes
    before = scene.GetNumberOfNodes()
    out = slicer_logic.RegistrationLogic(scene).registerVolumes(
        fixed, moving, showJacobian=False, showFolding=False)
    assert out.jacobianVolumeNode is None and out.foldingVolumeNode is None
    assert out.warpedVolumeNode is None
    assert "sdlogj" in out.qa  # the QA figures are still computed
    # only the transform node (and nothing else) was added
    assert scene.GetNumberOfNodes() == before + 1
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == moving.GetID()


def test_running_again_into_the_same_transform(scene, volumes, fake_engine):
    fixed, moving = volumes
    logic = slicer_logic.RegistrationLogic(scene)
    first = logic.registerVolumes(fixed, moving)
    transforms = scene.GetNumberOfNodesByClass("vtkMRMLTransformNode")
    fake_engine.amplitude = 1.0
    second = logic.registerVolumes(fixed, moving, outputTransformNode=first.transformNode)
    assert second.transformNode is first.transformNode
    assert scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == transforms
    # the engine saw the moving volume without the previous result applied
    a, b = fake_engine.calls
    np.testing.assert_allclose(a["moving"].GetOrigin(), b["moving"].GetOrigin())
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(bridge.gridTransformNodeToDisplacement(second.transformNode)),
        sitk.GetArrayFromImage(analytic_displacement(b["fixed"], 1.0)), atol=1e-12)
    assert moving.GetParentTransformNode() is first.transformNode


def test_segmentation_is_propagated_with_names_and_labels(scene, volumes, fake_engine):
    fixed, moving = volumes
    segmentation, _ = add_segmentation(scene, moving)
    out = slicer_logic.RegistrationLogic(scene).registerVolumes(
        fixed, moving, movingSegmentationNode=segmentation)
    call = fake_engine.calls[0]
    assert call["moving_labels"] is not None
    propagated = out.warpedSegmentationNode
    assert propagated.IsA("vtkMRMLSegmentationNode")
    seg = propagated.GetSegmentation()
    assert [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())] == \
        ["spleen", "liver"]
    expected = sitk.GetArrayFromImage(sitk.Resample(
        call["moving_labels"], call["fixed"],
        sitk.DisplacementFieldTransform(analytic_displacement(call["fixed"])),
        sitk.sitkNearestNeighbor, 0))
    labels, infos = segmentations.segmentationToLabelImage(propagated, fixed, scene)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected)
    assert (expected == 1).sum() > 50 and (expected == 2).sum() > 50


def test_label_map_is_propagated_nearest_neighbour(scene, volumes, fake_engine):
    fixed, moving = volumes
    _, label_node = add_segmentation(scene, moving)
    out = slicer_logic.RegistrationLogic(scene).registerVolumes(
        fixed, moving, movingSegmentationNode=label_node)
    propagated = out.warpedSegmentationNode
    assert propagated.IsA("vtkMRMLLabelMapVolumeNode")
    values = set(np.unique(slicer.util.arrayFromVolume(propagated)).tolist())
    assert values == {0, 2, 5}  # nearest neighbour: no new label values
    assert propagated.GetDisplayNode().GetColorNodeID() == \
        label_node.GetDisplayNode().GetColorNodeID()


# ---------------------------------------------------------------------------------------------
# the scene is left as it was after an error or a cancel
# ---------------------------------------------------------------------------------------------

def _failing(real, calls_before_failure=0, after=False):
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls_before_failure:
            if after:
                real(*args, **kwargs)
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("target, calls_before, after", [
    ("setGridTransformFromDisplacement", 0, True),
    ("placeMovingUnderTransform", 0, True),
    ("showJacobianVolume", 0, True),
    ("showFoldingLabelmap", 0, False),
    ("imageToVolumeNode", 2, True),  # third call: the warped output volume
    ("labelImageToSegmentationNode", 0, False),
    ("setSliceViewerLayers", 0, True),
])
def test_scene_is_left_as_it_was_after_a_failure(scene, volumes, fake_engine, monkeypatch,
                                                  target, calls_before, after):
    fixed, moving = volumes
    logic = slicer_logic.RegistrationLogic(scene)
    fake_engine.initial_matrix = translation_matrix(1.0, 2.0, 3.0)
    previous = logic.registerVolumes(fixed, moving)  # an earlier result to be reused
    assert previous.transformNode.GetAttribute(slicer_outputs.INITIAL_MATRIX_ATTRIBUTE)
    fake_engine.initial_matrix = translation_matrix(-4.0, 0.0, 0.5)
    segmentation, _ = add_segmentation(scene, moving)
    output_volume = bridge.imageToVolumeNode(oblique_image(seed=7), scene, "old warped")
    prealign = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "prealign")
    moving.SetAndObserveTransformNodeID(prealign.GetID())
    before = scene_state(scene)
    displacement_before = sitk.GetArrayFromImage(
        bridge.gridTransformNodeToDisplacement(previous.transformNode))

    module = next(m for m in (bridge, display, segmentations) if hasattr(m, target))
    monkeypatch.setattr(module, target, _failing(getattr(module, target), calls_before, after))
    fake_engine.amplitude = 0.5
    with pytest.raises(RuntimeError, match="injected failure"):
        logic.registerVolumes(fixed, moving, outputTransformNode=previous.transformNode,
                              outputVolumeNode=output_volume,
                              movingSegmentationNode=segmentation)
    assert scene_state(scene) == before
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(bridge.gridTransformNodeToDisplacement(previous.transformNode)),
        displacement_before)


def test_scene_is_untouched_after_a_cancel_during_the_engine(scene, volumes, fake_engine):
    fixed, moving = volumes
    segmentation, _ = add_segmentation(scene, moving)
    before = scene_state(scene)
    cancel = threading.Event()

    def progress(stage, fraction):
        if stage == "features":
            cancel.set()

    with pytest.raises(RegistrationCancelled):
        slicer_logic.RegistrationLogic(scene).registerVolumes(
            fixed, moving, movingSegmentationNode=segmentation, progressCallback=progress,
            cancelEvent=cancel)
    assert scene_state(scene) == before


@pytest.mark.parametrize("cancel_at", ["creating outputs: folding", "creating outputs: slice views"])
def test_scene_is_left_as_it_was_after_a_cancel_while_creating_outputs(
        scene, volumes, fake_engine, cancel_at):
    fixed, moving = volumes
    output_volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    before = scene_state(scene)
    cancel = threading.Event()

    def progress(stage, fraction):
        if stage == cancel_at:
            cancel.set()

    with pytest.raises(RegistrationCancelled):
        slicer_logic.RegistrationLogic(scene).registerVolumes(
            fixed, moving, outputVolumeNode=output_volume, progressCallback=progress,
            cancelEvent=lambda: cancel.is_set())  # a callable works as well as an Event
    assert scene_state(scene) == before


def test_bad_inputs_are_refused_before_anything_changes(scene, volumes, fake_engine):
    fixed, moving = volumes
    logic = slicer_logic.RegistrationLogic(scene)
    label = bridge.imageToVolumeNode(sitk.Image(4, 4, 4, sitk.sitkUInt8), scene, "lab",
                                     className="vtkMRMLLabelMapVolumeNode")
    applied_to_fixed = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "onFixed")
    fixed.SetAndObserveTransformNodeID(applied_to_fixed.GetID())
    before = scene_state(scene)
    cases = [
        (dict(fixedVolumeNode=fixed, movingVolumeNode=fixed), "same"),
        (dict(fixedVolumeNode=None, movingVolumeNode=moving), "fixed and a moving"),
        (dict(fixedVolumeNode=label, movingVolumeNode=moving), "label map"),
        (dict(fixedVolumeNode=fixed, movingVolumeNode=moving, outputVolumeNode=moving), "output"),
        (dict(fixedVolumeNode=fixed, movingVolumeNode=moving,
              outputTransformNode=applied_to_fixed), "applied to the fixed"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            logic.registerVolumes(**kwargs)
    assert fake_engine.calls == []
    assert scene_state(scene) == before


def test_a_result_off_the_fixed_grid_is_refused(scene, volumes, fake_engine):
    fixed, moving = volumes
    logic = slicer_logic.RegistrationLogic(scene)
    inputs = logic.prepareInputs(fixed, moving)
    result = fake_engine(inputs.fixedImage, inputs.movingImage)
    shifted = sitk.Image(result.displacement)
    shifted.SetOrigin([o + 0.5 for o in shifted.GetOrigin()])
    result.displacement = shifted
    before = scene_state(scene)
    with pytest.raises(RuntimeError, match="not on the fixed volume's grid"):
        logic.createOutputs(inputs, result)
    assert scene_state(scene) == before


# ---------------------------------------------------------------------------------------------
# background run (what the GUI uses)
# ---------------------------------------------------------------------------------------------

def test_background_registration_reports_progress_and_result(scene, volumes, monkeypatch):
    engine = FakeEngine(delay=0.05)
    monkeypatch.setattr(slicer_logic, "_engineRegister", lambda: engine)
    fixed, moving = volumes
    logic = slicer_logic.RegistrationLogic(scene)
    inputs = logic.prepareInputs(fixed, moving)
    before = scene.GetNumberOfNodes()
    options = RegistrationOptions(model="default", device="cpu")
    job = runners.BackgroundRegistration(inputs, options).start()
    seen = []
    while not job.done:
        seen.append(job.poll())
        time.sleep(0.01)
    assert job.error is None and isinstance(job.result, RegistrationResult)
    assert engine.calls[0]["options"] == options
    assert scene.GetNumberOfNodes() == before  # the worker never touches the scene
    assert any(stage == "flow" for stage, *_ in seen)
    assert all(0.0 <= fraction <= 1.0 for _, fraction, *_ in seen)
    out = logic.createOutputs(inputs, job.result)
    assert moving.GetParentTransformNode() is out.transformNode


def test_background_registration_can_be_cancelled(scene, volumes, monkeypatch):
    engine = FakeEngine(delay=0.2)
    monkeypatch.setattr(slicer_logic, "_engineRegister", lambda: engine)
    fixed, moving = volumes
    inputs = slicer_logic.RegistrationLogic(scene).prepareInputs(fixed, moving)
    job = runners.BackgroundRegistration(inputs, RegistrationOptions()).start()
    job.cancel()
    assert job.wait(timeout=10)
    assert isinstance(job.error, RegistrationCancelled)
    assert job.result is None
    assert "cancelled" in slicer_logic.describeError(job.error)


#: A stand-alone fake engine for the worker process (imports no torch, so the child starts fast);
#: same analytic displacement as FakeEngine, a real RegistrationResult (the worker saves it).
#: With EOIR_FAKE_RECORD set it writes there the options it received.
FAKE_ENGINE_MODULE = '''
import os, time
import numpy as np
import SimpleITK as sitk

from helpers import registration_result


def register(fixed, moving, options=None, *, moving_labels=None, loaded_model=None,
             progress=None, cancel=None, fixed_labels=None, fixed_mask=None, moving_mask=None,
             **option_changes):
    from EOIRRegistrationLib.engine.options import options_of

    record = os.environ.get("EOIR_FAKE_RECORD")
    if record:
        import json
        with open(record, "w") as f:
            json.dump({"type": type(options).__name__,
                       "options": None if options is None else options.to_dict(),
                       "option_changes": sorted(option_changes),
                       "labels": moving_labels is not None,
                       "images": {name: list(image.GetSize()) for name, image in (
                           ("fixed_labels", fixed_labels), ("fixed_mask", fixed_mask),
                           ("moving_mask", moving_mask)) if image is not None}}, f)
    options = options_of(options, **option_changes)
    failure = os.environ.get("EOIR_FAKE_FAIL")
    if failure == "crash":
        os._exit(3)
    if failure == "input":
        from EOIRRegistrationLib.core.errors import InputError
        raise InputError("the fixed image is constant")
    for stage, fraction in (("loading model", 0.1), ("features", 0.4), ("flow", 0.8)):
        if cancel is not None and cancel():
            from EOIRRegistrationLib.core.errors import RegistrationCancelled
            raise RegistrationCancelled("cancelled")
        time.sleep(float(os.environ.get("EOIR_FAKE_DELAY", "0")))
        progress(stage, fraction)
    k, j, i = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in reversed(fixed.GetSize())],
                          indexing="ij")
    d = 2.0 * np.stack([np.sin(i / 5.0), -np.cos(j / 4.0), 0.5 * np.sin(k / 3.0)], axis=-1)
    field = sitk.GetImageFromArray(d, isVector=True)
    field.CopyInformation(fixed)
    # "auto" acts as if the inputs were already aligned
    aligned = options.initial_alignment in ("none", "auto")
    return registration_result(
        fixed, moving, field, moving_labels, options=options, timings={"flow": 0.01},
        initial_alignment="none" if aligned else options.initial_alignment,
        initial_matrix=np.eye(4) if aligned else np.array(
            [[1.0, 0, 0, 1.5], [0, 1.0, 0, -2.5], [0, 0, 1.0, 0.25], [0, 0, 0, 1]]))
'''


@pytest.fixture
def worker_env(monkeypatch, tmp_path_factory):
    """Let the worker process import the stand-alone fake engine (``eoir_fake_engine``)."""
    fake_dir = tmp_path_factory.mktemp("fake_engine")
    (fake_dir / "eoir_fake_engine.py").write_text(FAKE_ENGINE_MODULE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake_dir), str(LIB_PARENT),
                                                      str(TESTS_DIR),
                                                      os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("EOIR_FAKE_FAIL", raising=False)
    monkeypatch.delenv("EOIR_FAKE_DELAY", raising=False)
    monkeypatch.delenv("EOIR_FAKE_RECORD", raising=False)
    return monkeypatch


def test_process_registration_runs_the_engine_in_a_child_process(scene, volumes, worker_env,
                                                                 tmp_path):
    fixed, moving = volumes
    segmentation, _ = add_segmentation(scene, moving)
    logic = slicer_logic.RegistrationLogic(scene)
    inputs = logic.prepareInputs(fixed, moving, segmentation)
    options = RegistrationOptions(model="default", device="cpu", working_spacing=1.5)
    job = runners.ProcessRegistration(inputs, options, engine="eoir_fake_engine:register",
                                      tempDir=str(tmp_path)).start()
    assert job.jobDir.exists()
    # the job file: the options as a dict, the engine and the image files
    import json

    with open(job.jobDir / worker.JOB_FILE, encoding="utf-8") as f:
        written = json.load(f)
    assert written == {"options": options.to_dict(), "engine": "eoir_fake_engine:register",
                       "fixed": "fixed.mha", "moving": "moving.mha", "labels": "labels.mha"}
    assert RegistrationOptions.from_dict(written["options"]) == options
    assert all((job.jobDir / written[k]).exists() for k in ("fixed", "moving", "labels"))
    assert job.wait(timeout=120), "worker did not finish"
    assert job.error is None, job.error
    assert not job.jobDir.exists()  # temporary files removed
    result = job.result
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.displacement),
                               sitk.GetArrayFromImage(analytic_displacement(inputs.fixedImage)),
                               atol=1e-12)
    np.testing.assert_allclose(result.displacement.GetDirection(),
                               inputs.fixedImage.GetDirection(), atol=1e-12)
    assert isinstance(result, RegistrationResult) and result.options == options
    assert result.warped_labels is not None and result.model_name == "fake-model"
    stage, fraction, elapsed, _ = job.poll()
    assert stage == "done" and elapsed > 0
    out = logic.createOutputs(inputs, result)
    assert moving.GetParentTransformNode() is out.transformNode
    assert out.warpedSegmentationNode.GetSegmentation().GetNumberOfSegments() == 2


def test_process_registration_cancel_and_errors(scene, volumes, worker_env, tmp_path):
    fixed, moving = volumes
    inputs = slicer_logic.RegistrationLogic(scene).prepareInputs(fixed, moving)
    engine = "eoir_fake_engine:register"

    worker_env.setenv("EOIR_FAKE_DELAY", "0.5")
    job = runners.ProcessRegistration(inputs, RegistrationOptions(), engine=engine,
                                      tempDir=str(tmp_path)).start()
    job.cancel()
    assert job.wait(timeout=120)
    assert isinstance(job.error, RegistrationCancelled) and job.result is None
    assert not job.jobDir.exists()

    worker_env.setenv("EOIR_FAKE_DELAY", "0")
    worker_env.setenv("EOIR_FAKE_FAIL", "input")
    job = runners.ProcessRegistration(inputs, RegistrationOptions(), engine=engine,
                                      tempDir=str(tmp_path)).start()
    assert job.wait(timeout=120)
    assert isinstance(job.error, InputError) and "constant" in str(job.error)

    worker_env.setenv("EOIR_FAKE_FAIL", "crash")
    job = runners.ProcessRegistration(inputs, RegistrationOptions(), engine=engine,
                                      tempDir=str(tmp_path)).start()
    assert job.wait(timeout=120)
    assert isinstance(job.error, RuntimeError) and "exit status 3" in str(job.error)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# bundled models are listed without importing torch
# ---------------------------------------------------------------------------------------------

def test_bundled_models_are_listed_without_torch(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    payload = {"format": "eoir-registration-model", "format_version": 1, "architecture": "eoir",
               "config": {"ns": 8}, "state_dict": {"w": torch.zeros(3)},
               "card": {"description": "Brain MRI, 2 mm, trained on synthetic shapes\nmore"}}
    torch.save(payload, tmp_path / "alpha.pt")
    torch.save({"format": "x", "card": {}}, tmp_path / "beta.pt")
    (tmp_path / "gamma.pt").write_bytes(b"not a zip file")
    (tmp_path / "delta.pt").write_bytes(b"")
    (tmp_path / "delta.json").write_text('{"description": "from the json card"}')
    monkeypatch.setattr(catalog, "BUNDLED_MODELS_DIR", tmp_path)
    monkeypatch.setattr(catalog, "DEFAULT_MODEL", "delta")
    listed = catalog.listBundledModels()
    assert listed[0].name == "delta"  # the engine's default first, then by name
    assert [m.name for m in listed[1:]] == ["alpha", "beta", "gamma"]
    models = {m.name: m.description for m in listed}
    assert models == {"alpha": "Brain MRI, 2 mm, trained on synthetic shapes", "beta": "",
                      "gamma": "", "delta": "from the json card"}
    # the default model and the folder are the engine's own
    from EOIRRegistrationLib.engine import modelfile, options

    monkeypatch.undo()
    assert catalog.DEFAULT_MODEL == options.DEFAULT_MODEL == modelfile.DEFAULT_MODEL
    assert catalog.BUNDLED_MODELS_DIR == modelfile.BUNDLED_DIR
    assert [m.name for m in catalog.listBundledModels()] == \
        [m.name for m in modelfile.list_bundled_models()]

    # and in a fresh interpreter the panel's imports do not pull torch (or the engine) in
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(LIB_PARENT)!r})\n"
        "from EOIRRegistrationLib.slicer import bridge, catalog, logic, outputs, runners, \\\n"
        "    selftest, texts, transaction, worker\n"
        "from EOIRRegistrationLib.engine import options, result\n"
        "catalog.listBundledModels()\n"
        "catalog.gpuProbablyAvailable()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'EOIRRegistrationLib.engine.pipeline' not in sys.modules, 'engine imported'\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# the real engine on a tiny pair
# ---------------------------------------------------------------------------------------------

def _require_real_engine_and_bundled_model():
    """The engine and a bundled model are part of the checkout: a failing import or a missing
    model fails the test (no skip)."""
    import EOIRRegistrationLib.engine.pipeline  # noqa: F401

    assert catalog.listBundledModels(), "no bundled model in EOIRRegistrationLib/bundled_models"


def _foreground_dice(a, b) -> float:
    """Dice overlap of the foreground (> 0) of two label arrays (numpy or SimpleITK)."""
    a = sitk.GetArrayFromImage(a) if isinstance(a, sitk.Image) else np.asarray(a)
    b = sitk.GetArrayFromImage(b) if isinstance(b, sitk.Image) else np.asarray(b)
    return qa.dice((a > 0).astype(np.uint8), (b > 0).astype(np.uint8), values=[1])[1]


def test_real_engine_improves_overlap_with_little_folding(scene):
    """The same assertions as EOIRRegistrationTest.test_RegisterSyntheticPair inside Slicer."""
    _require_real_engine_and_bundled_model()
    fixed_img, moving_img, fixed_labels, moving_labels = selftest.syntheticTestPair()
    fixed = bridge.imageToVolumeNode(fixed_img, scene, "fixed")
    moving = bridge.imageToVolumeNode(moving_img, scene, "moving")
    label_node = bridge.imageToVolumeNode(moving_labels, scene, "moving labels",
                                          className="vtkMRMLLabelMapVolumeNode")
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    out = slicer_logic.RegistrationLogic(scene).registerVolumes(
        fixed, moving, model="default", device="cpu", outputVolumeNode=output,
        movingSegmentationNode=label_node)
    before = _foreground_dice(fixed_labels, moving_labels)
    after = _foreground_dice(fixed_labels, slicer.util.arrayFromVolume(out.warpedSegmentationNode))
    assert after > before + 0.05, (before, after)
    fixed_arr = sitk.GetArrayFromImage(fixed_img)
    mse_before = np.mean((sitk.GetArrayFromImage(moving_img) - fixed_arr) ** 2)
    mse_after = np.mean((slicer.util.arrayFromVolume(output) - fixed_arr) ** 2)
    assert mse_after < mse_before
    assert out.foldingPercent < 1.0
    assert moving.GetParentTransformNode() is out.transformNode


def test_self_test_checks_pass_with_the_real_engine():
    """The module's self-test (``slicer.selftest``, what EOIRRegistrationTest runs inside Slicer)
    passes on slicer-core scenes with the headless logic and the real engine."""
    _require_real_engine_and_bundled_model()
    scene, app_logic = bridge.createStandaloneScene()
    summary = selftest.checkRegistration(scene,
                                         slicer_logic.RegistrationLogic(scene).registerVolumes)
    assert summary.startswith("Dice ") and "folding" in summary
    other, other_app_logic = bridge.createStandaloneScene()
    selftest.checkCancelLeavesSceneAsItWas(
        other, slicer_logic.RegistrationLogic(other).registerVolumes)


@pytest.fixture(scope="module")
def untrained_model_file(tmp_path_factory):
    """A small EOIR model with random weights (large enough output to move voxels by millimetres):
    not for accuracy, for checking that the real engine's result lands in Slicer correctly."""
    from helpers import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "untrained.pt", 0.05,
                            spacing=(2.0, 2.0, 2.0), description="untrained test model")


def test_real_engine_result_lands_in_slicer_as_the_engine_computed_it(scene, untrained_model_file,
                                                                      monkeypatch):
    """Real engine (untrained model) on an oblique pair: the transform node holds the engine's
    displacement, the warped volume is the engine's, and Slicer's own hardenTransform of the
    moving volume resamples it like ITK does with the engine's field."""
    from EOIRRegistrationLib.engine import pipeline

    results = []

    def spy(*args, **kwargs):
        results.append(pipeline.register(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(slicer_logic, "_engineRegister", lambda: spy)
    fixed_img = oblique_image(size=(24, 22, 20), spacing=(1.5, 1.7, 2.0), seed=3)
    moving_img = oblique_image(size=(22, 24, 18), spacing=(1.6, 1.5, 2.1), origin=(9.0, -4.0, 1.0),
                               angle=0.25, seed=4)
    fixed = bridge.imageToVolumeNode(fixed_img, scene, "fixed")
    moving = bridge.imageToVolumeNode(moving_img, scene, "moving")
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    out = slicer_logic.RegistrationLogic(scene).registerVolumes(
        fixed, moving, model=untrained_model_file, device="cpu", outputVolumeNode=output,
        initial_alignment="none")  # two unrelated noise images: nothing to align
    result = results[0]
    d = sitk.GetArrayFromImage(result.displacement)
    assert np.abs(d).max() > 1.0  # the untrained model does move voxels
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(bridge.gridTransformNodeToDisplacement(out.transformNode)), d,
        atol=1e-12)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(output),
                                  sitk.GetArrayFromImage(result.warped))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(out.jacobianVolumeNode),
                                  sitk.GetArrayFromImage(result.jacobian))
    assert out.result is result and out.qa == pytest.approx(result.qa)

    # Slicer's own resampling of the moving volume through the transform node
    transform_logic = slicer.vtkSlicerTransformLogic()
    transform_logic.SetMRMLScene(scene)
    transform_logic.hardenTransform(moving)
    hardened = bridge.volumeNodeToImage(moving)
    itk = sitk.Resample(moving_img, hardened, sitk.DisplacementFieldTransform(
        sitk.Image(result.displacement)), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    # compare where the hardened voxel lies well inside the fixed grid (the field's domain)
    # compare where the hardened voxel lies well inside the fixed grid (the field's domain) and
    # maps to a point well inside the moving volume (outside it ITK gives 0, Slicer the border)
    h_arr, i_arr = sitk.GetArrayFromImage(hardened), sitk.GetArrayFromImage(itk)
    field = sitk.DisplacementFieldTransform(sitk.Image(result.displacement))

    def well_inside(image, point):
        c = np.array(image.TransformPhysicalPointToContinuousIndex(point))
        return np.all(c > 1.0) and np.all(c < np.array(image.GetSize()) - 2.0)

    inside = np.zeros(h_arr.shape, bool)
    for k in range(h_arr.shape[0]):
        for j in range(h_arr.shape[1]):
            for i in range(h_arr.shape[2]):
                x = hardened.TransformIndexToPhysicalPoint((i, j, k))
                inside[k, j, i] = well_inside(fixed_img, x) and \
                    well_inside(moving_img, field.TransformPoint(x))
    assert inside.sum() > 1000
    np.testing.assert_allclose(h_arr[inside], i_arr[inside], atol=0.05)
    # ... and the engine's warped image is ITK's resampling of the moving through the same field
    itk_fixed = sitk.Resample(moving_img, fixed_img, sitk.DisplacementFieldTransform(
        sitk.Image(result.displacement)), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.warped),
                               sitk.GetArrayFromImage(itk_fixed), atol=0.05)


def test_real_engine_runs_in_the_worker_process(scene, untrained_model_file, tmp_path):
    """The GUI path: the real engine in a child process, results read back into the scene."""
    fixed_img, moving_img, _, moving_labels = selftest.syntheticTestPair(size=24)
    fixed = bridge.imageToVolumeNode(fixed_img, scene, "fixed")
    moving = bridge.imageToVolumeNode(moving_img, scene, "moving")
    labels = bridge.imageToVolumeNode(moving_labels, scene, "labels",
                                      className="vtkMRMLLabelMapVolumeNode")
    logic = slicer_logic.RegistrationLogic(scene)
    inputs = logic.prepareInputs(fixed, moving, labels)
    progress = []
    options = RegistrationOptions(model=untrained_model_file, device="cpu")
    job = runners.ProcessRegistration(inputs, options, tempDir=str(tmp_path)).start()
    while not job.done:
        progress.append(job.poll()[:2])
        time.sleep(0.05)
    assert job.error is None, f"{job.error}"
    # Polling sees whichever stage is current; short stages may pass between two polls.
    from EOIRRegistrationLib.engine.pipeline import STAGES
    assert {stage for stage, _ in progress} & set(STAGES)
    assert job.result.model_name == "untrained" and job.result.device == "cpu"
    assert job.result.options == options
    out = logic.createOutputs(inputs, job.result)
    assert out.warpedSegmentationNode.IsA("vtkMRMLLabelMapVolumeNode")
    assert set(np.unique(slicer.util.arrayFromVolume(out.warpedSegmentationNode))) <= {0, 1, 2}
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# initial alignment and per-pair refinement
# ---------------------------------------------------------------------------------------------

def test_alignment_and_refinement_options_reach_the_engine(scene, volumes, fake_engine):
    fixed, moving = volumes
    logic = slicer_logic.RegistrationLogic(scene)
    # defaults: the engine's own (automatic alignment, its default refinement)
    first = logic.registerVolumes(fixed, moving)
    options = fake_engine.calls[-1]["options"]
    assert options == RegistrationOptions()
    assert options.initial_alignment == "auto"
    # refinement on, its steps and similarity left to the engine (they follow the contrast)
    assert options.refine_iterations is None and options.preset == "default"
    assert options.refine_seconds is None and options.refine_similarity is None
    assert options.contrast == "auto" and options.network is None
    # every result has an initial matrix (identity here), stored on the transform
    np.testing.assert_array_equal(first.result.initial_matrix, np.eye(4))
    np.testing.assert_array_equal(slicer_outputs.initialMatrixFromAttribute(
        first.transformNode.GetAttribute(slicer_outputs.INITIAL_MATRIX_ATTRIBUTE)), np.eye(4))

    matrix = np.array([[0.98, -0.17, 0.0, 4.0], [0.17, 0.98, 0.0, -2.0], [0.0, 0.0, 1.0, 1.5],
                       [0.0, 0.0, 0.0, 1.0]])
    fake_engine.initial_matrix = matrix
    out = logic.registerVolumes(fixed, moving, initial_alignment="rigid", refine_iterations=25,
                                refine_seconds=4.5, outputTransformNode=first.transformNode)
    options = fake_engine.calls[-1]["options"]
    assert options == RegistrationOptions(initial_alignment="rigid", refine_iterations=25,
                                          refine_seconds=4.5)
    assert options.initial_alignment == "rigid" and options.initial_transform is None
    assert options.refine_iterations == 25 and options.refine_seconds == 4.5
    # the matrix is returned and stored on the transform as 16 numbers (row-major)
    np.testing.assert_array_equal(out.result.initial_matrix, matrix)
    text = out.transformNode.GetAttribute(slicer_outputs.INITIAL_MATRIX_ATTRIBUTE)
    assert len(text.split()) == 16
    np.testing.assert_allclose(slicer_outputs.initialMatrixFromAttribute(text), matrix, atol=1e-12)

    # refinement without a time limit; a rerun replaces the stored matrix with its own
    fake_engine.initial_matrix = translation_matrix(1.0, -2.0, 0.5)
    out = logic.registerVolumes(fixed, moving, initial_alignment="com", refine_iterations=3,
                                outputTransformNode=first.transformNode)
    options = fake_engine.calls[-1]["options"]
    assert options.initial_alignment == "com" and options.refine_iterations == 3
    assert options.refine_seconds is None
    np.testing.assert_allclose(slicer_outputs.initialMatrixFromAttribute(
        out.transformNode.GetAttribute(slicer_outputs.INITIAL_MATRIX_ATTRIBUTE)),
        translation_matrix(1.0, -2.0, 0.5), atol=1e-12)

    # iterations 0 switch refinement off whatever the budget
    logic.registerVolumes(fixed, moving, initial_alignment="affine", refine_iterations=0,
                          refine_seconds=30.0, outputTransformNode=first.transformNode)
    options = fake_engine.calls[-1]["options"]
    assert options.refine_iterations == 0
    assert options.initial_alignment == "affine"

    # an options object works as well as keywords, and keywords apply on top of it
    given = RegistrationOptions(initial_alignment="none", contrast="same", refine_iterations=5)
    logic.registerVolumes(fixed, moving, given, outputTransformNode=first.transformNode)
    assert fake_engine.calls[-1]["options"] == given
    logic.registerVolumes(fixed, moving, given, refine_iterations=6,
                          outputTransformNode=first.transformNode)
    assert fake_engine.calls[-1]["options"] == given.replace(refine_iterations=6)

    # the thread variant passes them too
    inputs = logic.prepareInputs(fixed, moving, outputTransformNode=first.transformNode)
    job = runners.BackgroundRegistration(inputs, RegistrationOptions(
        initial_alignment="com", refine_iterations=7, refine_seconds=1.0)).start()
    assert job.wait(timeout=30) and job.error is None, job.error
    options = fake_engine.calls[-1]["options"]
    assert options.initial_alignment == "com" and options.refine_iterations == 7
    assert options.refine_seconds == 1.0
    assert options.network is None  # the default: follows the contrast

    # the refinement alone (no network), e.g. for two modalities
    logic.registerVolumes(fixed, moving, network=False, refine_iterations=40,
                          refine_similarity="mind", outputTransformNode=first.transformNode)
    options = fake_engine.calls[-1]["options"]
    assert options.network is False and options.refine_iterations == 40
    assert options.refine_similarity == "mind"

    # an explicit contrast reaches the engine; None iterations mean the engine's default
    logic.registerVolumes(fixed, moving, contrast="different", refine_iterations=None,
                          outputTransformNode=first.transformNode)
    options = fake_engine.calls[-1]["options"]
    assert options == RegistrationOptions(contrast="different")
    assert options.refine_iterations is None


@pytest.mark.parametrize("options, message", [
    (dict(network=False, refine_iterations=0), "is the whole registration"),
    (dict(initial_alignment="similarity"), "unknown initial alignment"),
    (dict(contrast="T2"), "unknown contrast"),
    (dict(refine_iterations="many"), "must be a number"),
    (dict(refine_iterations=1001), "refine iterations"),
    (dict(refine_iterations=2.5), "refine iterations"),
    (dict(refine_iterations=-1), "refine iterations"),  # the panel's -1 is mapped to None
    (dict(refine_iterations=10, refine_seconds=-1.0), "time budget"),
    (dict(refine_iterations=10, refine_seconds=0.0), "time budget"),  # None: no limit
    (dict(refine_iterations=10, refine_similarity="mutual information"),
     "refinement similarity"),
    (dict(device="tpu"), "unknown device"),
    (dict(working_spacing=-2.0), "working spacing"),
    (dict(intensity_window=((0, 900), (500, 100))), "intensity window"),
    (dict(initial_transform=np.zeros((4, 4))), "initial transform"),
    (dict(useNetwork=False), "unknown registration option"),  # the former names are refused
])
def test_bad_alignment_or_refinement_options_are_refused(scene, volumes, fake_engine, tmp_path,
                                                         options, message):
    fixed, moving = volumes
    logic = slicer_logic.RegistrationLogic(scene)
    before = scene_state(scene)
    with pytest.raises(InputError, match=message):
        logic.registerVolumes(fixed, moving, **options)
    assert fake_engine.calls == [] and scene_state(scene) == before
    # the same checks build the options object a runner takes ...
    with pytest.raises(InputError, match=message):
        RegistrationOptions().replace(**options)
    # ... and read a worker's job file: bad options are refused before the engine is loaded,
    # with the reason in error.json
    import json

    job = {"options": {**RegistrationOptions().to_dict(),
                       **{k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v
                          for k, v in options.items()}},
           "engine": "no_such_module:register", "fixed": "fixed.mha", "moving": "moving.mha",
           "labels": None}
    (tmp_path / worker.JOB_FILE).write_text(json.dumps(job), encoding="utf-8")
    assert worker.run(tmp_path) == worker.EXIT_ERROR
    error = worker.errorFromReport(json.loads((tmp_path / worker.ERROR_FILE).read_text()))
    assert isinstance(error, InputError) and re.search(message, str(error))


def test_process_registration_passes_alignment_and_refinement(scene, volumes, worker_env,
                                                              tmp_path):
    import json

    fixed, moving = volumes
    logic = slicer_logic.RegistrationLogic(scene)
    inputs = logic.prepareInputs(fixed, moving)
    record = tmp_path.parent / f"{tmp_path.name}-record.json"
    worker_env.setenv("EOIR_FAKE_RECORD", str(record))
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    options = RegistrationOptions(initial_alignment="affine", refine_iterations=7,
                                  refine_seconds=2.0, refine_similarity="mind")
    job = runners.ProcessRegistration(inputs, options, engine="eoir_fake_engine:register",
                                      tempDir=str(jobs)).start()
    assert job.wait(timeout=120) and job.error is None, job.error
    seen = json.loads(record.read_text())
    assert seen["type"] == "RegistrationOptions" and seen["option_changes"] == []
    seen_options = RegistrationOptions.from_dict(seen["options"])
    assert seen_options == options
    assert seen_options.initial_alignment == "affine" and seen_options.network is None
    assert seen_options.contrast == "auto"
    assert (seen_options.refine_iterations, seen_options.refine_seconds,
            seen_options.refine_similarity) == (7, 2.0, "mind")
    expected = np.array([[1.0, 0, 0, 1.5], [0, 1.0, 0, -2.5], [0, 0, 1.0, 0.25], [0, 0, 0, 1]])
    np.testing.assert_array_equal(job.result.initial_matrix, expected)
    assert job.result.initial_alignment == "affine"
    out = logic.createOutputs(inputs, job.result)
    np.testing.assert_array_equal(out.result.initial_matrix, expected)
    np.testing.assert_allclose(slicer_outputs.initialMatrixFromAttribute(
        out.transformNode.GetAttribute(slicer_outputs.INITIAL_MATRIX_ATTRIBUTE)), expected)

    # defaults: automatic alignment, the engine's default refinement
    job = runners.ProcessRegistration(inputs, RegistrationOptions(),
                                      engine="eoir_fake_engine:register",
                                      tempDir=str(jobs)).start()
    assert job.wait(timeout=120) and job.error is None, job.error
    seen_options = RegistrationOptions.from_dict(json.loads(record.read_text())["options"])
    assert seen_options == RegistrationOptions()
    assert seen_options.initial_alignment == "auto"
    assert seen_options.refine_iterations is None  # the engine's, by contrast
    np.testing.assert_array_equal(job.result.initial_matrix, np.eye(4))

    # without the network: the worker passes it on
    options = RegistrationOptions(network=False, refine_iterations=30, contrast="different")
    job = runners.ProcessRegistration(inputs, options, engine="eoir_fake_engine:register",
                                      tempDir=str(jobs)).start()
    assert job.wait(timeout=120) and job.error is None, job.error
    seen_options = RegistrationOptions.from_dict(json.loads(record.read_text())["options"])
    assert seen_options.network is False and seen_options.refine_iterations == 30
    assert seen_options.contrast == "different"
    assert list(jobs.iterdir()) == []


def test_worker_job_file_round_trips_the_options(scene, volumes, worker_env, tmp_path):
    """Every option, none at its default, reaches the engine in the worker process unchanged
    (through job.json), and comes back with the result (through result.json)."""
    import json

    fixed, moving = volumes
    segmentation, _ = add_segmentation(scene, moving)
    fixed_segmentation, fixed_label_node = add_segmentation(scene, fixed)
    inputs = slicer_logic.RegistrationLogic(scene).prepareInputs(
        fixed, moving, segmentation, fixedSegmentationNode=fixed_segmentation,
        fixedMaskNode=fixed_label_node, movingMaskNode=segmentation)
    record = tmp_path.parent / f"{tmp_path.name}-record.json"
    worker_env.setenv("EOIR_FAKE_RECORD", str(record))
    options = RegistrationOptions(
        model=str(tmp_path / "some model.pt"), device="cpu", threads=2,
        working_spacing=(1.5, 2.0, 2.5), intensity_window=((-100.0, 900.0), (0.0, 1200.5)),
        initial_alignment="rigid", initial_transform=translation_matrix(1.0, -2.0, 3.5),
        contrast="same", network=True, preset="accurate", refine_iterations=12,
        refine_seconds=3.5, refine_similarity="lncc", inverse=True, foreground_box=False)
    defaults = RegistrationOptions()
    changed = [k for k, v in options.to_dict().items() if v == defaults.to_dict()[k]]
    assert changed == [], f"options left at their defaults: {changed}"
    job = runners.ProcessRegistration(inputs, options, engine="eoir_fake_engine:register",
                                      tempDir=str(tmp_path)).start()
    assert job.wait(timeout=120) and job.error is None, f"{job.error}\n{job.logTail()}"
    seen = json.loads(record.read_text())
    assert seen["type"] == "RegistrationOptions" and seen["option_changes"] == []
    assert seen["labels"] is True
    # the fixed labels and both masks reach the engine, on their volumes' grids
    assert seen["images"] == {"fixed_labels": list(fixed.GetImageData().GetDimensions()),
                              "fixed_mask": list(fixed.GetImageData().GetDimensions()),
                              "moving_mask": list(moving.GetImageData().GetDimensions())}
    assert RegistrationOptions.from_dict(seen["options"]) == options
    assert seen["options"] == options.to_dict()
    assert job.result.options == options
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def zero_model_file(tmp_path_factory):
    """A small EOIR model whose output convolutions are zero: the network moves nothing, so the
    result is exactly the initial alignment."""
    from helpers import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "zero.pt", 0,
                            spacing=(2.0, 2.0, 2.0), description="zero-output test model")


def textured_object(size=32, spacing=2.0, seed=0):
    """An ellipsoid filled with a smooth random texture and a brighter spot (so a rotation
    decorrelates its inside), and the mask of its inside away from the edges."""
    rng = np.random.RandomState(seed)
    k, j, i = np.meshgrid(*[np.arange(size, dtype=np.float64) - (size - 1) / 2.0] * 3,
                          indexing="ij")
    body = (i / 11.0) ** 2 + (j / 8.5) ** 2 + (k / 7.0) ** 2 < 1
    spot = ((i - 5.0) / 3.5) ** 2 + ((j + 3.0) / 2.5) ** 2 + ((k - 1.0) / 3.0) ** 2 < 1
    noise = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(rng.rand(size, size, size).astype(np.float32)), 1.5))
    noise = (noise - noise.mean()) / noise.std()
    image = sitk.GetImageFromArray((body * (400.0 + 120.0 * noise) + 300.0 * spot)
                                   .astype(np.float32))
    image.SetSpacing((spacing,) * 3)
    image.SetOrigin((-(size - 1) * spacing / 2.0,) * 3)
    inside = (i / 9.5) ** 2 + (j / 7.0) ** 2 + (k / 5.5) ** 2 < 1
    return sitk.SmoothingRecursiveGaussian(image, 0.75 * spacing), inside


ROTATION_DEGREES = 20.0


@pytest.fixture(scope="module")
def rotated_pair():
    """(fixed, moving, inside mask, rotation): moving = fixed rotated by 20 degrees about the
    superior axis and shifted a few mm (moving(y) = fixed(R y + t))."""
    import math

    fixed, inside = textured_object()
    rotation = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, math.radians(ROTATION_DEGREES),
                                     (3.0, -2.0, 1.0))
    moving = sitk.Resample(fixed, fixed, rotation, sitk.sitkLinear, 0.0)
    return fixed, moving, inside, rotation


def _hardened_correlation(scene, moving_node, fixed_img, inside) -> float:
    """Slicer hardens the moving volume through its transforms; its correlation with the fixed
    volume inside the object (after resampling the hardened volume onto the fixed grid)."""
    transform_logic = slicer.vtkSlicerTransformLogic()
    transform_logic.SetMRMLScene(scene)
    transform_logic.hardenTransform(moving_node)
    assert moving_node.GetParentTransformNode() is None
    hardened = bridge.volumeNodeToImage(moving_node)
    on_fixed = sitk.GetArrayFromImage(sitk.Resample(hardened, fixed_img, sitk.Transform(),
                                                    sitk.sitkLinear, 0.0))
    return float(np.corrcoef(sitk.GetArrayFromImage(fixed_img)[inside], on_fixed[inside])[0, 1])


def _engine_spy(monkeypatch):
    from EOIRRegistrationLib.engine import pipeline

    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs, pipeline.register(*args, **kwargs)))
        return calls[-1][2]

    monkeypatch.setattr(slicer_logic, "_engineRegister", lambda: spy)
    return calls


def _rotation_degrees(matrix) -> float:
    u, _, vt = np.linalg.svd(np.asarray(matrix)[:3, :3])
    r = u @ vt
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


def test_real_engine_affine_alignment_lands_in_slicer(scene, zero_model_file, rotated_pair,
                                                      monkeypatch):
    fixed_img, moving_img, inside, rotation = rotated_pair
    calls = _engine_spy(monkeypatch)
    correlations = {}
    for method in ("none", "affine"):
        fixed = bridge.imageToVolumeNode(fixed_img, scene, f"fixed {method}")
        moving = bridge.imageToVolumeNode(moving_img, scene, f"moving {method}")
        out = slicer_logic.RegistrationLogic(scene).registerVolumes(
            fixed, moving, model=zero_model_file, device="cpu", initial_alignment=method,
            refine_iterations=0)
        args, kwargs, result = calls[-1]
        options = args[2]  # runEngine passes the options positionally, nothing else
        assert set(kwargs) == {"moving_labels", "progress", "cancel"}
        assert options == RegistrationOptions(model=zero_model_file, device="cpu",
                                              initial_alignment=method, refine_iterations=0)
        assert out.result is result and result.refinement is None  # no refinement ran
        # the grid transform node holds the engine's displacement, alignment included
        np.testing.assert_allclose(
            sitk.GetArrayFromImage(bridge.gridTransformNodeToDisplacement(out.transformNode)),
            sitk.GetArrayFromImage(result.displacement), atol=1e-12)
        np.testing.assert_array_equal(out.result.initial_matrix, result.initial_matrix)
        np.testing.assert_allclose(slicer_outputs.initialMatrixFromAttribute(
            out.transformNode.GetAttribute(slicer_outputs.INITIAL_MATRIX_ATTRIBUTE)),
            result.initial_matrix, atol=1e-9)
        assert moving.GetParentTransformNode() is out.transformNode
        correlations[method] = _hardened_correlation(scene, moving, fixed_img, inside)
        if method == "none":
            np.testing.assert_array_equal(out.result.initial_matrix, np.eye(4))
            assert np.abs(sitk.GetArrayFromImage(result.displacement)).max() == 0.0
        else:
            # the zero model moves nothing: the field is the affine map x -> A x
            assert _rotation_degrees(out.result.initial_matrix) == \
                pytest.approx(ROTATION_DEGREES, abs=3)
            a = out.result.initial_matrix
            field = sitk.DisplacementFieldTransform(sitk.Image(result.displacement))
            x = np.array([4.0, -6.0, 2.0])
            np.testing.assert_allclose(field.TransformPoint(tuple(x)), a[:3, :3] @ x + a[:3, 3],
                                       atol=1e-6)
    assert correlations["affine"] > 0.85, correlations
    assert correlations["none"] < correlations["affine"] - 0.25, correlations


def test_initial_alignment_is_computed_on_top_of_a_linear_parent_transform(
        scene, zero_model_file, rotated_pair, monkeypatch):
    """A moving volume under a linear (pre-alignment) transform: the engine sees it with the
    transform applied, computes the alignment from there, and the transform stays below the
    output transform, so hardening composes both correctly."""
    import math

    fixed_img, moving_img, inside, rotation = rotated_pair
    calls = _engine_spy(monkeypatch)
    # reference: the alignment found without a parent transform
    fixed = bridge.imageToVolumeNode(fixed_img, scene, "fixed")
    plain = bridge.imageToVolumeNode(moving_img, scene, "moving plain")
    reference = slicer_logic.RegistrationLogic(scene).registerVolumes(
        fixed, plain, model=zero_model_file, device="cpu", initial_alignment="rigid",
        showJacobian=False, showFolding=False)

    # a pre-alignment undoing half of the rotation (RAS; a rotation about S is the same in LPS)
    half = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, math.radians(ROTATION_DEGREES / 2),
                                 (0.0, 0.0, 0.0))
    parent_lps = np.eye(4)
    parent_lps[:3, :3] = np.reshape(half.GetMatrix(), (3, 3))
    parent_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ parent_lps @ np.diag([-1.0, -1.0, 1.0, 1.0])
    prealign = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "prealign")
    prealign.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(parent_ras))
    moving = bridge.imageToVolumeNode(moving_img, scene, "moving")
    moving.SetAndObserveTransformNodeID(prealign.GetID())
    out = slicer_logic.RegistrationLogic(scene).registerVolumes(
        fixed, moving, model=zero_model_file, device="cpu", initial_alignment="rigid",
        showJacobian=False, showFolding=False)
    args, kwargs, result = calls[-1]
    # the engine saw the moving volume in world coordinates (the pre-alignment folded in) ...
    np.testing.assert_allclose(np.reshape(args[1].GetDirection(), (3, 3)),
                               parent_lps[:3, :3] @ np.reshape(moving_img.GetDirection(), (3, 3)),
                               atol=1e-9)
    # ... so its matrix is the rest of the way: parent o (matrix without the parent)
    matrix, reference_matrix = out.result.initial_matrix, reference.result.initial_matrix
    np.testing.assert_allclose(matrix[:3, :3], (parent_lps @ reference_matrix)[:3, :3], atol=0.03)
    np.testing.assert_allclose(matrix[:3, 3], (parent_lps @ reference_matrix)[:3, 3], atol=0.5)
    assert _rotation_degrees(matrix) == pytest.approx(ROTATION_DEGREES / 2, abs=3)
    # chain: moving -> prealign -> output transform -> world
    assert moving.GetParentTransformNode() is prealign
    assert prealign.GetParentTransformNode() is out.transformNode
    assert _hardened_correlation(scene, moving, fixed_img, inside) > 0.85


def test_real_engine_alignment_and_refinement_in_the_worker_process(scene, zero_model_file,
                                                                     rotated_pair, tmp_path):
    from EOIRRegistrationLib.engine.alignment import initial_alignment

    fixed_img, moving_img, inside, rotation = rotated_pair
    fixed = bridge.imageToVolumeNode(fixed_img, scene, "fixed")
    moving = bridge.imageToVolumeNode(moving_img, scene, "moving")
    logic = slicer_logic.RegistrationLogic(scene)
    inputs = logic.prepareInputs(fixed, moving)
    options = RegistrationOptions(model=zero_model_file, device="cpu", initial_alignment="com",
                                  refine_iterations=3, refine_seconds=60.0)
    job = runners.ProcessRegistration(inputs, options, tempDir=str(tmp_path)).start()
    assert job.wait(timeout=180), "worker did not finish"
    assert job.error is None, f"{job.error}\n{job.logTail()}"
    expected, used = initial_alignment(fixed_img, moving_img, "com")
    assert used == "com"
    np.testing.assert_allclose(job.result.initial_matrix, expected, atol=1e-6)
    assert "refining" in job.result.timings
    assert job.result.options == options and job.result.initial_alignment == "com"
    out = logic.createOutputs(inputs, job.result)
    np.testing.assert_allclose(slicer_outputs.initialMatrixFromAttribute(
        out.transformNode.GetAttribute(slicer_outputs.INITIAL_MATRIX_ATTRIBUTE)), expected,
        atol=1e-9)
    assert moving.GetParentTransformNode() is out.transformNode
    # the worker reports which contrast path ran; the outputs and their summary carry it
    assert out.result.method.startswith("same contrast (intensity correlation ")
    coarse = "/".join(str(n) for n in optimise.PRESETS["default"].iterations[:-1])
    assert out.result.method.endswith(f"LNCC optimisation alone at 4/2/1 mm, {coarse}/3 steps "
                                      "(default)")  # refine_iterations: 3 at the finest scale
    assert out.summary().startswith(out.result.method + "; folding")
    assert list(tmp_path.iterdir()) == []
