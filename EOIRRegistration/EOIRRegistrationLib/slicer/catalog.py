"""Bundled models listed with their model cards, and a GPU guess, all without importing torch
(the Slicer panel fills its choices before torch is installed)."""
from __future__ import annotations

import json
import logging
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from EOIRRegistrationLib.engine.options import DEFAULT_MODEL

BUNDLED_MODELS_DIR = Path(__file__).resolve().parents[1] / "bundled_models"


def gpuProbablyAvailable() -> bool:
    """Whether a CUDA GPU is likely usable, *without importing torch* when it is not loaded yet
    (an NVIDIA driver is present). Once torch is loaded its own answer is used."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return bool(torch.cuda.is_available())
        except Exception:  # a broken CUDA setup must not break the panel
            return False
    if os.path.exists("/proc/driver/nvidia/version"):
        return True
    import shutil

    return shutil.which("nvidia-smi") is not None


@dataclass(frozen=True)
class BundledModel:
    name: str
    path: str
    description: str


class _CardOnlyUnpickler(pickle.Unpickler):
    """Reads the plain-Python parts of a ``torch.save`` payload (the model card) without torch:
    tensors and storages come back as None. Only containers and builtins are ever constructed."""

    _ALLOWED = {("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            import collections

            return getattr(collections, name)
        if module == "builtins" and name in ("set", "frozenset", "slice", "complex"):
            return getattr(__import__("builtins"), name)
        return lambda *args, **kwargs: None

    def persistent_load(self, pid):
        return None


def _readCardWithoutTorch(path: Path) -> dict:
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        with open(sidecar, encoding="utf-8") as f:
            data = json.load(f)
        return data.get("card", data) if isinstance(data, dict) else {}
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pickles:
            return {}
        with archive.open(pickles[0]) as f:
            payload = _CardOnlyUnpickler(f).load()
    card = payload.get("card") if isinstance(payload, dict) else None
    return dict(card) if isinstance(card, dict) else {}


def listBundledModels() -> list[BundledModel]:
    """Models shipped in ``EOIRRegistrationLib/bundled_models`` with the one-line description of
    their model card, read without importing torch (a ``<name>.json`` card next to the ``.pt``
    file if present, else the card inside the file). The engine's default model comes first."""
    models = []
    if not BUNDLED_MODELS_DIR.is_dir():
        return models
    for path in sorted(BUNDLED_MODELS_DIR.glob("*.pt")):
        try:
            description = str(_readCardWithoutTorch(path).get("description", "")).strip()
        except Exception as exc:  # a damaged file must not break the panel; the engine reports it
            logging.warning("EOIRRegistration: cannot read the card of %s: %s", path, exc)
            description = ""
        models.append(BundledModel(path.stem, str(path), description.splitlines()[0]
                                   if description else ""))
    models.sort(key=lambda m: (m.name != DEFAULT_MODEL, m.name))
    return models
