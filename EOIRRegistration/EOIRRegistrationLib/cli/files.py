"""Reading a command's inputs (its outputs: ``outputfolder.py``)."""
from __future__ import annotations

import os

from EOIRRegistrationLib.cli.nifti_data import data_problem
from EOIRRegistrationLib.core.errors import InputError


def read_image(path: str, role: str):
    """Read an image with a clear error for missing, unreadable or truncated files, and for
    NaN/Inf that ITK's NIfTI reader would turn into 0 (``nifti_data.py``; the other readers
    raise on a short file and keep NaN, which the engine refuses)."""
    import SimpleITK as sitk
    if not os.path.isfile(path):
        raise InputError(f"{role} file not found: {path}")
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as exc:
        first = [line for line in str(exc).splitlines() if line.strip()]
        raise InputError(f"cannot read {role} {path}: not an image ITK can read "
                         f"({first[-1].strip() if first else exc})") from exc
    nifti = sitk.ImageFileReader.GetImageIOFromFileName(path) == "NiftiImageIO"
    problem = data_problem(path) if nifti else None
    if problem:
        raise InputError(f"{role} {path} {problem}")
    return image
