"""The images made ready for the engine, while the initial alignment runs beside them.

``prepared_and_aligned`` runs ``alignment.choose_alignment`` (ITK's Mattes search, on one thread
for reproducible matrices, outside the interpreter lock) in a worker thread, and meanwhile, on
one torch thread of this one, everything that does not depend on its matrix: the images as
tensors, their intensity windows, outliers clamped, the fixed foreground's box, the working
grid, and the fixed image of each optimisation level. Otherwise the second core idles through
the search (about 1 s on a brain); two torch threads beside a busy core would wait for each
other. The moving side's levels, read through the matrix, are made once it is known.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from EOIRRegistrationLib.core import geometry
from EOIRRegistrationLib.core.errors import InputError
from EOIRRegistrationLib.core.intensity import normalize, outlier_bounds, window_of
from EOIRRegistrationLib.engine import alignment, foreground, optimise


@dataclass
class Prepared:
    """The images on the engine's grids (tensors ``(1, 1, *S)`` in array order k, j, i)."""
    fixed_grid: geometry.Grid
    moving_grid: geometry.Grid
    moving_t: torch.Tensor        # the moving image's own values (the final warp reads them)
    moving_c: torch.Tensor        # outliers clamped (the registration reads these)
    windows: list                 # intensity windows (low, high): fixed, moving
    box: tuple                    # the fixed foreground's box (start, shape), ``foreground.box``
    region: geometry.Grid         # the fixed grid's block in that box
    region_t: torch.Tensor        # the clamped fixed image on it
    wgrid: geometry.Grid          # the working grid (network, contrast test)
    fixed_w: torch.Tensor         # the normalised fixed image on it
    fixed_levels: dict = field(default_factory=dict)  # (level grid, scale) -> normalised fixed


def clamped(values: torch.Tensor, window, inplace: bool = False) -> torch.Tensor:
    """``values`` with outliers (``core.intensity.outlier_bounds``) clamped before anything
    smooths them: one voxel of 1e30 would otherwise brighten its whole neighbourhood at the
    optimisation's coarse scales. A copy only when something is clamped, unless ``inplace``."""
    low, high = outlier_bounds(window)
    if float(values.min()) >= low and float(values.max()) <= high:
        return values
    return values.clamp_(low, high) if inplace else values.clamp(low, high)


def on_working_grid(values: torch.Tensor, source: geometry.Grid, grid: geometry.Grid,
                    affine=None) -> torch.Tensor:
    """``values`` (an image on ``source``) resampled onto the working grid, through ``affine``."""
    return geometry.sample_through_like_itk(values, source, grid, affine)


def fixed_at(prepared: Prepared, grid: geometry.Grid, scale: float) -> torch.Tensor:
    """The normalised fixed image of one optimisation level (made beforehand, or now)."""
    made = prepared.fixed_levels.pop((grid, scale), None)
    if made is not None:
        return made
    return normalize(optimise.image_at(prepared.region_t, prepared.region, grid, scale),
                     prepared.windows[0])


def prepare(fixed, moving, options, loaded, spacing, level_scales=()) -> Prepared:
    """Everything of the images that does not depend on the initial alignment; the fixed image
    of each of ``level_scales`` (mm) made beforehand."""
    fixed_grid, moving_grid = geometry.Grid.from_image(fixed), geometry.Grid.from_image(moving)
    # Each image is converted to a tensor once; the moving one is reused for the final warp.
    fixed_t, moving_t = geometry.image_to_tensor(fixed), geometry.image_to_tensor(moving)
    windows = []
    for k, (values, role) in enumerate(((fixed_t, "fixed"), (moving_t, "moving"))):
        window = (options.intensity_window[k] if options.intensity_window is not None
                  else window_of(values, loaded.normalization))
        if not window[1] > window[0]:
            raise InputError(f"the {role} image's intensity window {window} is empty (high must "
                             "exceed low); most voxels may share one value")
        low, high = float(values.min()), float(values.max())
        if window[1] <= low or window[0] >= high:  # clamped to it, the image would be constant
            raise InputError(f"the {role} image's intensity window ({window[0]:g}, {window[1]:g}) "
                             f"lies outside its intensities ({low:g} to {high:g}): the image "
                             "would be constant, nothing to register; check the window's units")
        windows.append(window)
    # Outliers clamped for the registration; the warped output keeps the moving image's values.
    fixed_t = clamped(fixed_t, windows[0], inplace=True)
    moving_c = clamped(moving_t, windows[1])
    # The network and the optimisation work on the foreground's box (foreground.py).
    box = (foreground.box(fixed_t, fixed_grid, windows[0]) if options.foreground_box
           else ((0, 0, 0), fixed_grid.shape))
    region = geometry.sub_grid(fixed_grid, *box)
    region_t = foreground.crop(fixed_t, *box)
    wgrid = geometry.working_grid(region, spacing, multiple=loaded.model.size_multiple)
    fixed_w = normalize(on_working_grid(region_t, region, wgrid), windows[0])
    prepared = Prepared(fixed_grid, moving_grid, moving_t, moving_c, windows, box, region,
                        region_t, wgrid, fixed_w)
    for scale in level_scales:
        level = optimise.level_grid(region, scale)
        prepared.fixed_levels[(level, scale)] = fixed_at(prepared, level, scale)
    return prepared


@contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepared_and_aligned(fixed, moving, options, loaded, spacing, level_scales, alignment_masks):
    """``(prepare(...), alignment.choose_alignment(...))``, the two side by side when the
    alignment searches (see the module docstring). A failure of either is raised, the
    preparation's first."""
    align = (fixed, moving, options.initial_alignment, options.initial_transform, alignment_masks)
    if options.initial_transform is not None or options.initial_alignment in ("none", "com"):
        return (prepare(fixed, moving, options, loaded, spacing, level_scales),
                alignment.choose_alignment(*align))  # nothing long to overlap
    with ThreadPoolExecutor(max_workers=1) as pool:
        aligning = pool.submit(alignment.choose_alignment, *align)
        with _torch_threads(1):
            prepared = prepare(fixed, moving, options, loaded, spacing, level_scales)
        return prepared, aligning.result()
