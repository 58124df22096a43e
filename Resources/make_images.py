"""Draws the extension's images: the icon and a rendering of the module panel.

    python Resources/make_images.py            # icon (matplotlib) and panel rendering (PySide6)
    python Resources/make_images.py --icon     # icon only

The icon (128x128) shows a grid deformed by a smooth displacement over its Jacobian determinant in
the panel's blue-white-red colours. The panel rendering loads the module's real .ui file with Qt's
own loader (PySide6, offscreen; ``pip install PySide6-Essentials``), with small stand-ins for the
Slicer widgets (collapsible sections, node selectors) filled with example node names, because the
Slicer application itself cannot run here. The Results section shows figures only when given a
JSON file of a real run (``--results qa.json`` with the keys the logic returns).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ICON_PATHS = [ROOT / "Resources" / "EOIRRegistration.png",
              ROOT / "EOIRRegistration" / "Resources" / "Icons" / "EOIRRegistration.png"]
SCREENSHOT_PATH = ROOT / "Resources" / "Screenshot-panel.png"
UI_PATH = ROOT / "EOIRRegistration" / "Resources" / "UI" / "EOIRRegistration.ui"


def draw_icon(paths=ICON_PATHS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    n = 256
    y, x = np.mgrid[0:1:n * 1j, 0:1:n * 1j]

    def displacement(x, y):
        bump = np.exp(-((x - 0.55) ** 2 + (y - 0.45) ** 2) / 0.06)
        return 0.16 * bump * (y - 0.45) * 3.0, -0.16 * bump * (x - 0.55) * 3.0 + 0.06 * bump

    dx, dy = displacement(x, y)
    step = 1.0 / (n - 1)
    det = (1 + np.gradient(dx, step, axis=1)) * (1 + np.gradient(dy, step, axis=0)) - \
        np.gradient(dx, step, axis=0) * np.gradient(dy, step, axis=1)
    cmap = LinearSegmentedColormap.from_list(
        "rdbu", ["#053061", "#92c5de", "#f7f7f7", "#f4a582", "#67001f"])

    fig = plt.figure(figsize=(1.28, 1.28), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_axis_off()
    ax.add_patch(plt.Rectangle((0, 0), 1, 1, color="#1d2733", zorder=0))
    ax.imshow(det, cmap=cmap, vmin=0.6, vmax=1.4, extent=(0.08, 0.92, 0.08, 0.92),
              origin="lower", zorder=1, alpha=0.95)
    t = np.linspace(0, 1, 200)
    for v in np.linspace(0, 1, 9):
        for xs, ys in ((np.full_like(t, v), t), (t, np.full_like(t, v))):
            ddx, ddy = displacement(xs, ys)
            ax.plot(0.08 + 0.84 * (xs + ddx), 0.08 + 0.84 * (ys + ddy), color="#111111", lw=0.9,
                    zorder=2, solid_capstyle="round")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    plt.close(fig)


def render_panel(path=SCREENSHOT_PATH, results: dict | None = None) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6 import QtCore, QtUiTools, QtWidgets

    sys.path.insert(0, str(ROOT / "EOIRRegistration"))

    class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801 - Slicer class name
        pass

    class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
        pass

    class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801
        mrmlSceneChanged = QtCore.Signal(object)

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    app.setStyle("Fusion")
    font = app.font()
    font.setPointSize(9)
    app.setFont(font)
    loader = QtUiTools.QUiLoader()
    for cls in (ctkCollapsibleButton, qMRMLNodeComboBox, qMRMLWidget):
        loader.registerCustomWidget(cls)
    ui_file = QtCore.QFile(str(UI_PATH))
    ui_file.open(QtCore.QFile.ReadOnly)
    panel = loader.load(ui_file)
    ui_file.close()

    def child(name):
        return panel.findChild(QtCore.QObject, name)

    for box in panel.findChildren(ctkCollapsibleButton):
        box.setTitle("\u25bc " + (box.property("text") or ""))
        if box.property("collapsed"):
            box.setTitle("\u25b6 " + (box.property("text") or ""))
            for w in box.findChildren(QtWidgets.QWidget):
                w.hide()
            box.setMaximumHeight(24)
    examples = {
        "fixedVolumeSelector": "MRBrainTumor1",
        "movingVolumeSelector": "MRBrainTumor2",
        "movingSegmentationSelector": "None (nothing to propagate)",
        "outputTransformSelector": "Create new transform",
        "outputVolumeSelector": "None (show the moving volume through the transform)",
    }
    for name, value in examples.items():
        child(name).addItem(value)

    from EOIRRegistrationLib.slicer.catalog import listBundledModels  # no torch needed

    models = listBundledModels()
    model_combo = child("modelComboBox")
    for m in models or []:
        model_combo.addItem(m.name)
    if not models:
        model_combo.addItem("default")
    model_combo.addItem("Load model file...")
    child("modelDescriptionLabel").setText(
        models[0].description if models and models[0].description else
        "One-line description from the model card")
    device = child("deviceComboBox")
    device.addItems(["Auto (GPU if available)", "CPU", "GPU (CUDA)"])
    device.model().item(2).setEnabled(False)
    child("applyButton").setEnabled(True)
    child("progressBar").hide()
    if results:
        child("foldingValueLabel").setText(f"{results['folding_percent']:.4f} % of voxels")
        child("sdlogjValueLabel").setText(f"{results['sdlogj']:.4f}")
        child("jacobianRangeValueLabel").setText(
            f"{results['jacobian_min']:.3f} / {results['jacobian_max']:.3f}")
        child("runValueLabel").setText(results.get("run", ""))
        child("statusLabel").setText(results.get("status", "Done."))
    else:
        child("resultsCollapsibleButton").hide()
        child("statusLabel").setText("")

    panel.resize(440, panel.sizeHint().height())
    frame = QtWidgets.QWidget()
    frame.setWindowTitle("EOIR Registration")
    layout = QtWidgets.QVBoxLayout(frame)
    title = QtWidgets.QLabel("<b>EOIR Registration</b> &nbsp; <span style='color:#666'>"
                             "Registration</span>")
    layout.addWidget(title)
    layout.addWidget(panel)
    frame.resize(460, frame.sizeHint().height())
    frame.show()
    app.processEvents()
    image = frame.grab().toImage()
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(str(path))
    frame.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--icon", action="store_true", help="draw the icon only")
    parser.add_argument("--results", help="JSON file with QA figures of a real run to show")
    args = parser.parse_args(argv)
    draw_icon()
    if not args.icon:
        results = json.loads(Path(args.results).read_text()) if args.results else None
        render_panel(results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
