"""Model files: constructor config + weights + model card in one file that loads without running code.

A model file is a ``torch.save`` of a plain dict (tensors, strings, numbers, lists, dicts only),
read back with ``torch.load(..., weights_only=True)``::

    {"format": "eoir-registration-model", "format_version": 1,
     "architecture": "eoir", "config": {...}, "state_dict": {...}, "card": {...}}

The card records training data, working spacing (mm, ITK order x, y, z), intensity normalisation,
validation figures and a one-line description. Identity grids are never stored.
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from EOIRRegistrationLib.core.errors import ModelFileError
from EOIRRegistrationLib.core.intensity import DEFAULT_NORMALIZATION
from EOIRRegistrationLib.engine.options import DEFAULT_MODEL
from EOIRRegistrationLib.models import ARCHITECTURES, build_model

FORMAT = "eoir-registration-model"
FORMAT_VERSION = 1
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "bundled_models"


@dataclass
class LoadedModel:
    name: str
    path: str
    architecture: str
    model: torch.nn.Module
    card: dict = field(default_factory=dict)

    @property
    def working_spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.card.get("working_spacing_mm", (2.0, 2.0, 2.0)))

    @property
    def normalization(self) -> dict:
        return dict(self.card.get("intensity_normalization", DEFAULT_NORMALIZATION))


@dataclass
class ModelInfo:
    name: str
    path: str
    description: str
    card: dict


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def model_payload(model: torch.nn.Module, card: dict) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION,
            "architecture": model.architecture, "config": model.config(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "card": card}


def save_model(path: str | os.PathLike, model: torch.nn.Module, card: dict) -> None:
    atomic_torch_save(model_payload(model, card), path)


def read_payload(path: str | os.PathLike) -> dict:
    """Read a model or checkpoint file safely; any failure becomes a ModelFileError."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a model file (a trained model is the "
                             "model.pt in eoir-train's output folder)")
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    payload = _load_weights_only(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path} is a torch file but not an EOIRRegistration model "
                             f"(missing format tag {FORMAT!r})")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(f"{path} has model format version {payload['format_version']}; "
                             f"this version of EOIRRegistration reads up to {FORMAT_VERSION}")
    return payload


def _load_weights_only(path: Path):
    """``torch.load(weights_only=True)`` with errors of our own: torch's suggest retrying with
    ``weights_only=False``, which would let the file run code (they are not chained here)."""
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise ModelFileError(f"{path} is not a readable EOIRRegistration model file: not the zip "
                             f"archive torch.save writes ({path.stat().st_size} bytes: random "
                             "bytes, another format, or a file cut short in copying)")
    try:  # torch does not check the archive's CRC-32s: changed bytes would load as weights
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        damaged = f"? ({exc})"
    if damaged:
        raise ModelFileError(f"{path} is a damaged model file: its part {damaged} does not "
                             "match the archive's checksum (changed in copying or on disk)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols, then refuses
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a reference to {found[1]}" if found else "objects"
        error = ModelFileError(f"{path} is refused: it holds {what} besides tensors and plain "
                               "data, which could run code when loaded; EOIRRegistration model "
                               "files hold weights only (eoir-train writes them)")
    except Exception as exc:  # a damaged archive: torch raises RuntimeError, EOFError, ...
        first = str(exc).split(". ")[0].splitlines()[0] if str(exc) else ""
        error = ModelFileError(f"{path} is not a readable EOIRRegistration model file (corrupt or "
                               f"truncated): {exc.__class__.__name__}"
                               + (f": {first}" if first and "weights_only" not in first else ""))
    raise error


def model_from_payload(payload: dict, path: str | os.PathLike, name: str | None = None) -> LoadedModel:
    arch = payload.get("architecture")
    if arch not in ARCHITECTURES:
        raise ModelFileError(f"{path}: unknown model architecture {arch!r} (known: "
                             f"{', '.join(sorted(ARCHITECTURES))})")
    try:
        model = build_model(arch, payload.get("config", {}))
        model.load_state_dict(payload["state_dict"], strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ModelFileError(f"{path}: weights do not match the stored {arch} configuration: "
                             f"{' '.join(lines[:2])[:300]}") from exc
    model.eval()
    card = dict(payload.get("card") or {})
    return LoadedModel(name or card.get("name") or Path(path).stem, str(path), arch, model, card)


def load_model(path: str | os.PathLike, name: str | None = None) -> LoadedModel:
    path = Path(path)
    return model_from_payload(read_payload(path), path, name)


def list_bundled_models() -> list[ModelInfo]:
    """Models shipped with the engine, default first."""
    infos = []
    for p in sorted(BUNDLED_DIR.glob("*.pt")):
        try:
            card = read_payload(p).get("card", {})
        except ModelFileError as exc:
            card = {"description": f"unreadable: {exc}"}
        infos.append(ModelInfo(p.stem, str(p), card.get("description", ""), card))
    infos.sort(key=lambda i: (i.name != DEFAULT_MODEL, i.name))
    return infos


def resolve_model(spec) -> LoadedModel:
    """A LoadedModel from a LoadedModel, a bundled name ("default" = the default model) or a path."""
    if isinstance(spec, LoadedModel):
        return spec
    if spec is None or spec == "default":
        spec = DEFAULT_MODEL
    spec = str(spec)
    bundled = BUNDLED_DIR / f"{spec}.pt"
    if bundled.is_file():
        return load_model(bundled, spec)
    if os.path.sep in spec or spec.endswith(".pt") or Path(spec).exists():
        return load_model(spec)
    names = ", ".join(i.name for i in list_bundled_models()) or "none installed"
    raise ModelFileError(f"no bundled model named {spec!r} (bundled: {names}); give a path to a "
                         "model file instead")
