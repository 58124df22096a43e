"""Multi-scale optimisation of a displacement field down to the fixed image's own resolution.

A pyramid of grids in the fixed image's frame (its direction and centre), one per scale of the
schedule (mm; an axis never finer than the fixed image's own spacing; the finest level is the
fixed grid itself when the scale reaches its spacing, so no interpolation follows). At each
level a voxel displacement ``u`` (array order, ``warped(p) = moving(p + u(p))``) is optimised
greedily, as ANTs' and greedy's SyN-style optimisers do:

* similarity: LNCC in a small box window, its gradient in closed form (ANTs' local
  approximation: local means held constant), not through autograd; with masks
  (``masks.py``) the force is multiplied by the fixed mask and the warped moving mask;
* step: the similarity gradient smoothed by a Gaussian (``gradient_sigma`` voxels, "fluid"),
  scaled by Adam's moments, with a cosine-decaying learning rate (voxels);
* update: compositive, ``u <- d + u o (id + d)`` (a composition of small maps stays
  invertible), to first order in the step (``d + u + (du/dp) d``: the steps are a fraction of a
  voxel; on the real brain pairs this matched the resampled composition's Dice, +0.006, in two
  thirds of its time), then the field smoothed by a Gaussian (``field_sigma`` voxels,
  "elastic").

The start (the network's field, or nothing) enters at the first level; between levels the field
moves through physical space (LPS mm). Returns the displacement in LPS mm on the fixed grid.
The similarity terms are in ``similarity.py``, the separable filters in ``filters.py``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from EOIRRegistrationLib.core import geometry, spatial
from EOIRRegistrationLib.engine import similarity
from EOIRRegistrationLib.engine.filters import gaussian, gaussian_into, gaussian_radius, interior


@dataclass(frozen=True)
class Schedule:
    scales_mm: tuple[float, ...]     # coarse to fine
    iterations: tuple[int, ...]      # per scale
    window: int = 5                  # LNCC box window, voxels of the level
    learning_rate: float = 0.5       # voxels of the level per step (Adam)
    gradient_sigma: float = 1.0      # voxels: smoothing of each step ("fluid")
    field_sigma: float = 0.5         # voxels: smoothing of the field after each step ("elastic")
    step_sigma: float = 0.0          # voxels: smoothing of Adam's step before it is composed
    adam: bool = True                # False: the smoothed gradient scaled to a largest step of
                                     # learning_rate voxels (greedy's normalisation)
    adam_floor: float = 0.0          # Adam's epsilon relative to the gradient's RMS: voxels
                                     # whose gradient is weaker than that move less
    similarity: str = "lncc"         # "lncc" (one contrast) or "mind" (MIND-SSC, two contrasts)


#: the presets of ``RegistrationOptions.preset`` (scales in mm, coarse to fine). On the six real
#: brain pairs (benchmarks/bench_real.py, ours only, one run each, 2 threads; Dice, SDlogJ,
#: largest folding % of a pair), by each step's smoothing (voxels):
#: 16/8/1 steps: 0.5 -> 0.761, 0.39, 0.0008 %; 0.75 -> 0.757, 0.36, 0; 1 -> 0.752, 0.33, 0.
#: 20/10/2 (the default until this version): 1 -> 0.757, 0.35, 0; 0.5 -> 0.765, 0.40, 0.0004 %.
#: 10/5/1: 0.5 -> 0.759, 0.40, 0.0006 %; 0.75 -> 0.754, 0.35, 0; 1 -> 0.747, 0.32, 0.
#: The second step at 1 mm costs ~0.4 s of a ~4.5 s run and the coarse levels' steps beyond 10/5
#: gain little: the default keeps the old one's Dice without folding in ~0.8 of its time. Less
#: smoothing fits the texture more: on test_pipeline's known translation the smoothing of 0.5
#: left 0.35 of the shift as voxel-scale error (1 voxel: 0.26).
PRESETS = {
    "fast": Schedule((4.0, 2.0, 1.0), (10, 5, 1), step_sigma=0.75, adam_floor=0.3),
    "default": Schedule((4.0, 2.0, 1.0), (16, 8, 1), step_sigma=0.75, adam_floor=0.3),
    "accurate": Schedule((4.0, 2.0, 1.0), (50, 25, 6), step_sigma=0.5, adam_floor=0.3),
}


#: two contrasts: MIND-SSC descriptors compared by their squared differences, the same updates
#: (the descriptors' 12 channels make a step several times dearer than LNCC's). From 2 mm: with
#: a 4 mm level first (its descriptors span 8 mm) the T2-like brain pairs gained 0.006 Dice, but
#: a 40^3 two-contrast phantom lost 0.09 (0.57 -> 0.47): the coarse descriptors misled it. The
#: field is smoothed more than LNCC's (sigma 1 voxel): at 0.5 the phantom folded 0.3 % of voxels
#: (now 0, Dice 0.59), the brains' SDlogJ was 0.42 (now 0.22, Dice unchanged).
MIND_PRESETS = {
    "fast": Schedule((2.0, 1.0), (20, 1), field_sigma=1.0, step_sigma=1.0, adam_floor=0.3,
                     similarity="mind"),
    "default": Schedule((2.0, 1.0), (40, 2), field_sigma=1.0, step_sigma=1.0, adam_floor=0.3,
                        similarity="mind"),
    "accurate": Schedule((2.0, 1.0), (80, 4), field_sigma=1.0, step_sigma=0.5, adam_floor=0.3,
                         similarity="mind"),
}


def schedule_of(preset: str, finest_iterations: int | None = None,
                similarity: str = "lncc") -> Schedule:
    """The preset's schedule for ``similarity``, with ``finest_iterations`` steps at its finest
    scale if given."""
    schedule = (MIND_PRESETS if similarity == "mind" else PRESETS)[preset]
    if finest_iterations is None:
        return schedule
    return replace(schedule, iterations=schedule.iterations[:-1] + (int(finest_iterations),))


#: the most voxels of one level: a finer level is made coarser (every axis by the same factor)
#: to hold this many. A 1 mm brain cropped to its head (~5M voxels) is untouched; a CT's 1 mm
#: level (~31M voxels in a trunk's box: 3 steps of ~25 s and ~8 GB) becomes ~1.6 mm.
MAX_LEVEL_VOXELS = 1 << 23


def level_grid(fixed: geometry.Grid, scale_mm: float,
               max_voxels: int = MAX_LEVEL_VOXELS) -> geometry.Grid:
    """The grid of one level: ``scale_mm`` per axis but never finer than the fixed grid's own
    spacing, coarser when it would hold more than ``max_voxels``; the fixed grid itself when no
    axis is coarser."""
    spacing = np.maximum(np.asarray(fixed.spacing, dtype=float), float(scale_mm))
    extent = np.asarray(fixed.size) * np.asarray(fixed.spacing)
    voxels = lambda sp: float(np.prod(np.ceil(extent / sp - 1e-6)))  # noqa: E731 (working_grid's)
    if voxels(spacing) > max_voxels:
        spacing = spacing * (voxels(spacing) / max_voxels) ** (1.0 / 3.0)
        while voxels(spacing) > max_voxels:  # each size rounds up
            spacing = spacing * 1.002
    if np.allclose(spacing, fixed.spacing, rtol=1e-3):
        return fixed
    return geometry.working_grid(fixed, tuple(spacing), multiple=1, min_size=4)


def image_at(values: torch.Tensor, source: geometry.Grid, level: geometry.Grid, scale_mm: float,
             affine=None) -> torch.Tensor:
    """An image ``(1, 1, *source.shape)`` for one level: smoothed by a Gaussian of half the
    scale's excess over its own spacing (against aliasing), then sampled on ``level`` (ITK's
    linear rules) through ``affine`` (4x4 LPS, level point -> source point)."""
    spacing = np.asarray(source.spacing, dtype=float)  # x, y, z
    sigma = 0.5 * np.sqrt(np.maximum(float(scale_mm) ** 2 - spacing ** 2, 0.0)) / spacing
    sigma = tuple(reversed(sigma.tolist()))  # array order k, j, i
    if level == source and affine is None:
        return gaussian(values, sigma)
    # Only the block the level reads is smoothed (a CT's box of a whole moving image): inside
    # it, away from its cut edges by the Gaussian's reach, the values are the whole image's.
    start, stop = geometry.reach(geometry.corner_coords(level, source, affine), values.shape[2:],
                                 [gaussian_radius(s) for s in sigma])
    block = values[:, :, start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]
    return geometry.sample_through_like_itk(gaussian(block, sigma), source, level, affine,
                                            start=start, full_shape=tuple(values.shape[2:]))


def _compose_first_order(u: torch.Tensor, step: torch.Tensor,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """``step + u o (id + step)`` to first order in the step: ``step + u + (du/dp) step``
    (central differences, none across the borders), into ``out`` (not ``u`` or ``step``) when
    given. The steps are a fraction of a voxel, where this matches the interpolated composition
    and costs a third of it (no trilinear resampling)."""
    out = torch.add(u, step, out=out)
    for a in range(3):
        n = u.shape[a + 2]
        if n >= 3:  # (u(p + 1) - u(p - 1)) / 2 * step_a, as two products: no temporary
            s_a = interior(step[:, a:a + 1], a)
            interior(out, a).addcmul_(u.narrow(a + 2, 2, n - 2), s_a, value=0.5).addcmul_(
                u.narrow(a + 2, 0, n - 2), s_a, value=-0.5)
    return out


class _Warper:
    """``image(p + u(p))`` on one level's grid for the field last given to ``set_field``: the
    sampling grid is made once per step (the moving image and its mask share it), each of its
    coordinates as the axis' normalised positions (one line, broadcast) plus the scaled field,
    in one pass."""

    def __init__(self, shape, device):
        self.shape = tuple(shape)
        self.scale = [2.0 / max(n - 1, 1) for n in shape]  # voxels -> normalised, array order
        self.lines = [torch.linspace(-1.0, 1.0, n, dtype=torch.float64, device=device) if n > 1
                      else torch.full((1,), -1.0, dtype=torch.float64, device=device)
                      for n in shape]
        self.grid = None

    def set_field(self, u: torch.Tensor) -> None:
        if self.grid is None or self.grid.dtype != u.dtype:
            self.grid = torch.empty(1, *self.shape, 3, dtype=u.dtype, device=u.device)
        for c in range(3):  # grid_sample's x, y, z = array axes 2, 1, 0
            a = 2 - c
            view = [1, 1, 1, 1]
            view[a + 1] = self.shape[a]
            line = self.lines[a].to(u.dtype).view(view)
            torch.add(line, u[:, a], alpha=self.scale[a], out=self.grid[..., c])

    def __call__(self, image: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
        return spatial.grid_sample(image, self.grid.to(image.dtype), padding=padding)


def to_mm(u: torch.Tensor, grid: geometry.Grid) -> torch.Tensor:
    """A voxel displacement ``(1, 3, *grid.shape)`` (array order) in LPS mm (channels x, y, z)."""
    m = torch.as_tensor(grid.array_to_physical()[:3, :3], dtype=u.dtype)
    return torch.einsum("ab,b...->a...", m, u[0])[None]


def to_voxels(d: torch.Tensor, grid: geometry.Grid) -> torch.Tensor:
    """An LPS-mm displacement ``(1, 3, *grid.shape)`` in voxels of ``grid``, array order."""
    m = torch.as_tensor(np.linalg.inv(grid.array_to_physical()[:3, :3]), dtype=d.dtype)
    return torch.einsum("ab,b...->a...", m, d[0])[None]


def move_field(d_mm: torch.Tensor, source: geometry.Grid, target: geometry.Grid) -> torch.Tensor:
    """An LPS-mm displacement ``(1, 3, *source.shape)`` interpolated onto ``target`` (linear,
    border values beyond the source)."""
    if source == target:
        return d_mm
    m = source.physical_to_array() @ target.array_to_physical()  # target array -> source array
    if np.allclose(m[:3, :3], np.diag(np.diag(m[:3, :3])), atol=1e-9):
        return _separable_linear(d_mm, [(m[a, a], m[a, 3]) for a in range(3)], target.shape)
    coords = geometry.array_coords_of(target, source).to(d_mm.dtype)
    return spatial.sample(d_mm, coords, mode="linear", padding="border")


def _separable_linear(x: torch.Tensor, maps, shape) -> torch.Tensor:
    """``x (B, C, *S)`` read at array coordinates ``scale * t + offset`` per axis (``maps``), for
    every index ``t`` of ``shape``: trilinear interpolation as three 1-D ones, coordinates
    clamped to the grid (``border`` padding). The pyramid's grids share direction and centre, so
    moving a field between levels needs no 3-D sampling (3x faster than ``grid_sample``)."""
    for axis in (2, 1, 0):  # the innermost axis while the tensor is smallest: its gather is slow
        (scale, offset), n_out, dim = maps[axis], shape[axis], axis + 2
        n_in = x.shape[dim]
        c = (torch.arange(n_out, dtype=torch.float64) * float(scale) + float(offset))
        c = c.clamp_(0, n_in - 1)
        i0 = c.floor().long().clamp_(max=max(n_in - 2, 0))
        w = (c - i0).to(x.dtype)
        i1 = (i0 + 1).clamp_(max=n_in - 1)
        view = [1] * x.dim()
        view[dim] = n_out
        lo = x.index_select(dim, i0)
        x = lo.add_((x.index_select(dim, i1) - lo).mul_(w.view(view)))
    return x


def optimise(fixed_at, moving_at, fixed_grid: geometry.Grid, schedule: Schedule,
             start: tuple[torch.Tensor, geometry.Grid] | None = None, progress=None,
             cancel=None, time_budget_s: float | None = None,
             timings: dict | None = None, device: torch.device | None = None,
             masks=None) -> torch.Tensor:
    """The displacement (LPS mm, ``(3, *fixed_grid.shape)``) after the schedule.

    fixed_at(grid, scale_mm) / moving_at(grid, scale_mm): the normalised images ``(1, 1, *S)``
    on a level grid, smoothed for that scale (the moving one read through the initial linear
    transform). start: an LPS-mm displacement ``(1, 3, *S)`` and its grid. timings, when
    given, receives the seconds of each level ("optimising 2 mm": preparing and iterating).
    device: where the levels are optimised (the images are prepared on the CPU); the result is
    on the CPU. masks: ``masks.level_masks``'s ``(grid) -> (fixed weight, moving mask)`` (each
    ``(1, 1, *S)`` or None; the moving one warped by the field each step), or None.
    """
    device = device or torch.device("cpu")
    started = time.perf_counter()
    total = sum(schedule.iterations) or 1
    done = 0
    grid, d_mm = None, None
    if start is not None:
        d_mm, grid = start
    for scale, iterations in zip(schedule.scales_mm, schedule.iterations):
        level_started = time.perf_counter()
        level = level_grid(fixed_grid, scale)
        u = (torch.zeros(1, 3, *level.shape) if d_mm is None
             else to_voxels(move_field(d_mm, grid, level), level)).to(device)
        fixed = fixed_at(level, scale).to(device)
        moving = moving_at(level, scale).to(device)
        term = (similarity.MINDTerm(fixed, moving) if schedule.similarity == "mind"
                else similarity.LNCCTerm(fixed, moving, schedule.window))
        warp = _Warper(level.shape, device)
        weight, moving_mask = (None, None) if masks is None else (
            None if m is None else m.to(device) for m in masks(level))
        if schedule.similarity == "mind":  # a descriptor reads 3 voxels around its own
            weight, moving_mask = (None if m is None else similarity.eroded(m, similarity.MINDTerm.REACH)
                                   for m in (weight, moving_mask))
        m1 = torch.zeros_like(u)
        m2 = torch.zeros_like(u)
        work, spare = torch.empty_like(u), torch.empty_like(u)  # reused by every step
        b1, b2 = 0.9, 0.999
        for it in range(iterations):
            if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
                break
            if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
                break
            warp.set_field(u)
            grad, spare = gaussian_into(term.gradient(warp, weight, moving_mask, out=work),
                                         schedule.gradient_sigma, spare)
            t = it + 1
            lr = schedule.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * it / iterations)))
            if schedule.adam:
                m1.mul_(b1).add_(grad, alpha=1 - b1)
                m2.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                # m1_hat / (sqrt(v_hat) + eps), v_hat = m2 / c2, in as few passes as possible
                c1, c2 = 1 - b1 ** t, 1 - b2 ** t
                eps = schedule.adam_floor * math.sqrt(float(m2.mean()) / c2) + 1e-8
                step = torch.sqrt(m2, out=grad).add_(eps * math.sqrt(c2))
                step = torch.div(m1, step, out=step).mul_(-lr * math.sqrt(c2) / c1)
            else:
                step = grad.mul_(-lr / float(grad.norm(dim=1).max().clamp_min(1e-12)))
            step, spare = gaussian_into(step, schedule.step_sigma, spare)
            composed = _compose_first_order(u, step, out=spare)
            u, spare = gaussian_into(composed, schedule.field_sigma, u)
            work = step
            done += 1
            if progress is not None:
                progress(done / total)
        d_mm, grid = to_mm(u.cpu(), level), level
        del fixed, moving, term, warp, m1, m2, u, weight, moving_mask, work, spare
        if timings is not None:
            timings[f"optimising {scale:g} mm"] = round(time.perf_counter() - level_started, 3)
    if d_mm is None:
        return torch.zeros(3, *fixed_grid.shape)
    return move_field(d_mm, grid, fixed_grid)[0]
