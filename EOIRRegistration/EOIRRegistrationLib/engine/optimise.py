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
Gaussians and box sums are separable passes of shifted views (no conv3d): several times faster
on a CPU.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from EOIRRegistrationLib.core import geometry, losses, spatial


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


#: the presets of ``RegistrationOptions.preset`` (scales in mm, coarse to fine)
PRESETS = {
    "fast": Schedule((4.0, 2.0, 1.0), (10, 5, 2), step_sigma=1.0, adam_floor=0.3),
    "default": Schedule((4.0, 2.0, 1.0), (20, 10, 3), step_sigma=1.0, adam_floor=0.3),
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


# -- separable filters as sums of shifted views -----------------------------------------------

def _filter_axis(x: torch.Tensor, weights: list[float], axis: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Correlate ``x (B, C, *S)`` along array ``axis`` with odd-length ``weights``, borders
    replicated: the centre tap, then each shifted view added in place, and the border voxels'
    replicated neighbours added as one slice each (no padded copy: 40 % faster on a CPU). Into
    ``out`` (same shape as ``x``, not ``x`` itself) when given."""
    r = len(weights) // 2
    dim = axis + 2
    n = x.shape[dim]
    if n <= r:  # an axis shorter than the kernel's reach: pad explicitly
        shape = list(x.shape)
        shape[dim] = r
        padded = torch.cat([x.narrow(dim, 0, 1).expand(shape), x,
                            x.narrow(dim, n - 1, 1).expand(shape)], dim=dim)
        out = torch.mul(padded.narrow(dim, 0, n), weights[0], out=out)
        for k in range(1, len(weights)):
            out.add_(padded.narrow(dim, k, n), alpha=weights[k])
        return out
    out = torch.mul(x, weights[r], out=out)
    for k in range(1, r + 1):
        before, after = weights[r - k], weights[r + k]  # taps at i - k and i + k
        out.narrow(dim, k, n - k).add_(x.narrow(dim, 0, n - k), alpha=before)
        out.narrow(dim, 0, n - k).add_(x.narrow(dim, k, n - k), alpha=after)
        out.narrow(dim, 0, k).add_(x.narrow(dim, 0, 1), alpha=before)
        out.narrow(dim, n - k, k).add_(x.narrow(dim, n - 1, 1), alpha=after)
    return out


def gaussian_radius(sigma: float) -> int:
    """Voxels each side of ``gaussian``'s kernel (0: not filtered)."""
    return 0 if sigma <= 0.05 else max(1, int(math.ceil(2.0 * sigma)))


def _gaussian_weights(sigma: float) -> list[float]:
    r = gaussian_radius(sigma)
    w = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-r, r + 1)]
    total = sum(w)
    return [v / total for v in w]


def gaussian(x: torch.Tensor, sigma) -> torch.Tensor:
    """Separable Gaussian, sigma in voxels (one value, or one per array axis), truncated at 2
    sigma, borders replicated."""
    sigmas = [float(sigma)] * 3 if isinstance(sigma, (int, float)) else [float(v) for v in sigma]
    for axis, sig in enumerate(sigmas):
        if sig > 0.05 and x.shape[axis + 2] >= 2:
            x = _filter_axis(x, _gaussian_weights(sig), axis)
    return x


