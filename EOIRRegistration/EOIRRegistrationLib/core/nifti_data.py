"""What ITK's NIfTI reader hides, found by reading the voxel data block ourselves.

ITK reads NIfTI-1, NIfTI-2 and Analyze 7.5 through nifti1_io, whose ``nifti_read_buffer`` fills
the part of a short (truncated) data block with zeros and replaces every NaN or infinite float
voxel by 0, without an error (SimpleITK 2.5 / ITK 5.4: a .nii or .nii.gz cut in half reads as an
image whose second half is 0; NaN and Inf read as 0). Other formats' readers raise on a short
file (MetaImage, NRRD) and keep NaN as NaN, which the engine refuses.

``data_problem(path)`` parses the header (sizeof_hdr, dim, datatype, bitpix, vox_offset, magic;
either byte order), then streams the data block (gzip or not) in chunks: the bytes present
against those the header promises, and the float voxels' finiteness.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

#: NIfTI datatype codes whose voxels can be NaN/Inf -> numpy type (complex: two floats per voxel)
_FLOAT_TYPES = {16: "f4", 64: "f8", 32: "f4", 1792: "f8"}
_CHUNK = 1 << 24  # bytes per read


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _stream(path: Path):
    """The file's bytes in chunks, decompressed when it is gzip; a gzip stream that ends before
    its end marker simply ends (the caller counts the bytes)."""
    with open(path, "rb") as f:
        if not _is_gzip(path):
            while chunk := f.read(_CHUNK):
                yield chunk
            return
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while compressed := f.read(_CHUNK // 16):  # inflates to several times its size
            while compressed:
                try:
                    yield inflate.decompress(compressed)
                except zlib.error:
                    return  # corrupt: what came before is all there is
                compressed = inflate.unused_data if inflate.eof else b""
                if inflate.eof:  # another gzip member may follow
                    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)


def _read_head(path: Path, n: int) -> bytes:
    head = b""
    for chunk in _stream(path):
        head += chunk
        if len(head) >= n:
            break
    return head[:n]


def _header(path: Path) -> dict | None:
    """Header fields of a NIfTI-1/2 or Analyze file; None when it is neither."""
    return parse_header(_read_head(path, 540))


def parse_header(head: bytes) -> dict | None:
    """Header fields from the first 540 bytes of a NIfTI-1/2 or Analyze file (voxels, datatype,
    bitpix, vox_offset, byte order, single file or not); None when it is neither."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dim = struct.unpack(order + "8h", head[40:56])
            datatype, bitpix = struct.unpack(order + "2h", head[70:74])
            offset = struct.unpack(order + "f", head[108:112])[0]
            single = head[344:348] == b"n+1\0"
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", head[12:16])
            dim = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            single = head[4:8] == b"n+2\0"
            break
    else:
        return None
    n = int(dim[0])
    if not 1 <= n <= 7 or min(dim[1:n + 1]) < 1 or bitpix <= 0:
        return None  # not a header this check understands: ITK's reader decides
    return {"order": order, "voxels": int(np.prod([int(d) for d in dim[1:n + 1]])),
            "datatype": int(datatype), "bitpix": int(bitpix), "single": single,
            "offset": int(offset)}


def _companion(path: Path, want_header: bool) -> Path:
    """The .hdr(.gz) of a .img(.gz) (``want_header``) or the .img(.gz) of a .hdr(.gz); ``path``
    itself otherwise (a single-file NIfTI, or no companion on disk)."""
    name = path.name
    for hdr, img in ((".hdr.gz", ".img.gz"), (".hdr", ".img")):
        if name.lower().endswith(img if want_header else hdr):
            base = name[:-len(hdr)] if not want_header else name[:-len(img)]
            for suffix in ((".hdr.gz", ".hdr") if want_header else (".img.gz", ".img")):
                if path.with_name(base + suffix).exists():
                    return path.with_name(base + suffix)
    return path


def data_problem(path: str) -> str | None:
    """Why the voxel data of the NIfTI/Analyze file ``path`` is not what ITK's reader returns
    (truncated, NaN/Inf), or None; files it cannot parse are left to ITK."""
    path = Path(path)
    header = _header(_companion(path, want_header=True))
    if header is None:
        return None
    expected = header["voxels"] * header["bitpix"] // 8
    data = path if header["single"] else _companion(path, want_header=False)
    kind = _FLOAT_TYPES.get(header["datatype"])
    dtype = np.dtype(header["order"] + kind) if kind else None
    got, bad, rest, skip = 0, 0, b"", header["offset"]
    for chunk in _stream(data):
        if skip:  # the header (and extensions) before vox_offset
            chunk, skip = chunk[skip:], max(0, skip - len(chunk))
        chunk = chunk[:expected - got]
        got += len(chunk)
        if dtype is not None and chunk:
            chunk = rest + chunk
            whole = len(chunk) - len(chunk) % dtype.itemsize
            bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk[:whole], dtype))))
            rest = chunk[whole:]
        if got >= expected:
            break
    if got < expected:
        return (f"is truncated: the header promises {expected} bytes of voxel data, the file "
                f"holds {got} ({100 * (1 - got / expected):.1f} % missing; ITK's NIfTI reader "
                "would fill them with zeros)")
    if bad:
        return (f"contains {bad} NaN or infinite values (ITK's NIfTI reader would read them "
                "as 0)")
    return None
