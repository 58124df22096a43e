"""Physical geometry of 3D images: the boundary between array voxels and LPS millimetres.

* Physical space is ITK's / DICOM's **LPS**, in millimetres (Slicer's RAS is converted in the
  Slicer bridge only: negate x and y).
* ``Grid`` holds an image's geometry the ITK way: ``size``, ``spacing`` and ``origin`` in index
  order (i, j, k) = (x, y, z), and ``direction`` as a 3x3 matrix whose *columns* are the index axes'
  unit vectors in LPS. A point is ``x = origin + direction @ diag(spacing) @ (i, j, k)``.
* Tensors follow the spatial core's array order (k, j, i) (see ``spatial.py``), so the matrices
  built here map **array-order** voxel coordinates ``p = (k, j, i)`` to LPS and back. They are
  built once per grid; the network never sees origin or direction.
* Resampling reproduces ITK's linear / nearest interpolators: a point is inside an image when its
  continuous index lies in ``[-0.5, size - 0.5)`` on every axis (ITK's buffer test); inside, the
  border voxels are replicated; outside, the value is 0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from EOIRRegistrationLib.core import spatial


@dataclass(frozen=True)
class Grid:
    """Geometry of a 3D image in ITK index order (see the module docstring)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major, columns = index axes in LPS

    @staticmethod
    def from_image(image: sitk.Image) -> Grid:
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        return Grid(tuple(int(s) for s in image.GetSize()), tuple(image.GetSpacing()),
                    tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (k, j, i) of an image on this grid."""
        return tuple(reversed(self.size))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_physical(self) -> np.ndarray:
        """4x4 matrix: homogeneous ITK index (i, j, k) -> LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def array_to_physical(self) -> np.ndarray:
        """4x4 matrix: homogeneous array-order voxel (k, j, i) -> LPS mm."""
        flip = np.eye(4)
        flip[:3, :3] = np.eye(3)[::-1]
        return self.index_to_physical() @ flip

    def physical_to_array(self) -> np.ndarray:
        return np.linalg.inv(self.array_to_physical())

    def center(self) -> np.ndarray:
        """LPS position of the centre of the voxel block."""
        idx = (np.asarray(self.size, dtype=np.float64) - 1.0) / 2.0
        return (self.index_to_physical() @ np.append(idx, 1.0))[:3]


def working_grid(reference: Grid, spacing: Sequence[float], multiple: int = 16,
                 min_size: int = 16) -> Grid:
    """A grid in the reference image's frame (same direction and centre) with the given spacing,
    covering the reference's field of view, each size padded up to a multiple of ``multiple``."""
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"working spacing must be 3 positive values (mm), got {spacing}")
    extent = np.asarray(reference.size) * np.asarray(reference.spacing)
    size = np.ceil(extent / np.asarray(spacing) - 1e-6).astype(int)
    size = np.maximum(size, min_size)
    size = (np.ceil(size / multiple) * multiple).astype(int)
    m = reference.direction_matrix @ np.diag(spacing)
    origin = reference.center() - m @ ((size - 1.0) / 2.0)
    return Grid(tuple(int(s) for s in size), spacing, tuple(float(o) for o in origin),
                reference.direction)


def sub_grid(grid: Grid, start, shape) -> Grid:
    """The block of ``grid``'s voxels from array index ``start`` (k, j, i), ``shape`` voxels
    (k, j, i): same spacing and direction, origin at the block's first voxel, so the block's
    voxel p is ``grid``'s voxel start + p exactly."""
    start_ijk = np.asarray(tuple(reversed([int(v) for v in start])), dtype=np.float64)
    origin = grid.index_to_physical() @ np.append(start_ijk, 1.0)
    return Grid(tuple(int(v) for v in reversed(shape)), grid.spacing,
                tuple(float(v) for v in origin[:3]), grid.direction)


#: voxels per slab of the full-resolution stages (a few float32 temporaries of 3 channels:
#: ~0.2 GB each slab)
SLAB_VOXELS = 1 << 22