def _gaussian_into(x: torch.Tensor, sigma: float, spare: torch.Tensor):
    """``gaussian(x, sigma)`` passing between ``x`` and ``spare`` (both overwritten) instead of
    new tensors: ``(smoothed, the other buffer)``. At 1 mm every step smooths three fields;
    fresh 50 MB tensors cost more in page faults than the filtering itself."""
    if sigma > 0.05:
        w = _gaussian_weights(sigma)
        for axis in range(3):
            if x.shape[axis + 2] >= 2:
                x, spare = _filter_axis(x, w, axis, out=spare), x
    return x, spare


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
    coords = geometry.array_coords_of(level, source, affine=affine)
    # Only the block the level reads is smoothed (a CT's box of a whole moving image): inside
    # it, away from its cut edges by the Gaussian's reach, the values are the whole image's.
    start, stop = geometry.reach(coords, values.shape[2:], [gaussian_radius(s) for s in sigma])
    block = values[:, :, start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]
    return geometry.sample_like_itk(gaussian(block, sigma), coords, start=start,
                                    full_shape=tuple(values.shape[2:]))


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a ``window``^3 box (borders replicated)."""
    w = [1.0 / window] * window
    for axis in range(3):
        x = _filter_axis(x, w, axis)
    return x


def _interior_differences(x: torch.Tensor):
    """For each array axis of ``x (B, C, *S)`` with 3 or more voxels: ``(axis, x(p + 1) - x(p - 1))``
    at its interior voxels p (1 .. n - 2 along that axis). The optimisation's central differences
    (image gradients, the field's Jacobian in the composition) all come from here."""
    for axis in range(3):
        n = x.shape[axis + 2]
        if n >= 3:
            yield axis, x.narrow(axis + 2, 2, n - 2) - x.narrow(axis + 2, 0, n - 2)


def _interior(x: torch.Tensor, axis: int) -> torch.Tensor:
    """The interior voxels of ``x`` along ``axis`` (a view)."""
    return x.narrow(axis + 2, 1, x.shape[axis + 2] - 2)


def _gradient(image: torch.Tensor, factor: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Central differences of ``(1, 1, *S)`` -> ``(1, 3, *S)`` (zero at the borders), each
    multiplied by ``factor (1, 1, *S)`` when given (one pass instead of two); into ``out``."""
    g = (torch.zeros(1, 3, *image.shape[2:], dtype=image.dtype, device=image.device)
         if out is None else out.zero_())
    for a, diff in _interior_differences(image):
        diff.mul_(0.5 if factor is None else _interior(factor, a) * 0.5)
        _interior(g[:, a:a + 1], a).copy_(diff)
    return g


class _LNCC:
    """Closed-form LNCC gradient against a fixed image; the fixed image's local statistics are
    computed once, and each step's local statistics of the warped image in two reused buffers."""

    def __init__(self, fixed: torch.Tensor, window: int):
        self.window = window
        self.f = fixed
        self.mf = box_mean(fixed, window)
        self.vf = (box_mean(fixed * fixed, window) - self.mf * self.mf).clamp_min_(0)
        self.fc = fixed - self.mf
        self.buffers = None

    def force(self, warped: torch.Tensor) -> torch.Tensor:
        """d(mean LNCC)/d(warped) per voxel (up to a constant factor), ``(1, 1, *S)``: a view of
        a buffer that the next call overwrites."""
        if self.buffers is None or self.buffers[0].dtype != warped.dtype:
            self.buffers = [warped.new_empty(1, 3, *warped.shape[2:]) for _ in range(2)]
        stats, spare = self.buffers
        # the three local means (warped, warped^2, fixed * warped) as one 3-channel box filter
        stats[:, 0:1].copy_(warped)
        torch.mul(warped, warped, out=stats[:, 1:2])
        torch.mul(self.f, warped, out=stats[:, 2:3])
        w = [1.0 / self.window] * self.window
        for axis in range(3):
            stats, spare = _filter_axis(stats, w, axis, out=spare), stats
        self.buffers = [stats, spare]
        mm = stats[:, 0:1]
        vm = stats[:, 1:2].addcmul_(mm, mm, value=-1).clamp_min_(0)
        cross = stats[:, 2:3].addcmul_(self.mf, mm, value=-1)
        out, scratch = spare[:, 0:1], spare[:, 1:2]
        # 2 cross / (vf vm + eps) * ((f - mf) - cross / (vm + eps) * (warped - mm))
        torch.sub(warped, mm, out=out).mul_(cross).div_(torch.add(vm, 1e-5, out=scratch))
        torch.sub(self.fc, out, out=out).mul_(cross).mul_(2.0)
        return out.div_(torch.mul(self.vf, vm, out=scratch).add_(1e-5))


class _LNCCTerm:
    """The LNCC similarity of one level: its loss gradient with respect to the field."""

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, window: int):
        self.moving, self.lncc = moving, _LNCC(fixed, window)

    def gradient(self, warp, weight=None, moving_mask=None, out=None) -> torch.Tensor:
        """At the field ``warp.set_field`` was last given; into ``out (1, 3, *S)``."""
        warped = warp(self.moving, padding="border")
        force = self.lncc.force(warped).neg_()
        if weight is not None:
            force.mul_(weight)
        if moving_mask is not None:
            force.mul_(warp(moving_mask))
        return _gradient(warped, force, out)


class _MINDTerm:
    """MIND-SSC (``core.losses.mind_ssc``) of both images on one level, computed once; each step
    warps the moving descriptors and takes the gradient of their squared difference from the
    fixed ones, ``sum_c r_c grad(D_c)``, in closed form."""

    REACH = 3  # voxels a descriptor reads around its own: patch radius 1 + neighbour offset 2

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor):
        self.fixed_d, self.moving_d = losses.mind_ssc(fixed), losses.mind_ssc(moving)

    def gradient(self, warp, weight=None, moving_mask=None, out=None) -> torch.Tensor:
        """At the field ``warp.set_field`` was last given; into ``out (1, 3, *S)``."""
        warped = warp(self.moving_d, padding="border")  # (1, 12, *S)
        residual = warped - self.fixed_d
        if weight is not None:
            residual.mul_(weight)
        if moving_mask is not None:
            residual.mul_(warp(moving_mask))
        g = (torch.zeros(1, 3, *warped.shape[2:], dtype=warped.dtype, device=warped.device)
             if out is None else out.zero_())
        for a, diff in _interior_differences(warped):
            _interior(g[:, a:a + 1], a).copy_(
                diff.mul_(_interior(residual, a)).sum(dim=1, keepdim=True))
        return g


