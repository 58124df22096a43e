"""The bundled demo sample: a phantom pair with a known deformation, generated deterministically.

A smooth-label "head" phantom is drawn on an oblique, anisotropic grid. The moving image is the
phantom deformed by ``exp(-v)`` for a random smooth velocity ``v``; the fixed image is the phantom
itself. Hence ``moving(x + u(x)) = fixed(x)`` for ``u = exp(v)``: the true displacement (LPS mm,
fixed point -> moving point) is known and registration can be scored against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from EOIRRegistrationLib.core import geometry, spatial
from EOIRRegistrationLib.training.synthetic import (
    SyntheticConfig,
    random_label_map,
    render,
    smooth_noise,
)

DEMO_SHAPE = (64, 96, 96)            # array order (k, j, i)
DEMO_SPACING = (1.5, 1.5, 2.0)       # mm, ITK order (x, y, z)
DEMO_ORIGIN = (-70.0, -80.0, -60.0)
DEMO_ROTATION = (0.12, -0.08, 0.2)   # Euler angles (rad): an oblique acquisition


@dataclass
class PhantomPair:
    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image
    moving_labels: sitk.Image
    true_displacement: sitk.Image     # LPS mm on the fixed grid, fixed point -> moving point


def make_phantom_pair(seed: int = 2026, velocity: float = 2.5, shape=DEMO_SHAPE,
                      spacing=DEMO_SPACING, origin=DEMO_ORIGIN,
                      rotation=DEMO_ROTATION) -> PhantomPair:
    """The demo pair; tests shrink ``shape`` (array order). ``velocity = 0``: moving = fixed
    labels (different noise), true displacement 0."""
    gen = torch.Generator().manual_seed(seed)
    cfg = SyntheticConfig(shape=tuple(shape), num_labels=12, label_scale=8, deformation_scale=8,
                          max_noise=0.02, max_bias=0.1, max_blur=0.6)
    labels = random_label_map(cfg, gen).float()
    v = smooth_noise(3, tuple(shape), cfg.deformation_scale, gen) * velocity  # voxels
    u_true = spatial.integrate_velocity(v, 7)               # fixed -> moving, voxels
    u_inv = spatial.integrate_velocity(-v, 7)               # moving -> fixed
    moving_labels = spatial.warp(labels, u_inv, mode="nearest")
    lut = torch.rand(cfg.num_labels + 1, generator=gen)
    lut[0] = 0.0
    fixed_img = render(labels.long(), lut, cfg, gen)
    moving_img = render(moving_labels.long(), lut, cfg, gen)

    direction = sitk.Euler3DTransform((0, 0, 0), *rotation).GetMatrix()
    grid = geometry.Grid(tuple(reversed(tuple(shape))), tuple(spacing), tuple(origin), direction)
    to_lps = torch.as_tensor(grid.array_to_physical()[:3, :3], dtype=torch.float32)
    d_true = torch.einsum("ab,b...->a...", to_lps, u_true[0])
    # Scale to a CT/MR-like integer range so the demo exercises intensity normalisation.
    as_int = lambda t: geometry.tensor_to_image((t[0, 0] * 1000).round(), grid, sitk.sitkInt16)
    return PhantomPair(
        fixed=as_int(fixed_img), moving=as_int(moving_img),
        fixed_labels=geometry.tensor_to_image(labels[0, 0], grid, sitk.sitkUInt8),
        moving_labels=geometry.tensor_to_image(moving_labels[0, 0], grid, sitk.sitkUInt8),
        true_displacement=geometry.displacement_to_image(d_true, grid))


def displacement_error_mm(predicted: sitk.Image, truth: sitk.Image, mask: sitk.Image) -> dict:
    """Mean and 95th percentile of |predicted - truth| (mm) inside ``mask`` (nonzero voxels)."""
    p = sitk.GetArrayViewFromImage(predicted)
    t = sitk.GetArrayViewFromImage(truth)
    m = sitk.GetArrayViewFromImage(mask) > 0
    err = np.linalg.norm(p - t, axis=-1)[m]
    ident = np.linalg.norm(t, axis=-1)[m]
    return {"mean_error_mm": float(err.mean()), "p95_error_mm": float(np.percentile(err, 95)),
            "identity_mean_error_mm": float(ident.mean()),
            "identity_p95_error_mm": float(np.percentile(ident, 95))}
