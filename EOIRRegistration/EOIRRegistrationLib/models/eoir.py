"""EOIR: Encoder-Only Image Registration (Chen et al., arXiv 2509.00451), re-implemented.

A tiny shared encoder (3 conv blocks, no downsampling) linearises local intensities; a feature
pyramid (trilinear x0.5, no blur) feeds small per-level flow estimators, coarse to fine. Each level
predicts a stationary velocity, integrates it by scaling and squaring, and composes the residual
step with the upsampled coarser displacement: ``u = u_res + u_up o (id + u_res)``.

Tensors follow ``spatial.py``: inputs ``(B, 1, D, H, W)`` with every pyramid axis divisible by
``2 ** (levels - 1)`` (times 2 with ``finest_level=1``); the output is a voxel displacement
``(B, 3, D, H, W)`` on the fixed grid, channel c along array axis c, ``warped = moving(p + u(p))``.

With ``input_features="mind"`` (not in the paper) the encoder sees the 12 MIND-SSC descriptors of
each image instead of its intensity, which makes the model blind to intensity changes that keep
local self-similarity (scaling, offset, inversion): a contrast-agnostic variant.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from EOIRRegistrationLib.core import losses, spatial

INPUT_FEATURES = ("intensity", "mind")
MIND_CHANNELS = 12


@dataclass
class EOIRConfig:
    """Constructor arguments; stored in every model file so a model rebuilds from the file alone."""

    channels: int = 32            # Ns: encoder width (paper 32; light variants 16, 8)
    kernel_radius: int = 1        # Ks: the middle estimator conv has (2Ks+1)^3 channels
    levels: int = 5               # pyramid levels (1, 1/2, ..., 1/2^(levels-1))
    integration_steps: int = 7    # scaling-and-squaring steps per level (0 = no integration)
    composition: str = "compose"  # "compose" (diffeomorphic, paper) or "add" (ablation)
    large_kernel: bool = False    # OASIS variant: parallel 3^3 + 5^3 + 1^3 convs + identity
    finest_level: int = 0         # 1: estimators start at 1/2 resolution, final flow upsampled x2
    pyramid_axes: tuple = (0, 1, 2)  # array axes halved per level; (1, 2) = in-plane only
    # What the encoder sees: "intensity" (the paper) or "mind" (the 12 MIND-SSC descriptors of
    # each image, computed in the model: local self-similarity, largely contrast-independent)
    input_features: str = "intensity"

    def __post_init__(self):
        self.pyramid_axes = tuple(int(a) for a in self.pyramid_axes)
        if self.composition not in ("compose", "add"):
            raise ValueError(f"EOIRConfig.composition must be 'compose' or 'add', got "
                             f"{self.composition!r}")
        if self.channels < 1 or self.levels < 1 or self.kernel_radius < 0:
            raise ValueError("EOIRConfig: channels and levels must be >= 1, kernel_radius >= 0")
        if self.finest_level not in (0, 1):
            raise ValueError("EOIRConfig.finest_level must be 0 or 1")
        if self.input_features not in INPUT_FEATURES:
            raise ValueError(f"EOIRConfig.input_features must be one of {INPUT_FEATURES}, got "
                             f"{self.input_features!r}")
        if not set(self.pyramid_axes) <= {0, 1, 2} or not self.pyramid_axes:
            raise ValueError("EOIRConfig.pyramid_axes must be a non-empty subset of (0, 1, 2)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pyramid_axes"] = list(self.pyramid_axes)
        return d


class LevelOutput(NamedTuple):
    """One pyramid level (training): composed displacement and the velocity it integrated,
    both in voxels of that level; ``factors`` = fine-to-this-level size ratio per array axis."""

    displacement: torch.Tensor
    velocity: torch.Tensor
    factors: tuple


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv3d(cin, cout, 3, padding=1), nn.InstanceNorm3d(cout),
                         nn.PReLU(1))


class LargeKernelBlock(nn.Module):
    """Sum of parallel 3^3, 5^3 and 1^3 convolutions plus identity (LKU-Net style)."""

    def __init__(self, ch: int):
        super().__init__()
        self.k3 = nn.Conv3d(ch, ch, 3, padding=1)
        self.k5 = nn.Conv3d(ch, ch, 5, padding=2)
        self.k1 = nn.Conv3d(ch, ch, 1)
        self.act = nn.PReLU(1)

    def forward(self, x):
        return self.act(self.k3(x) + self.k5(x) + self.k1(x) + x)


class Encoder(nn.Module):
    def __init__(self, ns: int, large_kernel: bool, in_channels: int = 1):
        super().__init__()
        blocks = [ConvBlock(in_channels, ns), ConvBlock(ns, 2 * ns), ConvBlock(2 * ns, ns)]
        if large_kernel:
            blocks.append(LargeKernelBlock(ns))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


class FlowEstimator(nn.Module):
    """concat(f + m, f - m) -> conv 2Ns -> conv (2Ks+1)^3 -> conv 3 = stationary velocity."""

    def __init__(self, ns: int, ks: int):
        super().__init__()
        mid = (2 * ks + 1) ** 3
        self.conv1 = nn.Conv3d(2 * ns, 2 * ns, 3, padding=1)
        self.conv2 = nn.Conv3d(2 * ns, mid, 3, padding=1)
        self.out = nn.Conv3d(mid, 3, 3, padding=1)
        # Start near the identity transform, as registration networks customarily do.
        nn.init.normal_(self.out.weight, std=1e-5)
        nn.init.zeros_(self.out.bias)

    def forward(self, fixed_feat, moving_feat):
        x = torch.cat([fixed_feat + moving_feat, fixed_feat - moving_feat], dim=1)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.out(x)


class EOIR(nn.Module):
    architecture = "eoir"

    def __init__(self, config: EOIRConfig | None = None, **kwargs):
        super().__init__()
        self.cfg = config if config is not None else EOIRConfig(**kwargs)
        c = self.cfg
        self.encoder = Encoder(c.channels, c.large_kernel,
                               MIND_CHANNELS if c.input_features == "mind" else 1)
        # estimators[0] is the finest level.
        self.estimators = nn.ModuleList(FlowEstimator(c.channels, c.kernel_radius)
                                        for _ in range(c.levels))

    def config(self) -> dict:
        return self.cfg.to_dict()

    @property
    def contrast_agnostic(self) -> bool:
        """True when the encoder sees MIND-SSC descriptors: two contrasts go through the network
        (the pipeline's "different" path keeps it)."""
        return self.cfg.input_features == "mind"

    @property
    def size_multiple(self) -> int:
        """Each pyramid axis of the input must be divisible by this."""
        return 2 ** (self.cfg.levels - 1 + self.cfg.finest_level)

    def _factors(self) -> tuple:
        return tuple(2 if a in self.cfg.pyramid_axes else 1 for a in range(3))

    def _halve(self, x):
        size = [s // f for s, f in zip(x.shape[2:], self._factors())]
        return F.interpolate(x, size=size, mode="trilinear", align_corners=False)

    def check_shape(self, shape) -> None:
        """Raises ValueError where the network cannot take an input of this array shape (D, H, W)."""
        m = self.size_multiple
        for a in self.cfg.pyramid_axes:
            if shape[a] % m:
                raise ValueError(f"EOIR: array axis {a} has size {shape[a]}, not a "
                                 f"multiple of {m}")

    def _check(self, fixed, moving):
        if fixed.dim() != 5 or fixed.shape[1] != 1 or fixed.shape != moving.shape:
            raise ValueError("EOIR expects fixed and moving of the same shape (B, 1, D, H, W), got "
                             f"{tuple(fixed.shape)} and {tuple(moving.shape)}")
        try:
            self.check_shape(tuple(fixed.shape[2:]))
        except ValueError as exc:
            raise ValueError(f"{exc} (pad the input)") from None

    def _run(self, fixed, moving, keep_levels: bool):
        self._check(fixed, moving)
        b = fixed.shape[0]
        images = torch.cat([fixed, moving], dim=0)
        if self.cfg.input_features == "mind":
            images = losses.mind_ssc(images)
        feats = self.encoder(images)
        if self.cfg.finest_level:
            feats = self._halve(feats)
        pyramid = [feats]
        for _ in range(self.cfg.levels - 1):
            pyramid.append(self._halve(pyramid[-1]))
        factors = self._factors()
        u, levels = None, []
        for lvl in range(self.cfg.levels - 1, -1, -1):
            f_l, m_l = pyramid[lvl][:b], pyramid[lvl][b:]
            if u is not None:
                u = spatial.upsample_displacement(u, factors)
                m_l = spatial.warp(m_l, u)
            v = self.estimators[lvl](f_l, m_l)
            u_res = spatial.integrate_velocity(v, self.cfg.integration_steps)
            if u is None:
                u = u_res
            elif self.cfg.composition == "compose":
                u = spatial.compose(u, u_res)
            else:
                u = u + u_res
            pyramid[lvl] = None  # free features of finished levels
            if keep_levels:
                scale = tuple(f ** (lvl + self.cfg.finest_level) for f in factors)
                levels.append(LevelOutput(u, v, scale))
        if self.cfg.finest_level:
            u = spatial.upsample_displacement(u, factors)
            if keep_levels:
                levels.append(LevelOutput(u, None, (1, 1, 1)))
        return u, levels

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Voxel displacement (B, 3, D, H, W) on the fixed grid."""
        return self._run(fixed, moving, keep_levels=False)[0]

    def pyramid_outputs(self, fixed: torch.Tensor, moving: torch.Tensor) -> list[LevelOutput]:
        """Per-level outputs, coarse to fine (the last is the full-resolution result)."""
        return self._run(fixed, moving, keep_levels=True)[1]