def slabs(grid: Grid, voxels: int | None = None):
    """``(k0, k1, sub_grid)`` blocks of whole k slices of ``grid``, about ``voxels`` each
    (default ``SLAB_VOXELS``): the full-resolution stages go slab by slab, so no temporary
    holds the whole grid."""
    nk, nj, ni = grid.shape
    step = max(1, (voxels or SLAB_VOXELS) // (nj * ni))
    for k0 in range(0, nk, step):
        k1 = min(nk, k0 + step)
        yield k0, k1, sub_grid(grid, (k0, 0, 0), (k1 - k0, nj, ni))


def array_coords_of(target: Grid, source: Grid, displacement: torch.Tensor | None = None,
                    affine: np.ndarray | None = None, device=None) -> torch.Tensor:
    """Array-order voxel coordinates in ``source`` of every voxel of ``target``: ``(1, 3, *shape)``.

    The point mapping is ``q = A @ x + d(x)`` for a target voxel at LPS ``x``, with ``A`` an optional
    4x4 LPS affine (default identity) and ``d`` an optional LPS-mm displacement ``(3, *target.shape)``
    stored on the target grid (channels x, y, z).
    """
    t2p = target.array_to_physical()
    if affine is not None:
        t2p = np.asarray(affine, dtype=np.float64) @ t2p
    dtype = torch.float32 if displacement is None else displacement.dtype
    m = torch.as_tensor(source.physical_to_array() @ t2p, dtype=torch.float64)
    p = spatial.identity_grid(target.shape, device=device, dtype=dtype)
    # Homogeneous transform done per channel to avoid a (4, N) copy of the grid.
    lin = m[:3, :3].to(dtype=dtype, device=p.device)
    off = m[:3, 3].to(dtype=dtype, device=p.device)
    coords = torch.einsum("ab,b...->a...", lin, p) + off.view(3, 1, 1, 1)
    if displacement is not None:
        if tuple(displacement.shape) != (3, *target.shape):
            raise ValueError(f"displacement must be (3, {target.shape}), got "
                             f"{tuple(displacement.shape)}")
        to_array = torch.as_tensor(source.physical_to_array()[:3, :3], dtype=dtype,
                                   device=p.device)
        coords = coords + torch.einsum("ab,b...->a...", to_array, displacement.to(p.device))
    return coords.unsqueeze(0)


def _source_index_map(target: Grid, source: Grid, affine=None) -> np.ndarray:
    """4x4: ``target`` array index (k, j, i) -> ``source`` array index, through ``affine``."""
    t2p = target.array_to_physical()
    if affine is not None:
        t2p = np.asarray(affine, dtype=np.float64) @ t2p
    return source.physical_to_array() @ t2p


def index_lines(row, shape, dtype=torch.float32) -> list:
    """``p -> row[0] k + row[1] j + row[2] i + row[3]`` over the array indices ``p = (k, j, i)``
    of ``shape``, as three lines along the axes, shaped to broadcast, whose sum is its value at
    every voxel (float64 products, each line rounded once; the offset in the first). Maps
    affine in the index (a coordinate of another grid, an affine's displacement) cost one
    full pass this way instead of a grid of positions and a matrix product."""
    return [(torch.arange(n, dtype=torch.float64) * float(row[a]) + (float(row[3]) if a == 0 else 0.0))
            .to(dtype).view([n if b == a else 1 for b in range(3)]) for a, n in enumerate(shape)]


def corner_coords(target: Grid, source: Grid, affine=None) -> torch.Tensor:
    """``array_coords_of(target, source, affine=affine)`` at ``target``'s 8 corner voxels only,
    ``(1, 3, 2, 2, 2)``: the map is affine in the index, so these hold its extremes (``reach``)."""
    m = _source_index_map(target, source, affine)
    corners = np.stack(np.meshgrid(*[[0, n - 1] for n in target.shape], indexing="ij"))
    coords = np.einsum("ab,b...->a...", m[:3, :3], corners) + m[:3, 3].reshape(3, 1, 1, 1)
    return torch.as_tensor(coords, dtype=torch.float32)[None]


def sample_through_like_itk(image: torch.Tensor, source: Grid, target: Grid, affine=None,
                            displacement: torch.Tensor | None = None, mode: str = "linear",
                            start=None, full_shape=None) -> torch.Tensor:
    """``image (B, C, *source.shape)`` read at every voxel of ``target`` like ITK's resampler:
    at the source array coordinates of ``array_coords_of(target, source, displacement, affine)``
    (``q = A x + d(x)``, LPS mm), border-replicated interpolation inside ``[-0.5, size - 0.5)``
    per axis, 0 outside. ``mode``: "linear" or "nearest".

    start, full_shape: ``image`` is the block from array index ``start`` of an image of
    ``full_shape``: the same values as sampling the whole image wherever the points'
    interpolation neighbours lie in the block (``reach``).

    In a few passes: the sampling grid is written in ``grid_sample``'s own layout, each
    coordinate as the sum of three lines along the target's axes (the map is affine in its
    index) plus the displacement's term, and the inside test read from it (float32 coordinates
    without a displacement, to about 1e-5 voxel). A brain's 1 mm image twice as fast as
    building the coordinates and sampling them, without their full-size temporaries."""
    shape = tuple(target.shape)
    block = tuple(image.shape[2:])
    full = tuple(full_shape or block)
    offset = tuple(start or (0, 0, 0))
    m = _source_index_map(target, source, affine)
    dtype = torch.float32 if displacement is None else displacement.dtype
    to_array = None if displacement is None else torch.as_tensor(
        source.physical_to_array()[:3, :3], dtype=dtype)
    grid = torch.empty(1, *shape, 3, dtype=dtype, device=image.device)
    inside = torch.ones(shape, dtype=torch.bool, device=image.device)
    coord = torch.empty(shape, dtype=dtype, device=image.device)
    for c in range(3):  # source array axis c = grid_sample's channel 2 - c
        lines = index_lines(m[c], shape, dtype)
        torch.add(lines[0] + lines[1], lines[2], out=coord)  # one full pass
        if displacement is not None:
            for b in range(3):
                coord.add_(displacement[b].to(dtype), alpha=float(to_array[c, b]))
        inside &= coord >= -0.5
        inside &= coord < full[c] - 0.5
        scale = 2.0 / max(block[c] - 1, 1)
        torch.mul(coord, scale, out=grid[0, ..., 2 - c]).add_(-1.0 - offset[c] * scale)
    out = spatial.grid_sample(image, grid.to(image.dtype),
                              mode="bilinear" if mode == "linear" else "nearest", padding="border")
    return out.mul_(inside)


def reach(coords: torch.Tensor, shape, halo) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, stop) array indices of the block of an image of ``shape`` that linear
    interpolation at ``coords (1, 3, *T)`` reads, widened by ``halo`` voxels per axis (a
    filter's reach) and clipped to the image."""
    start, stop = [], []
    for axis, n in enumerate(shape):
        c = coords[0, axis].clamp(0, n - 1)
        start.append(max(0, int(math.floor(float(c.min()))) - int(halo[axis]) - 1))
        stop.append(min(n, int(math.ceil(float(c.max()))) + int(halo[axis]) + 2))
    return tuple(start), tuple(stop)


def image_to_tensor(image: sitk.Image, dtype=torch.float32) -> torch.Tensor:
    """Scalar SimpleITK image -> tensor (1, 1, k, j, i)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("expected a scalar image, got "
                         f"{image.GetNumberOfComponentsPerPixel()} components per voxel")
    # np.array copies: the tensor must not alias the image's buffer (a float64 image would
    # otherwise be shared, and freed with the image). Straight to the wanted precision: one
    # rounding either way, and no float64 copy of a CT.
    wanted = np.float32 if dtype == torch.float32 else np.float64
    arr = np.array(sitk.GetArrayViewFromImage(image), dtype=wanted)
    return torch.from_numpy(arr).to(dtype)[None, None]


def tensor_to_image(array: torch.Tensor | np.ndarray, grid: Grid,
                    pixel_type=sitk.sitkFloat32) -> sitk.Image:
    """Array (k, j, i) -> scalar SimpleITK image on ``grid``."""
    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    arr = np.squeeze(arr)
    if arr.shape != grid.shape:
        raise ValueError(f"array shape {arr.shape} does not match grid shape {grid.shape}")
    img = sitk.Cast(sitk.GetImageFromArray(arr), pixel_type)
    return grid.apply_to(img)


def displacement_to_image(displacement: torch.Tensor | np.ndarray, grid: Grid) -> sitk.Image:
    """LPS-mm displacement (3, k, j, i) with channels (x, y, z) -> ITK vector image (float64), the
    form ``sitk.DisplacementFieldTransform`` and displacement-field files use."""
    arr = displacement.detach().cpu().numpy() if isinstance(displacement, torch.Tensor) \
        else np.asarray(displacement)
    if arr.shape != (3, *grid.shape):
        raise ValueError(f"displacement shape {arr.shape} != (3, {grid.shape})")
    img = sitk.GetImageFromArray(np.moveaxis(arr, 0, -1).astype(np.float64), isVector=True)
    return grid.apply_to(img)


def displacement_from_image(image: sitk.Image) -> tuple[torch.Tensor, Grid]:
    """ITK vector displacement image -> (LPS-mm tensor (3, k, j, i) float64, its grid)."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError("a displacement field must be a 3D image with 3 components per voxel")
    arr = sitk.GetArrayFromImage(image).astype(np.float64)
    return torch.from_numpy(np.moveaxis(arr, -1, 0).copy()), Grid.from_image(image)
