"""Checks that a written output file is whole.

ITK's NIfTI writer does not raise when the disk fills: it prints "wrote only N of M bytes" (or,
for .nii.gz, nothing) and leaves a truncated file. The check compares the file with its own
header: an uncompressed file holds exactly ``vox_offset + voxels * bitpix / 8`` bytes; a gzip
file ends with that length (mod 2**32) in its trailer, which zlib writes last, after every
block. Other writers used here raise on a failed write (Python's files, matplotlib; ITK's
MetaImage and NRRD writers); a transform file is read back.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

from EOIRRegistrationLib.core.errors import OutputError
from EOIRRegistrationLib.core.nifti_data import parse_header


def nifti_length(head: bytes) -> int:
    """Bytes of header plus voxel data that a NIfTI-1 or NIfTI-2 header announces."""
    header = parse_header(head)
    if header is None:
        raise ValueError("no NIfTI header")
    return header["offset"] + header["voxels"] * header["bitpix"] // 8


def check_written(path) -> None:
    """Raise ``OutputError`` when ``path`` (a file or a folder of them) is missing or short."""
    path = Path(path)
    if path.is_dir():
        for child in sorted(path.iterdir()):
            check_written(child)
        return
    if not path.is_file():
        raise OutputError(f"{path.name} was not written")
    name = path.name.lower()
    try:
        if name.endswith(".nii"):
            with open(path, "rb") as f:
                expected = nifti_length(f.read(540))
            found = os.path.getsize(path)
        elif name.endswith(".nii.gz"):
            with gzip.open(path, "rb") as f:
                expected = nifti_length(f.read(540)) % 2 ** 32
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                found = struct.unpack("<I", f.read(4))[0]
        elif name.endswith(".tfm"):
            import SimpleITK as sitk
            sitk.ReadTransform(str(path))
            return
        else:
            return
    except (OSError, EOFError, ValueError, RuntimeError, zlib.error, struct.error) as exc:
        raise OutputError(f"{path.name} was written incompletely (the disk may be full): "
                          f"{exc.__class__.__name__}: {exc}") from exc
    if found != expected:
        raise OutputError(f"{path.name} was written incompletely (the disk may be full): "
                          f"length {found} where its header announces {expected}")
