"""The networks (EOIR, GeoReg) and their registry: architecture name -> (class, config class).
Model files name their architecture, and the engine rebuilds the network from the stored config
through this table.

May import: ``core``.
"""
from __future__ import annotations

from EOIRRegistrationLib.models.eoir import EOIR, EOIRConfig
from EOIRRegistrationLib.models.georeg import GeoReg, GeoRegConfig

ARCHITECTURES = {"eoir": (EOIR, EOIRConfig), "georeg": (GeoReg, GeoRegConfig)}


def build_model(architecture: str, config: dict | None = None):
    """Instantiate a registered architecture from a config dict (unknown keys raise TypeError)."""
    if architecture not in ARCHITECTURES:
        raise KeyError(f"unknown model architecture {architecture!r}; known: "
                       f"{', '.join(sorted(ARCHITECTURES))}")
    model_cls, config_cls = ARCHITECTURES[architecture]
    return model_cls(config_cls(**(config or {})))
