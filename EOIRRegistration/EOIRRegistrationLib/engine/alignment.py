"""Initial (linear) alignment before the deformable step, as a 4x4 LPS matrix ``A`` that maps a
fixed-space point to a moving-space point (the resampling direction, like every output).

Methods: "none" (identity), "com" (translation between the intensity centres of mass), "rigid"
and "affine" (Mattes mutual information, optimised on copies resampled to a coarse isotropic grid
so it takes seconds on a CPU, started from the centres of mass), "auto" (the default, below), or
a user-given linear transform (SimpleITK transform in the ITK convention, i.e. mapping fixed
points to moving points, or a 4x4 matrix). The final displacement field contains ``A``:
``x -> A (x + d_net(x))``.

"auto" tries the affine, then the rigid result it was started from, then the identity, and takes
the first that passes: the affine must be plausible (principal scales within ``SCALE_BOUNDS``,
shear within ``MAX_SHEAR``, no reflection) and match no worse than the rigid one (mutual
information, and the Dice of the two images' foregrounds within ``OVERLAP_TOLERANCE``); the rigid
one must beat the identity the same way. On smooth phantoms shifted by a few millimetres the
affine optimiser shrank the images by up to a quarter (label Dice 0.73 -> 0.59 where the rigid
result reached 0.92): a better mutual information alone did not catch it. A result that moves no
point of the fixed field of view by more than ``ALIGNED_TOLERANCE_MM`` is not applied (the
inputs were already aligned). What it chose and why is the ``Alignment``'s ``note``.

Intensities farther outside their robust window than its width (``core.intensity``) are clamped
first: one voxel of 1e30 otherwise sets the mutual information's histogram range and pulls the
centre of mass to itself. Masks (uint8, 1 where used, any grid: ``masks.binary``) restrict the
mutual information (SimpleITK's metric masks) and the centres of mass to their regions.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from EOIRRegistrationLib.core.errors import InputError
from EOIRRegistrationLib.core.geometry import Grid
from EOIRRegistrationLib.core.intensity import outlier_bounds, percentile_window
from EOIRRegistrationLib.engine.options import INITIAL_ALIGNMENTS

# The coarse grid's spacing: about COARSE_VOXELS voxels over the fixed field of view, within
# these bounds. Brain MRI (151 x 157 x 200 mm) gets 4 mm: half the time of 3 mm for -0.003 Dice
# after the deformable step in benchmarks/bench_brain.py (5 mm: -0.008). A small field of view
# keeps 3 mm: at 4 mm a 80 mm phantom missed a 25 degree rotation by 5 degrees.
COARSE_SPACING_BOUNDS_MM = (3.0, 4.0)
COARSE_VOXELS = 64_000
#: below this many voxels a coarse copy is named as the likely cause when ITK's search fails (a
#: 12 mm cube's 4x4x4 copy failed: too few samples for the mutual information's histogram)
FEW_COARSE_VOXELS = 1000
#: fewest voxels of its coarse copy a mask must cover for the search (the mutual information
#: samples a share of them; a one-voxel mask covered none and ITK raised, as it did for a 9 mm
#: cube's 12 voxels, while a 12 mm cube's 48 ran)
MIN_MASKED_COARSE_VOXELS = 32
SAMPLING = 0.25        # of the coarse grid's voxels, on a regular grid, for Mattes MI
ALIGNED_TOLERANCE_MM = 2.0  # "auto": an affine moving nothing further is not worth applying
# A plausible affine between two scans: adult heads differ in size by some 10-20 % per axis; a
# result outside these bounds is an optimiser that shrank or sheared its way to a histogram.
SCALE_BOUNDS = (2 / 3, 3 / 2)  # principal scales (singular values of the linear part)
MAX_SHEAR = 0.25               # off-diagonal / diagonal of the QR decomposition's triangle
OVERLAP_TOLERANCE = 0.01       # foreground Dice a transform may lose to the simpler one


@dataclass(frozen=True)
class Alignment:
    """The starting matrix, the method that produced it and, for "auto" and a doubtful result,
    a sentence saying why (empty otherwise)."""

    matrix: np.ndarray
    method: str       # "none", "com", "rigid", "affine" or "given"
    note: str = ""
    warning: str = ""  # a requested rigid/affine result that looks wrong (kept, not replaced)


def matrix_from_transform(transform: sitk.Transform) -> np.ndarray:
    """4x4 matrix of a linear SimpleITK transform (probed at points; refuses non-linear ones)."""
    if not transform.IsLinear():
        raise InputError(f"the initial transform ({transform.GetName()}) is not linear "
                         "(rigid/affine); harden or convert it before using it as a start")
    probe = lambda p: np.asarray(transform.TransformPoint(tuple(float(v) for v in p)))
    origin = probe((0.0, 0.0, 0.0))
    a = np.eye(4)
    for i in range(3):
        e = np.zeros(3)
        e[i] = 100.0
        a[:3, i] = (probe(e) - origin) / 100.0
    a[:3, 3] = origin
    test = np.array([37.0, -52.0, 81.0])
    if not np.allclose(probe(test), a[:3, :3] @ test + origin, atol=1e-4):
        raise InputError("the initial transform is not linear (rigid/affine); harden or convert "
                         "non-linear transforms before using them as a starting point")
    return a


def without_outliers(image: sitk.Image) -> sitk.Image:
    """A float32 copy with values farther outside the robust window than its width clamped
    (``core.intensity.outlier_bounds``); ordinary images come back unchanged."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    low, high = outlier_bounds(percentile_window(values))
    if values.min() >= low and values.max() <= high:
        return image
    return sitk.Clamp(image, sitk.sitkFloat32, low, high)


