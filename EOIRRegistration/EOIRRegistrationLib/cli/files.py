"""Reading a command's inputs, and writing displacement fields as NIfTI displacement vectors
(the rest of its outputs: ``outputfolder.py``)."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile

from EOIRRegistrationLib.core.errors import InputError
from EOIRRegistrationLib.core.nifti_data import data_problem


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


def read_images(requests) -> list:
    """``read_image`` of each ``(path or None, role)`` in threads (ITK's readers and the
    truncation check's zlib work outside the interpreter lock: a brain pair's two reads take
    about half as long); None where no path is given. The first failing request, in the order
    given, raises."""
    from concurrent.futures import ThreadPoolExecutor
    wanted = sum(1 for path, _ in requests if path)
    with ThreadPoolExecutor(max_workers=max(1, min(4, wanted))) as pool:
        jobs = [pool.submit(read_image, path, role) if path else None for path, role in requests]
        return [job.result() if job is not None else None for job in jobs]


# NIfTI-1 header (nifti1.h): sizeof_hdr (int32, 348) at byte 0, intent_code (int16) at byte 68,
# magic "n+1\0" (single .nii file) at byte 344.
NIFTI_INTENT_DISPVECT = 1006
_INTENT_CODE_OFFSET = 68


def write_displacement(field, path) -> None:
    """Write a displacement field (3-vector image in LPS mm on its grid, resampling direction:
    point x -> x + d(x)) to ``path`` (.nii or .nii.gz) as NIfTI displacement vectors: intent
    code 1006 (NIFTI_INTENT_DISPVECT), float32 vectors stored in RAS mm, the NIfTI world frame.

    That is the file Slicer writes and reads without a warning, and the one ITK's NIfTI reader
    (ITK >= 5.4: SimpleITK, ANTs, greedy, Slicer) turns back into LPS vectors on reading, so
    ``sitk.ReadImage`` returns ``field`` again. ITK writes such a file itself only for an
    ``itk::Image`` of fixed-size vectors tagged ``intent_code`` 1006; SimpleITK's variable-length
    vector images are refused ("RAS conversion requires pixel to be 3-component vector"). So x and
    y are negated here, ITK writes a plain vector image (intent 1007) with the same geometry, and
    the header's intent code is set to 1006 afterwards. Writing intent 1006 over LPS vectors
    would make every ITK reader negate x and y: a wrong field without any error."""
    import numpy as np
    import SimpleITK as sitk

    path = str(path)
    if not path.endswith((".nii", ".nii.gz")):
        raise ValueError(f"write_displacement: a NIfTI path (.nii or .nii.gz) is needed, got {path}")
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError("write_displacement: a 3D image of 3-vectors is needed, got "
                         f"{field.GetDimension()}D with {field.GetNumberOfComponentsPerPixel()} "
                         "components per pixel")
    # A view of the field, one float32 copy (k, j, i, 3): no float64 copy of a CT-sized field
    ras = sitk.GetArrayViewFromImage(field).astype(np.float32)
    ras[..., :2] *= -1.0
    image = sitk.GetImageFromArray(ras, isVector=True)
    del ras
    image.CopyInformation(field)
    if path.endswith(".nii"):
        _write_dispvect(image, path)
        return
    fd, plain = tempfile.mkstemp(suffix=".nii", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:  # the header is patched uncompressed, then the whole file gzipped
        _write_dispvect(image, plain)
        with open(plain, "rb") as src, gzip.open(path, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
    finally:
        os.remove(plain)


def _write_dispvect(image, path: str) -> None:
    """ITK writes ``image`` (RAS vectors) uncompressed; its intent code becomes 1006."""
    import SimpleITK as sitk
    sitk.WriteImage(image, path, useCompression=False)
    with open(path, "r+b") as f:
        header = f.read(348)
        order = next((o for o in "<>" if struct.unpack(o + "i", header[:4])[0] == 348), None)
        if order is None or header[344:348] != b"n+1\0":
            raise RuntimeError(f"write_displacement: ITK did not write a single-file NIfTI-1 "
                               f"header to {path}; cannot set the intent code")
        f.seek(_INTENT_CODE_OFFSET)
        f.write(struct.pack(order + "h", NIFTI_INTENT_DISPVECT))

