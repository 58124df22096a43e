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


# How a coarser grid is asked for, on the command line and in Slicer.
COARSER_SPACING = ("a coarser working spacing (eoir-register --working-spacing X Y Z, in mm; "
                   "Slicer: Advanced > Working spacing)")
# torch's CPU allocator: "DefaultCPUAllocator: can't allocate memory: you tried to allocate N
# bytes. Error code 12 (Cannot allocate memory)" (torch 2.13), "not enough memory" (older);
# CUDA: "CUDA out of memory"; C++ (SimpleITK): std::bad_alloc.
OUT_OF_MEMORY_TEXTS = ("out of memory", "not enough memory", "can't allocate memory",
                       "cannot allocate memory", "bad_alloc")


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (isinstance(exc, (torch.OutOfMemoryError, MemoryError))
            or any(t in text for t in OUT_OF_MEMORY_TEXTS))
