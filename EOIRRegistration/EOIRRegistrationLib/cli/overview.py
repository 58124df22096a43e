"""One PNG that shows a registration at a glance: fixed / moving / warped / difference /
Jacobian determinant (colour bar, diverging around 1) / deformed grid, on the middle slice of the
fixed grid (array axis 0, i.e. the slowest ITK index k)."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from EOIRRegistrationLib.core.geometry import Grid


def _slice(image: sitk.Image, k: int) -> np.ndarray:
    # A copy: a view would point into the buffer of ``image``, which may be a temporary (the
    # moving image resampled for display) freed as soon as this returns.
    return sitk.GetArrayViewFromImage(image)[k].copy()


def _moving_on_fixed_grid(moving: sitk.Image, fixed: sitk.Image) -> sitk.Image:
    return sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def write_overview(path, fixed: sitk.Image, moving: sitk.Image, warped: sitk.Image,
                   jacobian: sitk.Image, displacement: sitk.Image, title: str = "",
                   grid_step: int = 4) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    k = fixed.GetSize()[2] // 2
    fix = _slice(fixed, k).astype(np.float32)
    mov = _slice(_moving_on_fixed_grid(moving, fixed), k)
    war = _slice(warped, k)
    lo, hi = np.percentile(fix, [0.5, 99.5])
    lo_m, hi_m = np.percentile(mov, [0.5, 99.5])
    scale = (hi - lo) / max(hi_m - lo_m, 1e-12)
    jac = _slice(jacobian, k)
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.6))
    shown = dict(cmap="gray", vmin=lo, vmax=hi, origin="lower")
    axes[0, 0].imshow(fix, **shown)
    axes[0, 0].set_title("fixed")
    axes[0, 1].imshow((mov - lo_m) * scale + lo, **shown)
    axes[0, 1].set_title("moving (on the fixed grid, before)")
    axes[0, 2].imshow((war - lo_m) * scale + lo, **shown)
    axes[0, 2].set_title("warped moving (after)")
    before = np.abs(fix - ((mov - lo_m) * scale + lo))
    after = np.abs(fix - ((war - lo_m) * scale + lo))
    vmax = float(np.percentile(before, 99)) or 1.0
    im = axes[1, 0].imshow(after, cmap="magma", vmin=0, vmax=vmax, origin="lower")
    axes[1, 0].set_title(f"|fixed - warped| (mean {after.mean():.3g}; before {before.mean():.3g})")
    fig.colorbar(im, ax=axes[1, 0], fraction=0.046)
    jmin, jmax = float(np.min(jac)), float(np.max(jac))
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(jmin, 0.999), vmax=max(jmax, 1.001))
    im = axes[1, 1].imshow(jac, cmap="RdBu_r", norm=norm, origin="lower")
    if (jac <= 0).any():
        axes[1, 1].contour(jac <= 0, levels=[0.5], colors="yellow", linewidths=0.8)
    axes[1, 1].set_title("Jacobian determinant (yellow: folding)")
    fig.colorbar(im, ax=axes[1, 1], fraction=0.046)
    axes[1, 2].imshow(fix, cmap="gray", vmin=lo, vmax=hi, origin="lower", alpha=0.35)
    _deformed_grid(axes[1, 2], fixed, displacement, k, grid_step)
    axes[1, 2].set_title("deformed grid (fixed voxel -> moving position)")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}  (slice k = {k} of {fixed.GetSize()[2]})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _deformed_grid(ax, fixed: sitk.Image, displacement: sitk.Image, k: int, step: int) -> None:
    """Grid lines of the fixed slice drawn where the displacement sends them, in fixed voxels."""
    grid = Grid.from_image(fixed)
    d = sitk.GetArrayViewFromImage(displacement)[k]  # (j, i, 3) LPS mm
    to_index = np.linalg.inv(grid.direction_matrix @ np.diag(grid.spacing))
    u = d @ to_index.T  # (j, i, 3) displacement in fixed index units (i, j, k)
    jj, ii = np.mgrid[0:d.shape[0], 0:d.shape[1]]
    x, y = ii + u[..., 0], jj + u[..., 1]
    for r in range(0, d.shape[0], step):
        ax.plot(x[r], y[r], color="tab:blue", linewidth=0.6)
    for c in range(0, d.shape[1], step):
        ax.plot(x[:, c], y[:, c], color="tab:blue", linewidth=0.6)
    ax.set_xlim(0, d.shape[1] - 1)
    ax.set_ylim(0, d.shape[0] - 1)
    ax.set_aspect(grid.spacing[1] / grid.spacing[0])
