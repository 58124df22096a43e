"""Reading inputs and writing a command's outputs all-or-nothing (staged in a hidden sibling
folder, then moved in place)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

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


def check_output_dir(path, overwrite: bool, names) -> None:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output-dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"output folder {out} is not empty; pass --overwrite to replace "
                         f"this command's files in it ({', '.join(names)})")


def write_outputs(out_dir, files: dict, replaces=()) -> None:
    """Write every output into a hidden sibling folder, then move each into place: an error
    while writing leaves the output folder as it was. Files named in ``replaces`` but not
    written this time are then removed, so that a re-run leaves no stale output of an earlier
    one (e.g. an affine.tfm the new displacement does not contain). All but the last entry are
    written in parallel threads (ITK's NIfTI writer compresses outside the interpreter lock: the
    four volumes of a brain pair take ~1.5 s instead of ~2.3 s); the last one after them."""
    from concurrent.futures import ThreadPoolExecutor

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        *parallel, last = files.items()
        with ThreadPoolExecutor(max_workers=4) as pool:
            for job in [pool.submit(writer, str(staging / name)) for name, writer in parallel]:
                job.result()  # re-raises the first failure
        last[1](str(staging / last[0]))
        out.mkdir(exist_ok=True)
        for name in files:
            os.replace(staging / name, out / name)
        for name in set(replaces) - set(files):
            (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
