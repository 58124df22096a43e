"""The module self-test's engine checks (``EOIRRegistrationTest`` inside Slicer, and the
slicer-core tests): a tiny known registration problem registered by the real engine, and a cancel
before the engine starts. The checks that need no torch are in ``selftest_scene.py``. numpy and
SimpleITK only at import; torch only when the engine runs.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

#: why the engine check is skipped in a Slicer without torch
NO_TORCH = ("PyTorch is not installed, so the registration itself was not tested: install the "
            "PyTorch extension from the Extensions Manager, then PyTorch (the PyTorch Utils module, "
            "or the first Apply offers it), and run the test again. The scene, transform, overlay "
            "and cancel checks need no PyTorch and ran.")


def torchMissing() -> str | None:
    """:data:`NO_TORCH` when there is no torch to import; None when it imports. Any other failure
    (torch installed but broken, the engine not importing) is raised, never turned into a skip."""
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        return NO_TORCH
    return None


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


def addSyntheticPair(scene):
    """The synthetic pair as volumes in ``scene``: (fixed node, moving node, moving label map
    node, fixed labels image)."""
    from EOIRRegistrationLib.slicer import bridge

    fixed, moving, fixedLabels, movingLabels = syntheticTestPair()
    fixedNode = bridge.imageToVolumeNode(fixed, scene, "fixed")
    movingNode = bridge.imageToVolumeNode(moving, scene, "moving")
    labelNode = bridge.imageToVolumeNode(sitk.Cast(movingLabels, sitk.sitkUInt8), scene,
                                         "moving labels", className="vtkMRMLLabelMapVolumeNode")
    return fixedNode, movingNode, labelNode, fixedLabels


def checkRegistration(scene, registerVolumes) -> str:
    """Registers the synthetic pair with ``registerVolumes`` (a logic's method) and checks the
    outcome: labels overlap better, intensities differ less, little folding, the moving volume
    under the new transform. Raises AssertionError; returns a one-line summary."""
    from EOIRRegistrationLib.core.qa import mean_dice
    from EOIRRegistrationLib.slicer import bridge

    fixedNode, movingNode, labelNode, fixedLabels = addSyntheticPair(scene)
    warpedNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    array = lambda node: sitk.GetArrayFromImage(bridge.volumeNodeToImage(node))  # noqa: E731
    # read before registering: afterwards the moving volume is under the (non-linear) result
    movingArray, movingLabelArray = array(movingNode), array(labelNode)
    out = registerVolumes(fixedNode, movingNode, device="cpu", outputVolumeNode=warpedNode,
                          movingSegmentationNode=labelNode)
    fixedLabelArray = sitk.GetArrayFromImage(fixedLabels)
    before = mean_dice(fixedLabelArray, movingLabelArray)
    after = mean_dice(fixedLabelArray, array(out.warpedSegmentationNode))
    assert after > before + 0.05, f"label overlap did not improve: Dice {before:.3f} -> {after:.3f}"
    fixedArray = array(fixedNode)
    mseBefore = np.mean((movingArray - fixedArray) ** 2)
    mseAfter = np.mean((array(warpedNode) - fixedArray) ** 2)
    assert mseAfter < mseBefore, f"intensity difference grew: {mseBefore:.1f} -> {mseAfter:.1f}"
    assert out.foldingPercent < 1.0, f"{out.foldingPercent:.2f} % of voxels fold"
    assert movingNode.GetParentTransformNode() is out.transformNode
    assert out.transformNode.GetNodeReference("spatialRegistrationFixed") is fixedNode
    return f"Dice {before:.3f} -> {after:.3f}; {out.summary()}"


def checkCancelLeavesSceneAsItWas(scene, registerVolumes) -> None:
    """A registration cancelled at its first progress report adds and changes nothing."""
    import threading

    from EOIRRegistrationLib.core.errors import RegistrationCancelled

    fixedNode, movingNode, labelNode, _ = addSyntheticPair(scene)
    nodesBefore = scene.GetNumberOfNodes()
    cancel = threading.Event()
    try:
        registerVolumes(fixedNode, movingNode, device="cpu", movingSegmentationNode=labelNode,
                        progressCallback=lambda stage, fraction: cancel.set(),
                        cancelEvent=cancel)
    except RegistrationCancelled:
        pass
    else:
        raise AssertionError("a cancelled registration did not raise RegistrationCancelled")
    assert scene.GetNumberOfNodes() == nodesBefore, "a cancelled registration left nodes"
    assert movingNode.GetParentTransformNode() is None, "a cancelled registration moved a volume"
