"""On-the-fly synthetic training pairs: random smooth label shapes, random intensities, random
smooth diffeomorphic deformations (no data needed).

A base label map (smooth random blobs inside a random ellipsoid "head") is deformed twice by
random stationary-velocity fields, giving a fixed and a moving label map; both are rendered with one
random intensity per label, then blurred, bias-modulated and noised independently. Everything is
drawn from a ``torch.Generator`` so a seed fixes the pair. Shapes are array order (D, H, W).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from EOIRRegistrationLib.core import spatial
from EOIRRegistrationLib.core.intensity import normalize, window_of


@dataclass
class SyntheticConfig:
    shape: tuple = (64, 64, 64)
    num_labels: int = 12          # foreground labels 1..num_labels (0 = background)
    label_scale: int = 8          # blob size: noise drawn on a grid shape / label_scale
    max_velocity: float = 2.0     # std of the coarse velocity noise, voxels (before integration)
    deformation_scale: int = 8    # deformation smoothness: control grid = shape / this
    max_noise: float = 0.05
    max_bias: float = 0.3
    max_blur: float = 1.0         # voxels

    def to_dict(self):
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _uniform(gen, low, high):
    return low + (high - low) * torch.rand((), generator=gen).item()


def smooth_noise(channels, shape, scale, gen):
    """Gaussian noise on a grid ``shape / scale``, trilinearly upsampled: (1, channels, *shape)."""
    coarse = [max(2, s // scale) for s in shape]
    noise = torch.randn(1, channels, *coarse, generator=gen)
    return F.interpolate(noise, size=list(shape), mode="trilinear", align_corners=False)


def random_label_map(cfg: SyntheticConfig, gen: torch.Generator) -> torch.Tensor:
    """(1, 1, *shape) int64 label map: blobs 1..num_labels inside an ellipsoid, 0 outside."""
    shape = tuple(cfg.shape)
    blobs = smooth_noise(cfg.num_labels, shape, cfg.label_scale, gen).argmax(1, keepdim=True) + 1
    grid = spatial.identity_grid(shape)
    centre = torch.tensor([(s - 1) / 2 for s in shape]).view(3, 1, 1, 1)
    radii = torch.tensor([s * _uniform(gen, 0.33, 0.46) for s in shape]).view(3, 1, 1, 1)
    inside = (((grid - centre) / radii) ** 2).sum(0) <= 1.0
    return blobs * inside.view(1, 1, *shape)


def random_displacement(cfg: SyntheticConfig, gen: torch.Generator, amplitude: float | None = None):
    """Smooth diffeomorphic voxel displacement (1, 3, *shape): exp of a random smooth velocity."""
    amp = _uniform(gen, 0.3, 1.0) * cfg.max_velocity if amplitude is None else amplitude
    v = smooth_noise(3, tuple(cfg.shape), cfg.deformation_scale, gen) * amp
    return spatial.integrate_velocity(v, 7)


def render(labels: torch.Tensor, lut: torch.Tensor, cfg: SyntheticConfig, gen) -> torch.Tensor:
    """Label map -> image in [0, 1]: per-label intensity, blur, bias field, noise, normalisation."""
    img = lut[labels]
    sigma = _uniform(gen, 0.0, cfg.max_blur)
    if sigma > 0.1:
        img = spatial.gaussian_blur(img, sigma)
    bias = torch.exp(smooth_noise(1, tuple(cfg.shape), 16, gen) * _uniform(gen, 0, cfg.max_bias))
    img = img * bias + torch.randn(img.shape, generator=gen) * _uniform(gen, 0, cfg.max_noise)
    return normalize(img, window_of(img))


def synthetic_pair(cfg: SyntheticConfig, gen: torch.Generator) -> dict:
    """A pair with labels: fixed/moving (1,1,*S) float in [0,1], fixed_labels/moving_labels int64."""
    base = random_label_map(cfg, gen).float()
    lut = torch.rand(cfg.num_labels + 1, generator=gen)
    lut[0] = 0.0
    pair = {}
    for role in ("fixed", "moving"):
        u = random_displacement(cfg, gen)
        labels = spatial.warp(base, u, mode="nearest").long()
        pair[f"{role}_labels"] = labels
        pair[role] = render(labels, lut, cfg, gen)
    return pair