def _masked(image: sitk.Image, mask: sitk.Image | None) -> sitk.Image:
    """``image`` (float32) with the voxels outside ``mask`` (read on its grid) set to 0."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    if mask is None:
        return image
    on_grid = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return image * sitk.Cast(on_grid, sitk.sitkFloat32)


def _moments(fixed: sitk.Image, moving: sitk.Image, masks) -> sitk.Euler3DTransform:
    """The translation between the intensity centres of mass (within the masks)."""
    try:
        return sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
            _masked(fixed, masks[0]), _masked(moving, masks[1]), sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS))
    except RuntimeError as exc:  # ITK: "Total Mass of the image was zero"
        if masks[0] is None and masks[1] is None:
            raise
        raise InputError("the initial alignment found no intensity inside the masks on its "
                         f"{fixed.GetSpacing()[0]:.3g} mm grid (a mask of a few voxels, or on the "
                         "background): give larger masks, or start from --init none") from exc


def _check_mask_cover(f: sitk.Image, m: sitk.Image, masks) -> None:
    """Refuse a mask too small for the search on the coarse copies ``f``, ``m``: ITK raised on
    it with messages about sample sets and overlap."""
    for role, image, mask in (("fixed", f, masks[0]), ("moving", m, masks[1])):
        if mask is None:
            continue
        on_grid = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        n = int(np.count_nonzero(sitk.GetArrayViewFromImage(on_grid)))
        if n < MIN_MASKED_COARSE_VOXELS:
            raise InputError(f"the {role} mask covers {n} voxels of the {image.GetSpacing()[0]:.3g} mm "
                             f"grid the initial alignment searches on, too few for it (at least "
                             f"{MIN_MASKED_COARSE_VOXELS}): give a larger mask, or start from "
                             "--init none")


def center_of_mass_matrix(fixed: sitk.Image, moving: sitk.Image, masks=(None, None)) -> np.ndarray:
    """Translation taking the fixed image's intensity centre of mass to the moving image's
    (within the masks)."""
    return matrix_from_transform(_moments(without_outliers(fixed), without_outliers(moving), masks))


def _coarse(image: sitk.Image, spacing: float) -> sitk.Image:
    """Copy on an isotropic grid of ``spacing`` mm in the image's own frame and centre: block
    averages (BinShrink by the whole number of voxels per ``spacing`` on each axis, which is
    also the anti-aliasing) resampled linearly, outliers clamped first. A Gaussian blur instead
    took 4x longer for the same brain Dice."""
    image = without_outliers(image)
    grid = Grid.from_image(image)
    size = [max(4, int(round(n * s / spacing))) for n, s in zip(grid.size, grid.spacing)]
    factors = [max(1, min(int(spacing // s), n)) for s, n in zip(grid.spacing, grid.size)]
    shrunk = sitk.BinShrink(image, factors)
    origin = grid.center() - grid.direction_matrix @ (spacing * (np.asarray(size) - 1) / 2.0)
    return sitk.Resample(shrunk, size, sitk.Transform(), sitk.sitkLinear, tuple(origin),
                         (spacing,) * 3, grid.direction, 0.0, sitk.sitkFloat32)


def coarse_spacing(fixed: sitk.Image) -> float:
    """Spacing (mm) of the grid the linear alignment is optimised on (see COARSE_VOXELS)."""
    extent = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    low, high = COARSE_SPACING_BOUNDS_MM
    return float(np.clip((np.prod(extent) / COARSE_VOXELS) ** (1 / 3), low, high))


def optimised_matrix(fixed: sitk.Image, moving: sitk.Image, kind: str,
                     spacing: float | None = None, seed: int = 7, masks=(None, None)) -> np.ndarray:
    """Rigid or affine fixed -> moving matrix maximising Mattes mutual information."""
    spacing = spacing or coarse_spacing(fixed)
    return _optimised_coarse(_coarse(fixed, spacing), _coarse(moving, spacing), kind, seed, masks)


def _optimised_coarse(f: sitk.Image, m: sitk.Image, kind: str, seed: int = 7,
                      masks=(None, None)) -> np.ndarray:
    return _rigid_and_affine(f, m, seed, affine=kind == "affine", masks=masks)[-1]


def _rigid_and_affine(f: sitk.Image, m: sitk.Image, seed: int = 7, affine: bool = True,
                      masks=(None, None)):
    """``(rigid,)`` or ``(rigid, affine)`` matrices on the coarse copies; the affine starts from
    the rigid one."""
    _check_mask_cover(f, m, masks)
    start = _moments(f, m, masks)
    # A rigid stage that only seeds the affine one needs fewer iterations and a coarser stop:
    # on the real brain pairs (12, half of them perturbed) 1.65 -> 1.23 s median, matrices within
    # 0.0016 / 0.04 mm. Sampling 10 % of the voxels instead of 25 % saved 0.3 s more on the same
    # contrast but cost a T2-like -> T1 pair 0.13 Dice (mutual information needs the samples).
    seed_only = dict(min_step=1e-3) if affine else {}
    rigid = _optimise(f, m, sitk.Euler3DTransform(start), seed,
                      iterations=100 if affine else 300, masks=masks, **seed_only)
    r = matrix_from_transform(rigid)
    if not affine:
        return (r,)
    centre = np.asarray(start.GetCenter())
    affine = sitk.AffineTransform(3)  # same map as the rigid result, centred for good scaling
    affine.SetCenter(tuple(centre))
    affine.SetMatrix(r[:3, :3].ravel().tolist())
    affine.SetTranslation(tuple(r[:3, :3] @ centre + r[:3, 3] - centre))
    # From the rigid seed, minStep 1e-3 and 150 iterations per level took 40 % less time than
    # 1e-4 and 300 for the same brain Dice after the deformable step (bench_brain.py pairs); the
    # rigid stages keep 1e-4 (1e-3 stopped a rigid 10 degree search at 6.6 degrees).
    return r, matrix_from_transform(_optimise(f, m, affine, seed, iterations=150, min_step=1e-3,
                                              masks=masks))


def _metric(seed: int, masks=(None, None)) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    if masks[0] is not None:
        reg.SetMetricFixedMask(masks[0])
    if masks[1] is not None:
        reg.SetMetricMovingMask(masks[1])
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(SAMPLING, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    return reg


@contextmanager
def _one_itk_thread():
    """ITK's multi-threaded mutual information sums in a varying order: the same pair gave
    matrices differing by up to 0.14 (mm) from run to run, and deformations by millimetres
    after them. On one thread the result is reproducible, for about 0.3 s more on a brain
    (0.6-0.75 s -> 0.9-1.1 s). The registration method's own thread count does not reach its
    metric, hence the global default (restored after)."""
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _optimise(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, seed: int,
              iterations: int, min_step: float = 1e-4, masks=(None, None)):
    # A regular sample grid gives the same metric every iteration, so the step halves only when
    # the optimum is crossed and the optimiser stops at minStep instead of wandering in sampling
    # noise until the iteration limit (random samples: 2x the time, same brain Dice).
    reg = _metric(seed, masks)
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=min_step,
                                                 numberOfIterations=iterations,
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SetInitialTransform(transform, inPlace=False)
    try:
        with _one_itk_thread():
            return reg.Execute(fixed, moving)
    except RuntimeError as exc:
        small = [f"the {role} image's coarse copy ({'x'.join(map(str, image.GetSize()))} voxels of "
                 f"{image.GetSpacing()[0]:g} mm)" for role, image in (("fixed", fixed), ("moving", moving))
                 if np.prod(image.GetSize()) < FEW_COARSE_VOXELS]
        why = (f"{' and '.join(small)} is too small for mutual information; start from --init "
               "none or com" if small else "the masks may leave too few voxels to compare"
               if masks[0] is not None or masks[1] is not None else "the images may not overlap enough")
        raise InputError(f"the initial linear alignment failed ({why}): "
                         f"{str(exc).splitlines()[-1]}") from exc


def _mutual_information_cost(f: sitk.Image, m: sitk.Image, a: np.ndarray, seed: int,
                             masks=(None, None)) -> float:
    """Mattes cost (negative mutual information: lower is better) of the fixed -> moving matrix
    ``a``; +inf when the images do not overlap under it."""
    reg = _metric(seed, masks)
    reg.SetMetricSamplingStrategy(reg.NONE)  # every voxel: a deterministic comparison
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(a[:3, :3].ravel().tolist())
    tx.SetTranslation(a[:3, 3].tolist())
    reg.SetInitialTransform(tx)
    try:
        with _one_itk_thread():
            return reg.MetricEvaluate(f, m)
    except RuntimeError:
        return float("inf")


def largest_shift_mm(a: np.ndarray, grid: Grid) -> float:
    """How far (mm) the matrix ``a`` moves the farthest corner of ``grid``'s field of view."""
    n = np.asarray(grid.size) - 1
    corners = np.array([[i, j, k, 1] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])],
                       float)  # ITK index order
    points = (corners @ grid.index_to_physical().T)[:, :3]  # LPS mm
    moved = points @ a[:3, :3].T + a[:3, 3]
    return float(np.linalg.norm(moved - points, axis=1).max())