def _eroded(mask: torch.Tensor, reach: int) -> torch.Tensor:
    """``mask (1, 1, *S)`` where its whole ``reach``-voxel neighbourhood is inside it: with MIND
    descriptors a lesion's edge would otherwise still pull through the voxels around it."""
    return -F.max_pool3d(-mask, 2 * reach + 1, stride=1, padding=reach)


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
            s_a = _interior(step[:, a:a + 1], a)
            _interior(out, a).addcmul_(u.narrow(a + 2, 2, n - 2), s_a, value=0.5).addcmul_(
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


def _to_mm(u: torch.Tensor, grid: geometry.Grid) -> torch.Tensor:
    m = torch.as_tensor(grid.array_to_physical()[:3, :3], dtype=u.dtype)
    return torch.einsum("ab,b...->a...", m, u[0])[None]


def _to_voxels(d: torch.Tensor, grid: geometry.Grid) -> torch.Tensor:
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
             else _to_voxels(move_field(d_mm, grid, level), level)).to(device)
        fixed = fixed_at(level, scale).to(device)
        moving = moving_at(level, scale).to(device)
        term = (_MINDTerm(fixed, moving) if schedule.similarity == "mind"
                else _LNCCTerm(fixed, moving, schedule.window))
        warp = _Warper(level.shape, device)
        weight, moving_mask = (None, None) if masks is None else (
            None if m is None else m.to(device) for m in masks(level))
        if schedule.similarity == "mind":  # a descriptor reads 3 voxels around its own
            weight, moving_mask = (None if m is None else _eroded(m, _MINDTerm.REACH)
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
            grad, spare = _gaussian_into(term.gradient(warp, weight, moving_mask, out=work),
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
            step, spare = _gaussian_into(step, schedule.step_sigma, spare)
            composed = _compose_first_order(u, step, out=spare)
            u, spare = _gaussian_into(composed, schedule.field_sigma, u)
            work = step
            done += 1
            if progress is not None:
                progress(done / total)
        d_mm, grid = _to_mm(u.cpu(), level), level
        del fixed, moving, term, warp, m1, m2, u, weight, moving_mask, work, spare
        if timings is not None:
            timings[f"optimising {scale:g} mm"] = round(time.perf_counter() - level_started, 3)
    if d_mm is None:
        return torch.zeros(3, *fixed_grid.shape)
    return move_field(d_mm, grid, fixed_grid)[0]
