"""Will a registration fit in memory? Its peak estimated from the grid sizes, compared with the
memory the computer has, before any work starts: a grid too large (1024^3) then fails in a
second with a clear message instead of running out after minutes.

The estimate: the inputs (held throughout) plus the largest of the stages' own needs, in
bytes per voxel of each grid, rounded up from the peaks measured on a CT-sized pair
(``benchmarks/bench_ct.py``: 512x512x320 fixed and moving images, 6.5 GB measured, 7.9 GB
estimated), with the whole fixed grid in place of the foreground box (not yet known), so it
errs on the high side.
"""
from __future__ import annotations

import resource

import numpy as np

from EOIRRegistrationLib.core import geometry
from EOIRRegistrationLib.core.errors import DeviceError
from EOIRRegistrationLib.engine import optimise
from EOIRRegistrationLib.engine.devices import COARSER_SPACING

#: per voxel of each input grid, held throughout: the image and its float32 tensor
INPUT_VOXEL_BYTES = 16
#: per voxel of the fixed grid in the full-size stages: the field in float32 and as the
#: result's float64 image, the warped image and the Jacobian, each as a tensor and an image
FIXED_VOXEL_BYTES = 56
#: per voxel of the working grid: the network's feature maps
WORKING_VOXEL_BYTES = 400
#: per voxel of the optimisation's finest level: the field, Adam's moments, LNCC's statistics
#: or, for two contrasts, MIND-SSC's 12 descriptor channels of each image and of the warped one
#: (3.0 GB peak measured on a 151x157x200 T2-like brain pair: ~390 bytes a voxel beyond the rest)
LEVEL_VOXEL_BYTES = 480
#: the interpreter, torch and the model
BASE_BYTES = 1 << 30


def estimate_bytes(fixed_voxels: int, moving_voxels: int, working_voxels: int,
                   level_voxels: int, inverse: bool = False) -> int:
    """The peak resident memory of one registration, in bytes (see the module docstring); the
    inverse adds a second field on the fixed grid and one on the moving grid."""
    full_size = ((FIXED_VOXEL_BYTES + (12 if inverse else 0)) * fixed_voxels
                 + (40 if inverse else 0) * moving_voxels)
    return int(BASE_BYTES + INPUT_VOXEL_BYTES * (fixed_voxels + moving_voxels)
               + max(full_size, WORKING_VOXEL_BYTES * working_voxels,
                     LEVEL_VOXEL_BYTES * level_voxels))


def available_bytes() -> int | None:
    """What this process may still take: the system's available memory (Linux MemAvailable),
    less when an address-space limit (RLIMIT_AS) leaves less; None where neither is known."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/status") as f:
                size = next(int(line.split()[1]) * 1024 for line in f
                            if line.startswith("VmSize:"))
            limits.append(max(0, soft - size))
        except (OSError, StopIteration):
            limits.append(soft)
    return min(limits) if limits else None


def check_fits(needed: int, shapes: dict) -> None:
    """A DeviceError when ``needed`` bytes exceed what ``available_bytes`` reports.
    shapes: a name -> (x, y, z) size of the grids, for the message."""
    available = available_bytes()
    if available is None or needed <= available:
        return
    grids = ", ".join(f"{name} {'x'.join(str(int(v)) for v in size)}"
                      for name, size in shapes.items())
    raise DeviceError(
        f"this registration needs about {needed / 2 ** 30:.1f} GB of memory ({grids}) and "
        f"{available / 2 ** 30:.1f} GB is available: close other programs, use {COARSER_SPACING},"
        " or resample the fixed image to a coarser grid (the outputs lie on its grid)")


def check_grids(fixed, moving, spacing, multiple: int, preset: str, inverse: bool) -> None:
    """``check_fits`` for the registration of two SimpleITK images: the working grid of
    ``spacing`` (mm, sizes a multiple of ``multiple``) and the finest level of ``preset`` on the
    whole fixed grid (the foreground box is not known yet)."""
    grid = geometry.Grid.from_image(fixed)
    working = geometry.working_grid(grid, spacing, multiple=multiple)
    finest = optimise.level_grid(grid, optimise.schedule_of(preset).scales_mm[-1])
    needed = estimate_bytes(int(np.prod(fixed.GetSize())), int(np.prod(moving.GetSize())),
                            int(np.prod(working.size)), int(np.prod(finest.size)), inverse)
    check_fits(needed, {"fixed grid": fixed.GetSize(), "moving grid": moving.GetSize(),
                        "working grid": working.size})
