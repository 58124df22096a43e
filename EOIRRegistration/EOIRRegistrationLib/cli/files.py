"""Reading a command's inputs (its outputs: ``outputfolder.py``)."""
from __future__ import annotations

import os

from EOIRRegistrationLib.core.errors import InputError


def read_image(path: str, role: str):
    """Read an image with a clear error for missing or unreadable files."""
    import SimpleITK as sitk
    if not os.path.isfile(path):
        raise InputError(f"{role} file not found: {path}")
    try:
        return sitk.ReadImage(path)
    except RuntimeError as exc:
        first = [line for line in str(exc).splitlines() if line.strip()]
        raise InputError(f"cannot read {role} {path}: not an image ITK can read "
                         f"({first[-1].strip() if first else exc})") from exc
