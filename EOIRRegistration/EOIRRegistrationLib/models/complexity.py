"""Parameter and multiply-add counting (convolutions and linear layers, bias adds included).

Counts what EOIR's paper counts: every convolution's multiply-adds plus one add per output value
for the bias; normalisation, activations and warping are not counted. Inputs run for real, so the
count covers whatever the forward pass executes (e.g. the encoder on both images).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_multiply_adds(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-adds of one forward pass of ``model(*inputs)`` (run under no_grad)."""
    total = 0

    def hook(module, args, output):
        nonlocal total
        if isinstance(module, nn.modules.conv._ConvNd):
            per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
        else:  # nn.Linear
            per_out = module.in_features
        total += output.numel() * (per_out + (1 if module.bias is not None else 0))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total
