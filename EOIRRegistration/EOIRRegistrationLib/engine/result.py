"""``RegistrationResult``: what one registration produced, the only result type of the engine.

The command line writes it to files, the Slicer worker process saves it to a folder and the panel
reads it back (:meth:`RegistrationResult.save` / :meth:`RegistrationResult.load`), and the Slicer
outputs hold their nodes plus this object. Imports no torch (the Slicer process reads results
without it).

Every image lies on the fixed image's grid. ``displacement``: 3-component float64 vectors in LPS
millimetres, resampling direction (the fixed-space point x maps to the moving-space point
x + d(x)), the initial linear alignment included. ``initial_matrix``: 4x4 LPS, fixed point ->
moving point. The two images of the inverse direction lie on the moving image's grid:
``inverse_displacement`` (LPS mm, the moving-space point y maps to the fixed-space point
y + d'(y); computed when asked for, ``engine/inverse.py``) and ``fixed_labels_in_moving``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from EOIRRegistrationLib.engine.options import RegistrationOptions

#: the images of a result, in the order they are saved
IMAGES = ("displacement", "warped", "jacobian", "folding", "warped_labels", "inverse_displacement",
          "fixed_labels_in_moving")
_SUMMARY_FILE = "result.json"


@dataclass
class RegistrationResult:
    displacement: sitk.Image        # vector float64, fixed grid, LPS mm, fixed -> moving point
    warped: sitk.Image              # float32, fixed grid: the moving image through the field
    jacobian: sitk.Image            # float32 det(I + dd/dx), fixed grid
    folding: sitk.Image             # uint8, 1 where det <= 0
    warped_labels: sitk.Image | None
    #: ``core.qa.jacobian_summary`` of the Jacobian: folding_percent, sdlogj, jacobian_min/max
    qa: dict
    options: RegistrationOptions    # as requested
    model_name: str = ""
    device: str = ""                # where the network and refinement ran
    working_size: tuple = ()        # the working grid (ITK order x, y, z)
    working_spacing: tuple = ()     # mm
    initial_matrix: np.ndarray = field(default_factory=lambda: np.eye(4))
    initial_alignment: str = "none"  # the method that produced it ("auto" resolved; "given")
    initial_alignment_note: str = ""  # "auto": what it rejected and chose, and why
    network: bool = True            # whether the network ran
    contrast: str = "same"          # "same" or "different" ("auto" resolved)
    contrast_correlation: float = math.nan  # the figure "auto" decides on (engine/contrast.py)
    #: the optimisation that ran, None when off: {similarity "lncc" or "mind", preset,
    #: scales_mm, iterations (per scale), finest_grid_mm when the finest level was made coarser
    #: by its size limit}
    refinement: dict | None = None
    timings: dict = field(default_factory=dict)  # stage -> seconds
    #: what the user must know about this result (a partial overlap of the inputs, a doubtful
    #: requested alignment): the command line prints them and writes them to report.json
    warnings: list = field(default_factory=list)
    #: vector float64, moving grid, LPS mm, moving point y -> fixed point y + d'(y); None unless
    #: asked for (``options.inverse``, or fixed labels given)
    inverse_displacement: sitk.Image | None = None
    #: the fixed label map carried into the moving grid through the inverse (nearest neighbour)
    fixed_labels_in_moving: sitk.Image | None = None
    #: how exact the inverse is (``engine/inverse.py``): iterations, mean_residual_mm,
    #: max_residual_mm (|forward(inverse(y)) - y| inside the fixed field of view), inside_percent
    inverse_qa: dict | None = None
    #: the similarity masks used: a subset of ("fixed", "moving")
    masks: tuple = ()

    @property
    def method(self) -> str:
        """One line: which contrast path ran and why, e.g. "different contrasts (intensity
        correlation -0.24): MIND-SSC optimisation alone at 2/1 mm, 40/2 steps (default)"."""
        r = self.contrast_correlation
        why = "" if r is None or math.isnan(r) else f" (intensity correlation {r:.2f})"
        head = "same contrast" if self.contrast == "same" else "different contrasts"
        if self.refinement is None:
            return f"{head}{why}: network alone, no refinement"
        r = self.refinement
        similarity = "MIND-SSC" if r["similarity"] == "mind" else "LNCC"
        steps = (f"{similarity} optimisation{'' if self.network else ' alone'} at "
                 f"{'/'.join(f'{s:g}' for s in r['scales_mm'])} mm, "
                 f"{'/'.join(map(str, r['iterations']))} steps ({r['preset']})")
        if r.get("finest_grid_mm"):  # made coarser by optimise.MAX_LEVEL_VOXELS
            steps += f", the finest level at {min(r['finest_grid_mm']):.2g} mm (its size limit)"
        return f"{head}{why}: {'network + ' if self.network else ''}{steps}"

    def summary(self) -> str:
        """The method, the QA figures and any warnings in one line."""
        qa = self.qa
        return (f"{self.method}; folding {qa['folding_percent']:.3f} % of voxels, SDlogJ "
                f"{qa['sdlogj']:.3f}, det(J) in [{qa['jacobian_min']:.3f}, "
                f"{qa['jacobian_max']:.3f}]" + "".join(f"; WARNING: {w}" for w in self.warnings))

    def describe(self) -> dict:
        """Everything but the images, as plain JSON types."""
        r = self.contrast_correlation
        return {
            "options": self.options.to_dict(),
            "model_name": self.model_name,
            "device": self.device,
            "working_size": [int(v) for v in self.working_size],
            "working_spacing": [float(v) for v in self.working_spacing],
            "initial_matrix": np.asarray(self.initial_matrix, dtype=np.float64).tolist(),
            "initial_alignment": self.initial_alignment,
            "initial_alignment_note": self.initial_alignment_note,
            "network": bool(self.network),
            "contrast": self.contrast,
            "contrast_correlation": None if r is None or math.isnan(r) else float(r),
            "refinement": self.refinement,
            "method": self.method,
            "qa": {k: float(v) for k, v in self.qa.items()},
            "timings": {k: float(v) for k, v in self.timings.items()},
            "warnings": [str(w) for w in self.warnings],
            "inverse": None if self.inverse_qa is None else dict(self.inverse_qa),
            "masks": list(self.masks),
        }

    def save(self, folder: str | os.PathLike) -> None:
        """Images as uncompressed ``.mha`` plus ``result.json`` (the Slicer worker's hand-over);
        the summary is written last, so its presence means the folder is complete."""
        folder = Path(folder)
        for name in IMAGES:
            image = getattr(self, name)
            if image is not None:
                sitk.WriteImage(image, str(folder / f"{name}.mha"), useCompression=False)
        tmp = folder / (_SUMMARY_FILE + ".tmp")
        tmp.write_text(json.dumps(self.describe()), encoding="utf-8")
        os.replace(tmp, folder / _SUMMARY_FILE)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> RegistrationResult:
        """The inverse of :meth:`save`."""
        folder = Path(folder)
        info = json.loads((folder / _SUMMARY_FILE).read_text(encoding="utf-8"))
        images = {name: (sitk.ReadImage(str(folder / f"{name}.mha"))
                         if (folder / f"{name}.mha").exists() else None) for name in IMAGES}
        r = info.get("contrast_correlation")
        return cls(**images, qa=dict(info["qa"]),
                   options=RegistrationOptions.from_dict(info["options"]),
                   model_name=info["model_name"], device=info["device"],
                   working_size=tuple(info["working_size"]),
                   working_spacing=tuple(info["working_spacing"]),
                   initial_matrix=np.array(info["initial_matrix"], dtype=np.float64),
                   initial_alignment=info["initial_alignment"],
                   initial_alignment_note=info.get("initial_alignment_note", ""),
                   network=info["network"],
                   contrast=info["contrast"],
                   contrast_correlation=math.nan if r is None else float(r),
                   refinement=info["refinement"], timings=dict(info["timings"]),
                   warnings=list(info.get("warnings", [])),

                   inverse_qa=info.get("inverse"), masks=tuple(info.get("masks", ())))

    @classmethod
    def saved_in(cls, folder: str | os.PathLike) -> bool:
        return (Path(folder) / _SUMMARY_FILE).exists()
