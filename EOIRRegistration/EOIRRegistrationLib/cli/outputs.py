"""What ``eoir-register`` (and the demo) write for one pair: the registration's images,
``affine.tfm``, ``report.json`` and ``overview.png``, all-or-nothing, one run at a time
(``outputfolder.OutputFolder``); with the inverse, ``inverse_displacement.nii`` and
``fixed_labels_in_moving.nii.gz`` on the moving grid."""
from __future__ import annotations

import json
import time

import numpy as np

from EOIRRegistrationLib.cli.files import read_images, write_displacement
from EOIRRegistrationLib.cli.outputfolder import OutputFolder
from EOIRRegistrationLib.engine.options import RegistrationOptions

OUTPUT_FILES = ("displacement.nii", "warped.nii.gz", "jacobian.nii", "folding.nii.gz",
                "warped_labels.nii.gz", "inverse_displacement.nii", "fixed_labels_in_moving.nii.gz",
                "affine.tfm", "report.json", "overview.png")
#: what earlier versions wrote instead (replaced with the rest on --overwrite, never left stale)
FORMER_OUTPUT_FILES = ("jacobian.nii.gz",)


def register_files(fixed_path: str, moving_path: str, output_dir: str,
                   options: RegistrationOptions, moving_labels: str | None = None,
                   fixed_labels: str | None = None, png: bool = True, overwrite: bool = False,
                   progress=None, amend_report=None, extra_files: dict | None = None,
                   fixed_mask: str | None = None, moving_mask: str | None = None,
                   loaded_model=None, initial_transform_file: str | None = None) -> dict:
    """Claim the output folder, read, register, write; returns the report (also written to
    ``report.json``). ``amend_report(report, result)`` may change the report before it is
    written; ``extra_files`` (name -> writer(path)) are written with the outputs. Fixed labels
    give the Dice; with ``options.inverse`` they are also carried into the moving space (the
    inversion costs more than the registration on a brain: not done unasked). loaded_model: the
    ``LoadedModel`` of ``options.model`` when the caller already holds it (a cohort loads it once
    per process, ``batch_pair.py``); None loads it here. initial_transform_file: the file the
    caller read ``options.initial_transform`` from, so that no output replaces it. Every input
    file named like an output in the output folder is refused before anything is read."""
    extra_files = dict(extra_files or {})
    inputs = {"fixed image": fixed_path, "moving image": moving_path,
              "moving label map": moving_labels, "fixed label map": fixed_labels,
              "fixed mask": fixed_mask, "moving mask": moving_mask,
              "initial transform": initial_transform_file}
    with OutputFolder(output_dir, overwrite, OUTPUT_FILES + FORMER_OUTPUT_FILES + tuple(extra_files),
                      inputs) as folder:
        return _register_and_write(folder, fixed_path, moving_path, options, moving_labels,
                                   fixed_labels, png, progress, amend_report, extra_files,
                                   (fixed_mask, moving_mask), loaded_model)


