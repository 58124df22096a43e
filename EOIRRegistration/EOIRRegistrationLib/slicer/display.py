"""The QA overlays in a Slicer scene: the Jacobian determinant in a diverging colour table
centred on 1, folding as a red label map, and the slice views showing them. Scene-explicit and
Qt-free, as ``bridge.py``."""
from __future__ import annotations

import numpy as np
import slicer
from vtk.util import numpy_support

JACOBIAN_COLOR_NODE_NAME = "EOIR Jacobian (blue-white-red)"
FOLDING_COLOR_NODE_NAME = "EOIR folding (red)"
_COLOR_ATTRIBUTE = "EOIRRegistration.ColorTable"


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
