"""Compute-device choice. Never assumes CUDA: "auto" means CUDA when usable, else CPU."""
from __future__ import annotations

import torch

from EOIRRegistrationLib.core.errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str | torch.device) -> torch.device:
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").lower()
    if spec == "gpu":
        spec = "cuda"
    if spec not in DEVICE_CHOICES and not spec.startswith("cuda:"):
        raise DeviceError(f"unknown device {spec!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was requested but no CUDA GPU is usable here (torch "
                          f"{torch.__version__}, built with CUDA: {torch.version.cuda or 'no'}); "
                          "use --device cpu or auto")
    return torch.device(spec)


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text
            or "not enough memory" in text)  # the last: torch's CPU allocator
