"""Spatial core: pure tensor functions on regular voxel grids (2D and 3D).

The one internal convention of the engine (physical units appear only at the edges, in
``geometry.py`` and ``pipeline.py``):

* An image or feature map is a tensor ``(B, C, *S)``; ``S`` are the *array axes* in the order
  ``SimpleITK.GetArrayFromImage`` / numpy give them: ``(D, H, W) = (k, j, i)`` in 3D, ``(H, W)``
  in 2D. The last array axis is ITK's first index (x).
* A displacement is a tensor ``(B, n, *S)`` with ``n = len(S)``, in **voxels** of the grid it lives
  on; channel ``c`` is the displacement along array axis ``c`` (so channel 0 is along k/z in 3D).
* A displacement ``u`` defines the map ``phi(p) = p + u(p)`` from the fixed (target) grid into the
  moving (source) grid: ``warped(p) = moving(p + u(p))`` (backward warping, resampling direction).
* ``torch.nn.functional.grid_sample`` wants normalised coordinates in reversed axis order (x first);
  we use ``align_corners=True`` there, so voxel index ``p`` on an axis of ``n`` voxels maps to
  ``2 p / (n - 1) - 1``. :func:`voxel_to_normalized` is the only place this happens.
* Resolution pyramids are cell-centred: voxel ``j`` of a grid halved along an axis covers fine
  voxels ``2j`` and ``2j + 1`` (``F.interpolate(..., align_corners=False)``). Upsampling a
  displacement x2 is therefore trilinear interpolation with ``align_corners=False`` followed by a
  multiplication of the values by exactly 2 (not ``(2n-1)/(n-1)``).
* Outside the grid, images and feature maps read as zero; displacement fields are extrapolated with
  the border value (so a constant field stays exactly constant under composition).

Identity grids are computed on the fly (cheap) and never stored in modules or checkpoints.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "identity_grid",
    "voxel_to_normalized",
    "sample",
    "grid_sample",
    "warp",
    "compose",
    "integrate_velocity",
    "upsample_displacement",
    "resize_displacement",
    "gaussian_blur",
    "downsample",
    "spatial_gradient",
]


def _check_field(u: torch.Tensor, name: str = "displacement") -> int:
    if u.dim() not in (4, 5) or u.shape[1] != u.dim() - 2:
        raise ValueError(
            f"{name} must have shape (B, n, *S) with n = len(S) in (2, 3), got {tuple(u.shape)}")
    return u.dim() - 2


def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of every grid point, shape ``(n, *shape)``; channel c = index on axis c."""
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def voxel_to_normalized(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel coordinates ``(B, n, *T)`` -> grid_sample grid ``(B, *T, n)`` (x first, [-1, 1])."""
    n = len(shape)
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], device=coords.device,
                         dtype=coords.dtype).view(1, n, *([1] * (coords.dim() - 2)))
    norm = coords * scale - 1.0
    return norm.flip(1).movedim(1, -1)


def sample(image: torch.Tensor, coords: torch.Tensor, mode: str = "linear",
           padding: str = "zeros") -> torch.Tensor:
    """Sample ``image (B, C, *S)`` at voxel coordinates ``coords (B, n, *T)`` -> ``(B, C, *T)``.

    mode: "linear" (bi/trilinear) or "nearest"; padding: "zeros" or "border".
    """
    n = image.dim() - 2
    if n not in (2, 3) or coords.dim() != n + 2 or coords.shape[1] != n:
        raise ValueError(f"sample: image {tuple(image.shape)} and coords {tuple(coords.shape)} "
                         "must be (B, C, *S) and (B, n, *T) with n = len(S) in (2, 3)")
    if mode not in ("linear", "nearest"):
        raise ValueError(f"sample: mode must be 'linear' or 'nearest', got {mode!r}")
    if coords.shape[0] != image.shape[0]:
        coords = coords.expand(image.shape[0], *coords.shape[1:])
    grid = voxel_to_normalized(coords.to(image.dtype), image.shape[2:])
    return grid_sample(image, grid, mode="bilinear" if mode == "linear" else "nearest",
                       padding=padding)


#: outputs below this many points are sampled in one call (splitting costs more than it saves)
SPLIT_SAMPLE_POINTS = 1 << 16


def grid_sample(image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear",
                padding: str = "zeros") -> torch.Tensor:
    """``F.grid_sample(image, grid, align_corners=True)``, on a CPU with one image split into
    as many batch entries as torch has threads: its 3-D CPU kernel runs the batch in parallel,
    not the points of one entry (a 160x192x224 volume: 0.31 s as one entry on 2 threads, 0.16 s
    as two). The same values; autograd takes the single call."""
    threads = torch.get_num_threads()
    rows = grid.shape[1] // max(threads, 1)
    if (image.device.type != "cpu" or threads < 2 or grid.shape[0] != 1 or rows < 1
            or grid[0, ..., 0].numel() < SPLIT_SAMPLE_POINTS
            or (torch.is_grad_enabled() and (image.requires_grad or grid.requires_grad))):
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)
    grid = grid.contiguous()
    main = rows * threads
    rest = grid.shape[2:-1]
    parts = F.grid_sample(image.expand(threads, *image.shape[1:]),
                          grid[:, :main].reshape(threads, rows, *grid.shape[2:]),
                          mode=mode, padding_mode=padding, align_corners=True)  # (n, C, rows, ...)
    out = torch.empty(1, image.shape[1], grid.shape[1], *rest, dtype=image.dtype)
    out[0, :, :main].view(image.shape[1], threads, rows, *rest).copy_(parts.transpose(0, 1))
    if main < grid.shape[1]:
        out[:, :, main:] = F.grid_sample(image, grid[:, main:], mode=mode, padding_mode=padding,
                                         align_corners=True)
    return out


def warp(image: torch.Tensor, disp: torch.Tensor, mode: str = "linear",
         padding: str = "zeros") -> torch.Tensor:
    """Backward-warp ``image`` by the voxel displacement ``disp``: ``out(p) = image(p + disp(p))``."""
    _check_field(disp)
    if image.shape[2:] != disp.shape[2:]:
        raise ValueError(f"warp: image grid {tuple(image.shape[2:])} differs from displacement "
                         f"grid {tuple(disp.shape[2:])}")
    grid = identity_grid(disp.shape[2:], disp.device, disp.dtype).unsqueeze(0)
    return sample(image, grid + disp, mode=mode, padding=padding)


def compose(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Displacement of ``phi_outer o phi_inner``: ``inner(p) + outer(p + inner(p))``.

    EOIR applies the residual step first: ``compose(outer=u_coarse_up, inner=u_residual)``.
    """
    _check_field(outer)
    _check_field(inner)
    return inner + warp(outer, inner, padding="border")


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: ``exp(v)`` as a displacement; ``u = v / 2^steps``, then ``steps``
    times ``u <- u + u(p + u)``. ``steps = 0`` returns ``v`` (no integration)."""
    _check_field(velocity, "velocity")
    if steps < 0:
        raise ValueError(f"integrate_velocity: steps must be >= 0, got {steps}")
    u = velocity / (2.0 ** steps)
    for _ in range(steps):
        u = compose(u, u)
    return u


def upsample_displacement(disp: torch.Tensor, factors: Sequence[int] | int = 2) -> torch.Tensor:
    """Upsample a voxel displacement by integer factors per array axis (cell-centred grids).

    Values are multiplied by the factor of their own axis so they stay in (fine) voxel units.
    A factor of 1 on an axis supports in-plane-only pyramids.
    """
    n = _check_field(disp)
    if isinstance(factors, int):
        factors = [factors] * n
    factors = [int(f) for f in factors]
    if len(factors) != n or min(factors) < 1:
        raise ValueError(f"upsample_displacement: need {n} integer factors >= 1, got {factors}")
    mode = "trilinear" if n == 3 else "bilinear"
    up = F.interpolate(disp, scale_factor=tuple(float(f) for f in factors), mode=mode,
                       align_corners=False)
    scale = torch.tensor(factors, dtype=disp.dtype, device=disp.device).view(1, n, *([1] * n))
    return up * scale


def resize_displacement(disp: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample a voxel displacement to another grid size covering the same extent (cell-centred),
    rescaling the values to voxels of the new grid."""
    n = _check_field(disp)
    shape = [int(s) for s in shape]
    mode = "trilinear" if n == 3 else "bilinear"
    out = F.interpolate(disp, size=shape, mode=mode, align_corners=False)
    ratios = [s / o for s, o in zip(shape, disp.shape[2:])]
    return out * torch.tensor(ratios, dtype=disp.dtype, device=disp.device).view(1, n, *([1] * n))


def _gaussian_kernel1d(sigma: float, device, dtype) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float | Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, *S)`` with sigma in voxels per array axis (0 = skip).
    Borders are replicated so a constant image stays constant."""
    n = x.dim() - 2
    if n not in (2, 3):
        raise ValueError(f"gaussian_blur: expected (B, C, *S) with 2 or 3 spatial axes, got "
                         f"{tuple(x.shape)}")
    sigmas = [float(sigma)] * n if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    conv = F.conv3d if n == 3 else F.conv2d
    b, c = x.shape[:2]
    out = x.reshape(b * c, 1, *x.shape[2:])
    for axis, s in enumerate(sigmas):
        if s <= 0:
            continue
        k = _gaussian_kernel1d(s, x.device, x.dtype)
        r = (k.numel() - 1) // 2
        view = [1] * n
        view[axis] = k.numel()
        pad = [0, 0] * n
        # F.pad lists pads from the last axis backwards.
        pad[2 * (n - 1 - axis)] = r
        pad[2 * (n - 1 - axis) + 1] = r
        out = conv(F.pad(out, pad, mode="replicate"), k.view(1, 1, *view))
    return out.reshape(b, c, *x.shape[2:])


def downsample(x: torch.Tensor, sigma: float = 1.0, axes: Sequence[int] | None = None) -> torch.Tensor:
    """Blur (sigma voxels) then halve the listed array axes (default: all), cell-centred."""
    n = x.dim() - 2
    axes = list(range(n)) if axes is None else list(axes)
    sig = [sigma if a in axes else 0.0 for a in range(n)]
    if sigma > 0:
        x = gaussian_blur(x, sig)
    size = [s // 2 if a in axes else s for a, s in enumerate(x.shape[2:])]
    mode = "trilinear" if n == 3 else "bilinear"
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def spatial_gradient(field: torch.Tensor) -> torch.Tensor:
    """Central differences (one-sided at the borders) of ``(B, C, *S)`` along each array axis.

    Returns ``(B, C, n, *S)``: ``out[:, c, a] = d field_c / d index_a`` in per-voxel units.
    """
    n = field.dim() - 2
    grads = []
    for a in range(n):
        ax = a + 2
        size = field.shape[ax]
        if size < 2:
            grads.append(torch.zeros_like(field))
            continue
        fwd = field.narrow(ax, 1, size - 1) - field.narrow(ax, 0, size - 1)  # d at half steps
        first = fwd.narrow(ax, 0, 1)
        last = fwd.narrow(ax, size - 2, 1)
        if size > 2:
            inner = 0.5 * (fwd.narrow(ax, 0, size - 2) + fwd.narrow(ax, 1, size - 2))
            grads.append(torch.cat([first, inner, last], dim=ax))
        else:
            grads.append(torch.cat([first, last], dim=ax))
    return torch.stack(grads, dim=2)