def implausible(a: np.ndarray) -> str:
    """Why the linear part of ``a`` is no plausible alignment of two scans ("" if it is)."""
    lin = a[:3, :3]
    det = float(np.linalg.det(lin))
    if det <= 0:
        return f"it mirrors the image (determinant {det:.2f})"
    scales = np.linalg.svd(lin, compute_uv=False)
    _, tri = np.linalg.qr(lin)
    shear = float(np.max(np.abs(np.triu(tri, 1) / np.abs(np.diag(tri))[:, None])))
    low, high = SCALE_BOUNDS
    if scales.min() < low or scales.max() > high:
        return (f"it scales by {scales.min():.2f}-{scales.max():.2f} (plausible "
                f"{low:.2f}-{high:.2f})")
    if shear > MAX_SHEAR:
        return f"it shears by {shear:.2f} (plausible up to {MAX_SHEAR:.2f})"
    return ""


def foreground_overlap(f: sitk.Image, m: sitk.Image, a: np.ndarray) -> float:
    """Dice of the fixed and the moving foregrounds (Otsu) with the moving one read through the
    fixed -> moving matrix ``a``, on the fixed (coarse) grid."""
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(a[:3, :3].ravel().tolist())
    tx.SetTranslation(a[:3, 3].tolist())
    fg = lambda image: sitk.OtsuThreshold(image, 0, 1)
    fixed_fg = sitk.GetArrayViewFromImage(fg(f)) > 0
    moving_fg = sitk.GetArrayViewFromImage(
        sitk.Resample(fg(m), f, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0
    total = int(fixed_fg.sum()) + int(moving_fg.sum())
    return 2.0 * float((fixed_fg & moving_fg).sum()) / total if total else 0.0


def _worse(name, a, simpler_name, simpler, f, m, seed, masks=(None, None)) -> str:
    """Why ``a`` does not match better than the simpler ``simpler`` ("" if it does)."""
    cost, simpler_cost = (_mutual_information_cost(f, m, x, seed, masks) for x in (a, simpler))
    if cost >= simpler_cost:
        return f"its mutual information is no better than the {simpler_name} one's"
    overlap, simpler_overlap = (foreground_overlap(f, m, x) for x in (a, simpler))
    if overlap < simpler_overlap - OVERLAP_TOLERANCE:
        return (f"its foreground overlap (Dice {overlap:.2f}) is below the {simpler_name} "
                f"one's ({simpler_overlap:.2f})")
    return ""


def auto_alignment(fixed: sitk.Image, moving: sitk.Image, spacing: float | None = None,
                   seed: int = 7, masks=(None, None)) -> Alignment:
    """The "auto" choice: affine, else rigid, else none (see the module docstring)."""
    spacing = spacing or coarse_spacing(fixed)
    f, m = _coarse(fixed, spacing), _coarse(moving, spacing)
    rigid, affine = _rigid_and_affine(f, m, seed, masks=masks)
    identity = np.eye(4)
    rejected = []
    why = implausible(affine) or _worse("affine", affine, "rigid", rigid, f, m, seed, masks)
    chosen, method = (affine, "affine") if not why else (None, "")
    if why:
        rejected.append(f"the affine ({why})")
        # the rigid seed stopped early (a step of 1e-3): the full rigid optimisation instead
        rigid = _rigid_and_affine(f, m, seed, affine=False, masks=masks)[0]
        why = _worse("rigid", rigid, "unaligned", identity, f, m, seed, masks)
        if why:
            rejected.append(f"the rigid ({why})")
        else:
            chosen, method = rigid, "rigid"
    if chosen is None:
        return Alignment(identity, "none", f"auto: rejected {' and '.join(rejected)}; "
                                           "no initial alignment")
    head = f"auto: rejected {rejected[0]}; " if rejected else "auto: "
    if largest_shift_mm(chosen, Grid.from_image(fixed)) <= ALIGNED_TOLERANCE_MM:
        return Alignment(identity, "none", f"{head}the {method} alignment moves no point by "
                                           f"more than {ALIGNED_TOLERANCE_MM:g} mm: already "
                                           "aligned, not applied")
    return Alignment(chosen, method, f"{head}{method} alignment used")


def auto_matrix(fixed: sitk.Image, moving: sitk.Image, spacing: float | None = None,
                seed: int = 7) -> tuple[np.ndarray, str]:
    """The "auto" choice as ``(matrix, "affine" | "rigid" | "none")``."""
    chosen = auto_alignment(fixed, moving, spacing, seed)
    return chosen.matrix, chosen.method


def _requested(fixed: sitk.Image, moving: sitk.Image, method: str, masks=(None, None)) -> Alignment:
    """A requested rigid or affine optimisation, with a warning when its result looks wrong."""
    spacing = coarse_spacing(fixed)
    f, m = _coarse(fixed, spacing), _coarse(moving, spacing)
    a = _optimised_coarse(f, m, method, masks=masks)
    why = implausible(a) if method == "affine" else ""
    if not why:
        before, after = foreground_overlap(f, m, np.eye(4)), foreground_overlap(f, m, a)
        if after < before - OVERLAP_TOLERANCE:
            why = f"it lowers the foreground overlap (Dice {before:.2f} -> {after:.2f})"
    warning = (f"the {method} initial alignment looks wrong: {why}; check the result or try "
               "another initial alignment" if why else "")
    return Alignment(a, method, warning=warning)


def choose_alignment(fixed: sitk.Image, moving: sitk.Image, method: str,
                     transform=None, masks=(None, None)) -> Alignment:
    """The starting 4x4 LPS matrix (fixed point -> moving point) and how it was found: "given"
    for a user transform, and for "auto" the method it chose ("affine", "rigid" or "none").
    masks: (fixed, moving) uint8 masks or None (``masks.binary``)."""
    if transform is not None:
        a = np.asarray(transform, dtype=np.float64) if not isinstance(transform, sitk.Transform) \
            else matrix_from_transform(transform)
        if a.shape != (4, 4) or not np.allclose(a[3], [0, 0, 0, 1]):
            raise InputError(f"an initial transform matrix must be 4x4 homogeneous, got {a.shape}")
        if abs(np.linalg.det(a[:3, :3])) < 1e-6:
            raise InputError("the initial transform is singular (determinant 0)")
        return Alignment(a, "given")
    if method == "auto":
        return auto_alignment(fixed, moving, masks=masks)
    if method == "none":
        return Alignment(np.eye(4), method)
    if method == "com":
        return Alignment(center_of_mass_matrix(fixed, moving, masks), method)
    if method in ("rigid", "affine"):
        return _requested(fixed, moving, method, masks)
    raise InputError(f"unknown initial alignment {method!r}; choose one of {', '.join(INITIAL_ALIGNMENTS)}")


def initial_alignment(fixed: sitk.Image, moving: sitk.Image, method: str,
                      transform=None, masks=(None, None)) -> tuple[np.ndarray, str]:
    """``choose_alignment`` as ``(matrix, method)``."""
    chosen = choose_alignment(fixed, moving, method, transform, masks)
    return chosen.matrix, chosen.method
