"""Checks of the input images themselves, made by ``pipeline.register`` before the work they
would spoil, so that the command line, the Python API and Slicer all get them.

Each refuses, with the reason, an input that would give a wrong answer without any error: NaN
or infinite voxels, a constant image, a sheared grid (NIfTI outputs on it would lie elsewhere),
label maps with fractional values (rounding merges 1.5 and 2.5 into 2), images that do not
overlap in physical space (the warped image would be all zeros and the deformation computed from
a blank image), labels or masks outside the images they belong to. A partial overlap is allowed
but returned as a warning, which the result carries (``RegistrationResult.warnings``) and the
front ends show.

Geometry: points in LPS mm; ``a`` is the initial 4x4 matrix, fixed point -> moving point.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from EOIRRegistrationLib.core.errors import InputError
from EOIRRegistrationLib.core.geometry import Grid

#: below this fraction of the fixed field of view inside the moving image (or of the labelled
#: voxels inside an image's field of view), the result carries a warning
PARTIAL_OVERLAP = 0.5
_SAMPLES_PER_AXIS = 32     # the overlap is measured on a lattice of at most 32^3 points
_MAX_LABEL_SAMPLES = 100_000
#: largest entry of |D^T D - I| taken as orthonormal (direction cosines stored with 6-7 digits)
DIRECTION_TOLERANCE = 1e-3


def check_image(image, role: str, labels: bool = False) -> sitk.Image:
    """Refuse inputs the engine cannot register, with the reason."""
    if not isinstance(image, sitk.Image):
        raise InputError(f"{role} must be a SimpleITK image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise InputError(f"{role} is {image.GetDimension()}D with size {image.GetSize()}; "
                         "EOIRRegistration registers 3D volumes (extract one 3D volume first)")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{role} has {image.GetNumberOfComponentsPerPixel()} components per "
                         "voxel; a scalar volume is required")
    if min(image.GetSize()) < 2:
        raise InputError(f"{role} has size {image.GetSize()}; every axis needs at least 2 voxels")
    if min(image.GetSpacing()) <= 0:
        raise InputError(f"{role} has non-positive spacing {image.GetSpacing()}")
    direction = np.reshape(image.GetDirection(), (3, 3))
    off = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if off > DIRECTION_TOLERANCE:
        # A sheared grid (det 1 all the same) or scaled axes: the NIfTI writer makes the outputs'
        # direction a rotation, so they would lie on another grid than the fixed image.
        raise InputError(f"{role} has a direction matrix whose axes are not orthonormal (D^T D "
                         f"differs from the identity by {off:.3g}: a sheared or scaled grid), which "
                         "NIfTI outputs cannot hold (their direction is a rotation); resample it "
                         "onto an orthonormal grid first")
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{role} contains NaN or infinite values "
                         f"({int(np.count_nonzero(~np.isfinite(arr)))} voxels)")
    if labels:
        _check_whole_numbers(arr, role)
    elif float(arr.min()) == float(arr.max()):
        raise InputError(f"{role} is constant (every voxel is {float(arr.min())}): "
                         "nothing to register")
    return image


def _check_whole_numbers(arr: np.ndarray, role: str) -> None:
    if arr.dtype.kind != "f":
        return
    fractional = arr[arr != np.round(arr)]
    if fractional.size:
        examples = ", ".join(f"{v:g}" for v in np.unique(fractional)[:3])
        raise InputError(f"{role} has non-integer values ({examples}, ...): a label map holds "
                         "whole numbers, and warping rounds, which would merge labels")


def _lattice(grid: Grid) -> np.ndarray:
    """LPS points (N, 3) of a lattice of at most ``_SAMPLES_PER_AXIS`` points per axis spanning
    ``grid``'s voxel centres."""
    axes = [np.linspace(0, n - 1, min(n, _SAMPLES_PER_AXIS)) for n in grid.size]
    index = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # (i, j, k)
    m = grid.index_to_physical()
    return index @ m[:3, :3].T + m[:3, 3]


def inside_fraction(points: np.ndarray, grid: Grid) -> float:
    """Fraction of LPS ``points`` (N, 3) inside ``grid`` by ITK's buffer test (continuous index
    in [-0.5, size - 0.5) on every axis: where a resampler reads a value rather than 0)."""
    if not len(points):
        return 0.0
    m = np.linalg.inv(grid.index_to_physical())
    index = points @ m[:3, :3].T + m[:3, 3]
    inside = np.all((index >= -0.5) & (index < np.asarray(grid.size) - 0.5), axis=1)
    return float(inside.mean())


def _moved(points: np.ndarray, a: np.ndarray) -> np.ndarray:
    return points @ a[:3, :3].T + a[:3, 3]


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.0f} %" if fraction >= 0.01 else f"{100 * fraction:.2g} %"


def check_overlap(fixed: sitk.Image, moving: sitk.Image, a: np.ndarray, how: str) -> list[str]:
    """Refuse images that do not overlap through ``a`` (``how``: the alignment, for the
    message); a warning when less than ``PARTIAL_OVERLAP`` of the fixed field of view does."""
    fixed_grid, moving_grid = Grid.from_image(fixed), Grid.from_image(moving)
    covered = inside_fraction(_moved(_lattice(fixed_grid), a), moving_grid)
    if covered == 0:
        gap = np.linalg.norm(_moved(fixed_grid.center()[None], a)[0] - moving_grid.center())
        raise InputError(
            f"the fixed and moving images do not overlap {how}: no point of the fixed image's "
            f"field of view lies inside the moving image (centres {gap:.0f} mm apart); check "
            "their origins and directions, or start from an alignment (--init com or affine)")
    if covered < PARTIAL_OVERLAP:
        return [f"only {_percent(covered)} of the fixed image's field of view lies inside the "
                f"moving image {how}: elsewhere the warped image is 0 and the deformation has "
                "no image to follow"]
    return []


def _labelled_points(labels: sitk.Image) -> np.ndarray:
    """LPS points (N, 3) of the labelled (nonzero) voxels, at most ``_MAX_LABEL_SAMPLES`` of
    them (evenly strided)."""
    arr = sitk.GetArrayViewFromImage(labels)
    flat = np.flatnonzero(arr)  # one index per labelled voxel: a third of argwhere's memory
    kji = np.stack(np.unravel_index(flat[::max(1, len(flat) // _MAX_LABEL_SAMPLES)], arr.shape), -1)
    m = Grid.from_image(labels).index_to_physical()
    return kji[:, ::-1] @ m[:3, :3].T + m[:3, 3]


def check_labels_on(labels: sitk.Image, image: sitk.Image, role: str, image_role: str,
                    a: np.ndarray | None = None, how: str = "") -> list[str]:
    """Refuse a label map none of whose labelled voxels lies inside ``image``'s field of view,
    seen through the inverse of ``a`` (moving labels on the fixed grid) when given; a warning
    when less than ``PARTIAL_OVERLAP`` of them do, or when there is no label at all."""
    points = _labelled_points(labels)
    if not len(points):
        return [f"the {role} has no labelled (nonzero) voxel"]
    if a is not None:
        points = _moved(points, np.linalg.inv(a))
    covered = inside_fraction(points, Grid.from_image(image))
    where = f"the {image_role}'s field of view{f' {how}' if how else ''}"
    if covered == 0:
        raise InputError(f"no labelled voxel of the {role} lies inside {where}: check that the "
                         f"{role} belongs to that image (same origin, spacing and direction)")
    if covered < PARTIAL_OVERLAP:
        return [f"only {_percent(covered)} of the {role}'s labelled voxels lie inside {where}"]
    return []
