"""One PNG that shows a registration at a glance, the way Slicer's slice views show the volumes:
rows axial, coronal and sagittal through the centre of the fixed image, each resampled on an
isotropic display grid aligned with the patient axes (radiological convention: the patient's left
on the image right; axial anterior up; coronal and sagittal superior up, sagittal anterior on the
left). Columns: fixed / moving (before) / warped (after) / |fixed - warped| / Jacobian
determinant on a log2 scale (colour bar symmetric around 0 = volume kept; yellow: folding) with
the fixed grid drawn where the displacement sends it. Orientation letters on every panel and a
millimetre scale bar on the first of each row."""
from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

# Screen right and screen up of each view as LPS unit vectors: the columns 0 and 1 of the
# SliceToRAS matrices of Slicer's Axial / Coronal / Sagittal presets (vtkMRMLSliceNode), with x
# and y negated (RAS -> LPS).
VIEWS = {
    "axial": ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
}
COLUMNS = ("fixed", "moving (before)", "warped moving (after)", "|fixed - warped|",
           "det J (log2 scale) and deformed grid")
SCALE_BAR_MM = (1, 2, 5, 10, 20, 50, 100, 200, 500)


def patient_letter(direction) -> str:
    """The patient direction an LPS vector points to: L/R (x), P/A (y), S/I (z)."""
    axis = int(np.argmax(np.abs(direction)))
    return ("LR", "PA", "SI")[axis][0 if direction[axis] > 0 else 1]