def _register_and_write(folder: OutputFolder, fixed_path, moving_path, options, moving_labels,
                        fixed_labels, png, progress, amend_report, extra_files,
                        mask_paths, loaded_model) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import SimpleITK as sitk
    with ThreadPoolExecutor(max_workers=1) as pool:
        # ITK reads the files outside the interpreter lock while the engine's modules are
        # imported (torch: about a second in a fresh process, when not imported yet), so the
        # report's "reading inputs" is the longer of the two
        reading = pool.submit(read_images, [
            (fixed_path, "fixed image"), (moving_path, "moving image"),
            (moving_labels, "moving label map"), (fixed_labels, "fixed label map"),
            (mask_paths[0], "fixed mask"), (mask_paths[1], "moving mask")])
        t0 = time.perf_counter()
        from EOIRRegistrationLib import __version__
        from EOIRRegistrationLib.core import qa
        from EOIRRegistrationLib.engine.checks import check_image, check_labels_on
        from EOIRRegistrationLib.engine.modelfile import resolve_model
        from EOIRRegistrationLib.engine.pipeline import register
        fixed, moving, moving_lab, fixed_lab, fixed_mask, moving_mask = reading.result()
    label_warnings = []
    if fixed_lab is not None:  # the engine checks the moving labels; these only serve the Dice
        check_image(fixed_lab, "fixed label map", labels=True)
        label_warnings = check_labels_on(fixed_lab, fixed, "fixed label map", "fixed image")
    masks = {"fixed_mask": fixed_mask, "moving_mask": moving_mask}
    loaded = resolve_model(options.model if loaded_model is None else loaded_model)
    t_read = time.perf_counter() - t0
    result = register(fixed, moving, options, moving_labels=moving_lab,
                      fixed_labels=fixed_lab if options.inverse else None,
                      loaded_model=loaded, progress=progress, **masks)
    described = result.describe()
    report = {
        "eoir_registration_version": __version__,
        "model": {"name": loaded.name, "path": loaded.path,
                  "description": loaded.card.get("description", "")},
        "device": result.device,
        "options": described["options"],
        "inputs": {"fixed": str(fixed_path), "moving": str(moving_path),
                   "fixed_size": list(fixed.GetSize()), "fixed_spacing": list(fixed.GetSpacing()),
                   "moving_size": list(moving.GetSize()),
                   "moving_spacing": list(moving.GetSpacing())},
        "working_grid": {"size": described["working_size"],
                         "spacing_mm": described["working_spacing"]},
        "displacement_convention": "LPS mm on the fixed grid; fixed point x maps to moving "
                                   "point x + d(x) (ITK resampling direction)",
        "masks": list(result.masks),
        "contrast": {"requested": options.contrast, "used": result.contrast,
                     "correlation": (None if described["contrast_correlation"] is None
                                     else round(described["contrast_correlation"], 4))},
        "method": result.method,
        "network": result.network,
        "refinement": result.refinement,
        "initial_alignment": result.initial_alignment,
        "initial_alignment_note": result.initial_alignment_note,
        "initial_matrix_lps": described["initial_matrix"],
        "quality": result.qa,
        "seconds": {"reading inputs": round(t_read, 3), **result.timings},
        "warnings": label_warnings + list(result.warnings),
    }
    if fixed_lab is not None and result.warped_labels is not None:
        on_fixed = lambda image: sitk.GetArrayFromImage(sitk.Resample(  # noqa: E731
            image, fixed, sitk.Transform(), sitk.sitkNearestNeighbor)).astype(np.int64)
        fl = on_fixed(fixed_lab)
        values = [int(v) for v in np.unique(fl) if v != 0]
        report["dice"] = {
            "labels": len(values),
            "mean_before": qa.mean_dice(fl, on_fixed(moving_lab), values),
            "mean_after": qa.mean_dice(
                fl, sitk.GetArrayFromImage(result.warped_labels).astype(np.int64), values)}
        if result.fixed_labels_in_moving is not None:  # the other direction, on the moving grid
            ml = sitk.GetArrayFromImage(sitk.Resample(moving_lab, moving, sitk.Transform(),
                                                      sitk.sitkNearestNeighbor)).astype(np.int64)
            report["dice"]["mean_after_in_moving_space"] = qa.mean_dice(
                ml, sitk.GetArrayFromImage(result.fixed_labels_in_moving).astype(np.int64),
                values)
    if amend_report is not None:
        amend_report(report, result)
    files = {
        # NIfTI displacement vectors (intent 1006, RAS on disk, LPS again in any ITK reader),
        # float32: half the size and write time of float64, ~1e-6 mm rounding. Not gzipped:
        # float vectors shrink by ~13 % only, and gzip took 1.3 s of a 7 s brain run. The
        # Jacobian likewise: gzip kept 56 % of its bytes and took 0.7 s, the whole writing stage
        # (the other files are written beside it), on a 160x192x224 brain.
        "displacement.nii": lambda p: write_displacement(result.displacement, p),
        "warped.nii.gz": lambda p: sitk.WriteImage(result.warped, p),
        "jacobian.nii": lambda p: sitk.WriteImage(result.jacobian, p),
        "folding.nii.gz": lambda p: sitk.WriteImage(result.folding, p),
    }
    if not np.allclose(result.initial_matrix, np.eye(4)):
        def write_affine(p):
            tx = sitk.AffineTransform(3)
            tx.SetMatrix(result.initial_matrix[:3, :3].ravel().tolist())
            tx.SetTranslation(result.initial_matrix[:3, 3].tolist())
            sitk.WriteTransform(tx, p)
        files["affine.tfm"] = write_affine
    if result.warped_labels is not None:
        files["warped_labels.nii.gz"] = lambda p: sitk.WriteImage(result.warped_labels, p)
    if result.inverse_displacement is not None:
        report["inverse"] = {
            "convention": "LPS mm on the moving grid; moving point y maps to fixed point "
                          "y + d'(y); the initial linear part included",
            **{k: round(v, 8) if isinstance(v, float) else v
               for k, v in result.inverse_qa.items()}}
        files["inverse_displacement.nii"] = lambda p: write_displacement(
            result.inverse_displacement, p)
    if result.fixed_labels_in_moving is not None:
        files["fixed_labels_in_moving.nii.gz"] = lambda p: sitk.WriteImage(
            result.fixed_labels_in_moving, p)
    if png:
        from EOIRRegistrationLib.cli.overview import write_overview
        title = f"{loaded.name}: folding {result.qa['folding_percent']:.3f}%, " \
                f"SDlogJ {result.qa['sdlogj']:.3f}"
        files["overview.png"] = lambda p: write_overview(p, fixed, moving, result.warped,
                                                         result.jacobian, result.displacement,
                                                         title)
    t_write = time.perf_counter()
    report["seconds"]["writing outputs"] = None

    def write_report(p):  # last, so it can include the writing time of the others
        report["seconds"]["writing outputs"] = round(time.perf_counter() - t_write, 3)
        report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        with open(p, "w") as f:
            json.dump(report, f, indent=2)
    files.update(extra_files)
    files["report.json"] = write_report
    folder.commit(files)
    return report


def summary(report: dict) -> str:
    q = report["quality"]
    lines = [f"model {report['model']['name']} on {report['device']}: "
             f"{report['seconds']['total']:.1f} s total",
             f"folding {q['folding_percent']:.4f}% of voxels, SDlogJ {q['sdlogj']:.3f}, "
             f"det in [{q['jacobian_min']:.3f}, {q['jacobian_max']:.3f}]"]
    how = "auto" if report["contrast"]["requested"] == "auto" else "as requested"
    lines.append(f"{report['method']} [{how}]")
    if report.get("initial_alignment_note"):
        lines.append(f"initial alignment: {report['initial_alignment_note']}")
    if "dice" in report:
        d = report["dice"]
        lines.append(f"mean Dice over {d['labels']} labels: {d['mean_before']:.3f} -> "
                     f"{d['mean_after']:.3f}")
        if "mean_after_in_moving_space" in d:
            lines.append(f"mean Dice of the fixed labels carried into the moving space: "
                         f"{d['mean_after_in_moving_space']:.3f}")
    lines += [f"WARNING: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)
