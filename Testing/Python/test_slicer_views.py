"""The overview's views are Slicer's own slice-view presets (slicer-core: Slicer's MRML core)."""
from __future__ import annotations

import numpy as np
import slicer

from EOIRRegistrationLib.cli import overview


def test_views_are_slicers_slice_presets():
    """Screen right and up of each view equal vtkMRMLSliceNode's Axial / Coronal / Sagittal
    SliceToRAS columns 0 and 1, turned into LPS."""
    scene = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    for view, (right, up) in overview.VIEWS.items():
        node.SetOrientation(view.capitalize())
        m = node.GetSliceToRAS()
        np.testing.assert_allclose(ras_to_lps @ [m.GetElement(r, 0) for r in range(3)], right)
        np.testing.assert_allclose(ras_to_lps @ [m.GetElement(r, 1) for r in range(3)], up)