def view_grid(fixed: sitk.Image, view: str) -> sitk.Image:
    """An empty one-slice image through the centre of ``fixed``: array row 0 at the top of the
    screen, column 0 at its left, square pixels of the fixed image's finest spacing (mm), wide
    enough for the fixed image's extent."""
    right, up = (np.asarray(v) for v in VIEWS[view])
    spacing = min(fixed.GetSpacing())
    size = np.asarray(fixed.GetSize())
    centre = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    corners = np.array([fixed.TransformIndexToPhysicalPoint([int(c) for c in corner])
                        for corner in np.stack(np.meshgrid(*[[0, n - 1] for n in size]),
                                               -1).reshape(-1, 3)]) - centre
    lo_r, hi_r = (corners @ right).min(), (corners @ right).max()
    lo_u, hi_u = (corners @ up).min(), (corners @ up).max()
    width = int(math.floor((hi_r - lo_r) / spacing)) + 1
    height = int(math.floor((hi_u - lo_u) / spacing)) + 1
    grid = sitk.Image([width, height, 1], sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetOrigin((centre + lo_r * right + hi_u * up).tolist())
    grid.SetDirection(np.column_stack([right, -up, np.cross(right, -up)]).ravel().tolist())
    return grid


def view_slice(image: sitk.Image, grid: sitk.Image, nearest: bool = False) -> np.ndarray:
    """``image`` sampled on a view grid: (rows, columns) or (rows, columns, components); 0
    outside the image. A copy: the resampled image is a temporary freed on return."""
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    pixel = (sitk.sitkVectorFloat64 if image.GetNumberOfComponentsPerPixel() > 1
             else sitk.sitkFloat32)
    resampled = sitk.Resample(image, grid, sitk.Transform(), interpolator, 0.0, pixel)
    return sitk.GetArrayFromImage(resampled)[0].copy()


def _views(fixed, moving, warped, jacobian, displacement) -> dict:
    inside = sitk.Image(fixed.GetSize(), sitk.sitkUInt8) + 1
    inside.CopyInformation(fixed)
    out = {}
    for view in VIEWS:
        grid = view_grid(fixed, view)
        out[view] = {"grid": grid, "fixed": view_slice(fixed, grid),
                     "moving": view_slice(moving, grid), "warped": view_slice(warped, grid),
                     "jacobian": view_slice(jacobian, grid),
                     "displacement": view_slice(displacement, grid),
                     "inside": view_slice(inside, grid, nearest=True) > 0}
    return out


def overview_figure(fixed: sitk.Image, moving: sitk.Image, warped: sitk.Image,
                    jacobian: sitk.Image, displacement: sitk.Image, title: str = ""):
    """The overview as a matplotlib figure (``write_overview`` saves it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    views = _views(fixed, moving, warped, jacobian, displacement)
    fix_all = np.concatenate([v["fixed"][v["inside"]] for v in views.values()])
    mov_all = np.concatenate([v["moving"][v["moving"] != 0] for v in views.values()] + [[0.0]])
    lo, hi = np.percentile(fix_all, [0.5, 99.5])
    lo_m, hi_m = np.percentile(mov_all, [0.5, 99.5])
    scale = (hi - lo) / max(hi_m - lo_m, 1e-12)
    for v in views.values():
        v["moving"] = (v["moving"] - lo_m) * scale + lo
        v["warped"] = (v["warped"] - lo_m) * scale + lo
        v["before"] = np.abs(v["fixed"] - v["moving"])
        v["after"] = np.abs(v["fixed"] - v["warped"])
        v["log2det"] = np.log2(np.maximum(v["jacobian"], 1e-3))
    inside_all = lambda key: np.concatenate([v[key][v["inside"]] for v in views.values()])  # noqa: E731
    diff_max = float(np.percentile(inside_all("before"), 99)) or 1.0
    half = max(float(np.percentile(np.abs(inside_all("log2det")), 99.5)), 0.05)
    jac_norm = Normalize(vmin=-half, vmax=half)  # symmetric: 0 (det 1) in the middle

    fig, axes = plt.subplots(len(VIEWS), len(COLUMNS), figsize=(17, 10.5), layout="constrained")
    shown = dict(cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    for row, (view, v) in enumerate(views.items()):
        ax = axes[row]
        ax[0].imshow(v["fixed"], **shown)
        ax[1].imshow(v["moving"], **shown)
        ax[2].imshow(v["warped"], **shown)
        diff = ax[3].imshow(np.where(v["inside"], v["after"], np.nan), cmap="magma", vmin=0,
                            vmax=diff_max, interpolation="nearest")
        ax[4].imshow(v["fixed"], **shown)
        jac = ax[4].imshow(np.where(v["inside"], v["log2det"], np.nan), cmap="RdBu_r",
                           norm=jac_norm, alpha=0.8, interpolation="nearest")
        if (v["inside"] & (v["jacobian"] <= 0)).any():
            ax[4].contour(v["inside"] & (v["jacobian"] <= 0), levels=[0.5], colors="yellow",
                          linewidths=0.8)
        _deformed_grid(ax[4], v, view)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
            _orientation_letters(a, view)
        ax[0].set_ylabel(f"{view}\nmean |fixed - warped| {v['after'][v['inside']].mean():.3g} "
                         f"(before {v['before'][v['inside']].mean():.3g})", fontsize=9)
        _scale_bar(ax[0], v["grid"].GetSpacing()[0], v["fixed"].shape)
    for a, name in zip(axes[0], COLUMNS):
        a.set_title(name, fontsize=10)
    fig.colorbar(diff, ax=list(axes[:, 3]), fraction=0.05, shrink=0.6, label="|fixed - warped|")
    bar = fig.colorbar(jac, ax=list(axes[:, 4]), fraction=0.05, shrink=0.6,
                       label="det J, log2 scale (1 = volume kept)")
    ticks = np.linspace(-half, half, 5)
    bar.set_ticks(ticks)
    bar.set_ticklabels([f"{2.0 ** t:.3g}" for t in ticks])
    fig.suptitle(f"{title}\nslices through the fixed image's centre, as Slicer shows them "
                 f"(radiological: the patient's left on the image right)", fontsize=11)
    return fig


def write_overview(path, fixed: sitk.Image, moving: sitk.Image, warped: sitk.Image,
                   jacobian: sitk.Image, displacement: sitk.Image, title: str = "") -> None:
    import matplotlib.pyplot as plt
    fig = overview_figure(fixed, moving, warped, jacobian, displacement, title)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _orientation_letters(ax, view: str) -> None:
    right, up = (np.asarray(v) for v in VIEWS[view])
    style = dict(transform=ax.transAxes, color="orange", fontsize=9, fontweight="bold")
    ax.text(0.02, 0.5, patient_letter(-right), ha="left", va="center", **style)
    ax.text(0.98, 0.5, patient_letter(right), ha="right", va="center", **style)
    ax.text(0.5, 0.98, patient_letter(up), ha="center", va="top", **style)
    ax.text(0.5, 0.02, patient_letter(-up), ha="center", va="bottom", **style)


def _scale_bar(ax, spacing_mm: float, shape) -> None:
    """A bar of a round length, at most a quarter of the panel, in its bottom-right corner."""
    rows, cols = shape
    length = max([mm for mm in SCALE_BAR_MM if mm <= cols * spacing_mm / 4] or [SCALE_BAR_MM[0]])
    pixels = length / spacing_mm
    x1, y = cols - 1 - 0.05 * cols, rows - 1 - 0.08 * rows
    ax.plot([x1 - pixels, x1], [y, y], color="white", linewidth=2.5, solid_capstyle="butt")
    ax.text(x1 - pixels / 2, y - 0.03 * rows, f"{length} mm", color="white", fontsize=8,
            ha="center", va="bottom")


def _deformed_grid(ax, v: dict, view: str, lines: int = 14) -> None:
    """Lines of the display grid drawn where the displacement sends them (its in-plane part,
    fixed point -> moving point), in display pixels."""
    right, up = (np.asarray(r) for r in VIEWS[view])
    spacing = v["grid"].GetSpacing()[0]
    d = v["displacement"]  # (rows, cols, 3) LPS mm
    rows, cols = np.mgrid[0:d.shape[0], 0:d.shape[1]].astype(np.float64)
    x = np.where(v["inside"], cols + d @ right / spacing, np.nan)
    y = np.where(v["inside"], rows - d @ up / spacing, np.nan)
    step = max(2, max(d.shape[:2]) // lines)
    for r in range(0, d.shape[0], step):
        ax.plot(x[r], y[r], color="black", linewidth=0.5, alpha=0.7)
    for c in range(0, d.shape[1], step):
        ax.plot(x[:, c], y[:, c], color="black", linewidth=0.5, alpha=0.7)
    ax.set_xlim(-0.5, d.shape[1] - 0.5)
    ax.set_ylim(d.shape[0] - 0.5, -0.5)
