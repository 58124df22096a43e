"""Command line: ``eoir-register``, ``eoir-train``, ``eoir-models`` (also ``python -m
EOIRRegistrationLib register|train|models|demo ...``). Each ``*_main(argv) -> int`` is testable."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .allocator import keep_freed_memory
from .errors import EOIRError
from .models import ARCHITECTURES

# = refine.DEFAULT_ITERATIONS[_ALONE] (repeated so that --help does not import torch; a test
# checks them).
DEFAULT_REFINE_ITERATIONS = 10
DEFAULT_REFINE_ITERATIONS_ALONE = 40


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eoir-train", description=(
        "Train an EOIR registration model on synthetic pairs (no data needed), a folder of "
        "images (label maps named *_seg* or *label*) or a Learn2Reg-style JSON."))
    p.add_argument("--output-dir", required=True, help="folder for checkpoint.pt, log.csv, model.pt")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic', 'labelmaps:FOLDER' (SynthMorph-style pairs from label "
                        "maps), a folder of images, or a Learn2Reg JSON file")
    p.add_argument("--model", default="eoir", choices=sorted(ARCHITECTURES), help="architecture")
    p.add_argument("--channels", type=int, default=None,
                   help="EOIR encoder width Ns (paper: 32, 16, 8; default 8)")
    p.add_argument("--levels", type=int, default=None, help="EOIR pyramid levels (default 5)")
    p.add_argument("--model-config", default="{}",
                   help="JSON of further architecture options, e.g. '{\"composition\": \"add\"}'")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64],
                   help="training crop, array order D H W (multiples of 16)")
    p.add_argument("--working-spacing", type=float, nargs=3, default=[2.0, 2.0, 2.0],
                   help="mm (x y z) at which the model registers; stored in the model card")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--batch", type=int, default=1,
                   help="pairs per step, stacked into one batch (smoother gradients; memory and "
                        "time per step grow with it)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--poly-decay", action="store_true")
    p.add_argument("--similarity", choices=["lncc", "mse", "none"], default="lncc",
                   help="image similarity; 'none' trains on the Dice term alone (use with "
                        "labelmaps: data, whose two images have independent contrasts)")
    p.add_argument("--reg-weight", type=float, default=1.0, help="diffusion weight on velocities")
    p.add_argument("--dice-weight", type=float, default=0.0, help="soft Dice weight (needs labels)")
    p.add_argument("--dice-labels", choices=["all", "standard30", "standard27"], default="all",
                   help="labels of the Dice term and of validation: every label of the fixed map "
                        "(all), the 30 standard FreeSurfer brain structures (standard30), or the "
                        "27 of them defined alike in SynthSeg maps (standard27: no CSF 24, no "
                        "choroid plexus 31/63; use it with SynthSeg label maps)")
    p.add_argument("--data-options", default="{}",
                   help="JSON options of the labelmaps: source, e.g. "
                        "'{\"same_contrast_probability\": 0.5, \"max_maps\": 13}'")
    p.add_argument("--init-from", metavar="MODEL",
                   help="start from this model's weights (bundled name or file; same architecture "
                        "and configuration): fine-tuning")
    p.add_argument("--distill-from", metavar="MODEL",
                   help="contrast distillation (labelmaps: data, EOIR): the trained model learns to "
                        "reproduce this model's displacement for the same anatomy in one contrast "
                        "while it sees two contrasts; bundled name or file at the same working "
                        "spacing")
    p.add_argument("--distill-weight", type=float, default=None,
                   help="weight of the distillation term (squared voxel distance to the teacher's "
                        "displacement; default 1); needs --distill-from")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--validate-every", type=int, default=250)
    p.add_argument("--validation-pairs", type=int, default=4)
    p.add_argument("--log-every", type=int, default=10, help="iterations between log rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--name", default="eoir-model", help="model name in the card")
    p.add_argument("--description", default="", help="one-line description in the card")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from checkpoint.pt")
    g.add_argument("--overwrite", action="store_true", help="start again in a used folder")
    return p


def train_main(argv=None) -> int:
    args = _train_parser().parse_args(argv)
    keep_freed_memory()
    from .metrics import STANDARD_30_LABELS, SYNTHSEG_COMPARABLE_LABELS
    from .training.trainer import TrainConfig, train
    try:
        model_config = json.loads(args.model_config)
        if args.model == "eoir":
            model_config.setdefault("channels", args.channels or 8)
            model_config.setdefault("levels", args.levels or 5)
        elif args.channels or args.levels:
            raise ValueError("--channels/--levels configure EOIR; give other architectures' "
                             "options with --model-config")
        if args.distill_weight is not None and not args.distill_from:
            raise ValueError("--distill-weight needs --distill-from (the teacher model)")
        label_values = {"all": (), "standard30": STANDARD_30_LABELS,
                        "standard27": SYNTHSEG_COMPARABLE_LABELS}[args.dice_labels]
        cfg = TrainConfig(
            output_dir=args.output_dir, architecture=args.model, model_config=model_config,
            data=args.data, shape=tuple(args.shape), working_spacing_mm=tuple(args.working_spacing),
            objective={"similarity": args.similarity, "regularization_weight": args.reg_weight,
                       "dice_weight": args.dice_weight, "label_values": label_values,
                       "distill_weight": (0.0 if not args.distill_from
                                          else 1.0 if args.distill_weight is None
                                          else args.distill_weight)},
            source_options=json.loads(args.data_options), init_from=args.init_from,
            distill_from=args.distill_from,
            iterations=args.iterations, batch_size=args.batch, learning_rate=args.lr,
            poly_decay=args.poly_decay,
            checkpoint_every=args.checkpoint_every, validate_every=args.validate_every,
            validation_pairs=args.validation_pairs, log_every=args.log_every, seed=args.seed, device=args.device,
            threads=args.threads, name=args.name, description=args.description)
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except (EOIRError, ValueError, json.JSONDecodeError) as exc:
        print(f"eoir-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------
# eoir-register

OUTPUT_FILES = ("displacement.nii", "warped.nii.gz", "jacobian.nii.gz", "folding.nii.gz",
                "warped_labels.nii.gz", "affine.tfm", "report.json", "overview.png")
# Written by earlier versions (the field used to be gzipped): removed with --overwrite too.
FORMER_OUTPUT_FILES = ("displacement.nii.gz",)


def _register_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eoir-register", description=(
        "Deformably register MOVING to FIXED. Writes displacement.nii (ITK displacement field: "
        "LPS mm on the fixed grid, fixed point -> moving point; a transform for SimpleITK, ANTs "
        "and Slicer), warped.nii.gz, jacobian.nii.gz, folding.nii.gz, report.json and "
        "overview.png to --output-dir."))
    p.add_argument("fixed", help="fixed (reference) 3D image: any format ITK reads")
    p.add_argument("moving", help="moving 3D image, resampled onto the fixed grid")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--model", default="default",
                   help="bundled model name (see eoir-models) or a model file path")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--moving-labels", help="label map of the moving image to warp (nearest)")
    p.add_argument("--fixed-labels", help="label map of the fixed image: reports Dice")
    p.add_argument("--working-spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="override the model card's working spacing (mm)")
    p.add_argument("--init", choices=["auto", "none", "com", "rigid", "affine"], default="auto",
                   help="initial linear alignment before the network: auto (default: affine "
                        "unless the inputs are already aligned), none, com (centres of mass), "
                        "rigid or affine (mutual information, ~1 s on a CPU); included in "
                        "displacement.nii, also written to affine.tfm")
    p.add_argument("--initial-transform", metavar="FILE",
                   help="linear ITK transform file (.tfm/.txt/.mat/.h5) mapping fixed points to "
                        "moving points, used as the starting point (overrides --init)")
    p.add_argument("--contrast", choices=["auto", "same", "different"], default="auto",
                   help="same: one contrast (the network, then LNCC refinement); different: two "
                        "contrasts, e.g. T1 and T2 (the MIND-SSC refinement alone: the bundled "
                        "models are single-contrast; a model on MIND-SSC inputs keeps its "
                        "network); auto (default): decided from the images' correlation after "
                        "the initial alignment (written to report.json)")
    p.add_argument("--refine", type=int, default=None, metavar="N",
                   help="per-pair optimisation iterations (default "
                        f"{DEFAULT_REFINE_ITERATIONS} after the network, about 1.5 s for a brain "
                        f"on 2 CPU threads; {DEFAULT_REFINE_ITERATIONS_ALONE} without it, about "
                        "5 s; 0 = off)")
    p.add_argument("--no-network", action="store_true",
                   help="skip the network whatever the contrast: the refinement alone, from the "
                        "initial alignment (needs refinement)")
    p.add_argument("--refine-seconds", type=float, default=None,
                   help="time budget for --refine (stops early when exceeded)")
    p.add_argument("--refine-similarity", choices=["lncc", "mind"], default=None,
                   help="similarity of the refinement (default: follows --contrast): lncc (one "
                        "contrast) or mind (MIND-SSC descriptors, two contrasts, e.g. T1 and T2)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--no-png", action="store_true", help="skip overview.png")
    p.add_argument("--overwrite", action="store_true",
                   help="replace this command's files in an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def read_image(path: str, role: str):
    """Read an image with a clear error for missing or unreadable files."""
    import SimpleITK as sitk

    from .errors import InputError
    if not os.path.isfile(path):
        raise InputError(f"{role} file not found: {path}")
    try:
        return sitk.ReadImage(path)
    except RuntimeError as exc:
        first = [l for l in str(exc).splitlines() if l.strip()]
        raise InputError(f"cannot read {role} {path}: not an image ITK can read "
                         f"({first[-1].strip() if first else exc})") from exc


def check_output_dir(path, overwrite: bool, names=OUTPUT_FILES) -> None:
    from .errors import InputError
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


def _stderr_progress(quiet: bool):
    start = time.perf_counter()

    def report(stage: str, fraction: float):
        if not quiet:
            print(f"[{100 * fraction:5.1f}%] {time.perf_counter() - start:6.1f} s  {stage}",
                  file=sys.stderr, flush=True)
    return report


def run_registration(args, extra_report: dict | None = None, inputs: dict | None = None) -> dict:
    """Read, register, write. ``inputs`` may hold already-loaded images (the demo)."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from . import __version__, metrics
    from .modelfile import resolve_model
    from .pipeline import register
    t0 = time.perf_counter()
    check_output_dir(args.output_dir, args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = inputs or {}
    fixed = inputs.get("fixed") or read_image(args.fixed, "fixed image")
    moving = inputs.get("moving") or read_image(args.moving, "moving image")
    moving_labels = inputs.get("moving_labels")
    if moving_labels is None and args.moving_labels:
        moving_labels = read_image(args.moving_labels, "moving label map")
    fixed_labels = inputs.get("fixed_labels")
    if fixed_labels is None and args.fixed_labels:
        fixed_labels = read_image(args.fixed_labels, "fixed label map")
    initial = None
    if getattr(args, "initial_transform", None):
        from .errors import InputError
        try:
            initial = sitk.ReadTransform(args.initial_transform)
        except RuntimeError as exc:
            raise InputError(f"cannot read the initial transform {args.initial_transform}: "
                             "not an ITK transform file") from exc
    loaded = resolve_model(args.model)
    t_read = time.perf_counter() - t0
    from .refine import config_from_options
    refine = config_from_options(getattr(args, "refine", None),
                                 getattr(args, "refine_seconds", None),
                                 getattr(args, "refine_similarity", None))
    result = register(fixed, moving, model=loaded, device=args.device,
                      moving_labels=moving_labels, working_spacing=args.working_spacing,
                      refine=refine, initial_alignment=getattr(args, "init", "auto"),
                      initial_transform=initial, contrast=getattr(args, "contrast", "auto"),
                      network=False if getattr(args, "no_network", False) else None,
                      progress=_stderr_progress(args.quiet))
    report = {
        "eoir_registration_version": __version__,
        "model": {"name": loaded.name, "path": loaded.path,
                  "description": loaded.card.get("description", "")},
        "device": result.device,
        "inputs": {"fixed": str(args.fixed), "moving": str(args.moving),
                   "fixed_size": list(fixed.GetSize()), "fixed_spacing": list(fixed.GetSpacing()),
                   "moving_size": list(moving.GetSize()),
                   "moving_spacing": list(moving.GetSpacing())},
        "working_grid": {"size": list(result.working_grid.size),
                         "spacing_mm": list(result.working_grid.spacing)},
        "displacement_convention": "LPS mm on the fixed grid; fixed point x maps to moving "
                                   "point x + d(x) (ITK resampling direction)",
        "contrast": {"requested": getattr(args, "contrast", "auto"), "used": result.contrast,
                     "correlation": (None if np.isnan(result.contrast_correlation)
                                     else round(result.contrast_correlation, 4))},
        "method": result.method,
        "network": result.network,
        "refinement": (None if result.refine is None else
                       {"iterations": result.refine.iterations,
                        "similarity": result.refine.similarity,
                        "sample_fraction": result.refine.sample_fraction}),
        "initial_alignment": result.initial_alignment,
        "initial_matrix_lps": result.initial_matrix.tolist(),
        "quality": result.qa,
        "seconds": {"reading inputs": round(t_read, 3), **result.timings},
    }
    if fixed_labels is not None and result.warped_labels is not None:
        fl = sitk.GetArrayFromImage(sitk.Resample(fixed_labels, fixed, sitk.Transform(),
                                                  sitk.sitkNearestNeighbor)).astype(np.int64)
        wl = sitk.GetArrayFromImage(result.warped_labels).astype(np.int64)
        ml = sitk.GetArrayFromImage(sitk.Resample(moving_labels, fixed, sitk.Transform(),
                                                  sitk.sitkNearestNeighbor)).astype(np.int64)
        values = [int(v) for v in np.unique(fl) if v != 0]
        mean = lambda d: float(np.nanmean(list(d.values()))) if d else float("nan")
        report["dice"] = {"labels": len(values),
                          "mean_before": mean(metrics.dice(fl, ml, values)),
                          "mean_after": mean(metrics.dice(fl, wl, values))}
    report.update(extra_report or {})
    files = {
        # float32 vectors: half the size and write time of float64, ~1e-6 mm rounding. Not
        # gzipped: float vectors shrink by ~13 % only, and gzip took 1.3 s of a 7 s brain run.
        "displacement.nii": lambda p: sitk.WriteImage(
            sitk.Cast(result.displacement, sitk.sitkVectorFloat32), p),
        "warped.nii.gz": lambda p: sitk.WriteImage(result.warped, p),
        "jacobian.nii.gz": lambda p: sitk.WriteImage(result.jacobian, p),
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
    if not args.no_png:
        from .overview import write_overview
        title = f"{loaded.name}: folding {result.qa['folding_percent']:.3f}%, " \
                f"SDlogJ {result.qa['sdlogj']:.3f}"
        files["overview.png"] = lambda p: write_overview(p, fixed, moving, result.warped,
                                                         result.jacobian, result.displacement,
                                                         title)
    t_write = time.perf_counter()
    report["seconds"]["writing outputs"] = None
    # report.json is written last so it can include the writing time of the others.
    def write_report(p):
        report["seconds"]["writing outputs"] = round(time.perf_counter() - t_write, 3)
        report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        with open(p, "w") as f:
            json.dump(report, f, indent=2)
    files["report.json"] = write_report
    write_outputs(args.output_dir, files, replaces=OUTPUT_FILES + FORMER_OUTPUT_FILES)
    return report


def _summary(report: dict) -> str:
    q = report["quality"]
    lines = [f"model {report['model']['name']} on {report['device']}: "
             f"{report['seconds']['total']:.1f} s total",
             f"folding {q['folding_percent']:.4f}% of voxels, SDlogJ {q['sdlogj']:.3f}, "
             f"det in [{q['jacobian_min']:.3f}, {q['jacobian_max']:.3f}]"]
    if "method" in report:
        how = "auto" if report["contrast"]["requested"] == "auto" else "as requested"
        lines.append(f"{report['method']} [{how}]")
    if "dice" in report:
        d = report["dice"]
        lines.append(f"mean Dice over {d['labels']} labels: {d['mean_before']:.3f} -> "
                     f"{d['mean_after']:.3f}")
    return "\n".join(lines)


def register_main(argv=None) -> int:
    args = _register_parser().parse_args(argv)
    keep_freed_memory()
    try:
        report = run_registration(args)
    except EOIRError as exc:
        print(f"eoir-register: error: {exc}", file=sys.stderr)
        return 2
    print(_summary(report))
    print(f"outputs in {args.output_dir}")
    return 0


# ---------------------------------------------------------------------------------------------
# eoir-models

def models_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="eoir-models", description="List the bundled models.")
    p.add_argument("--json", action="store_true", help="print the full model cards as JSON")
    args = p.parse_args(argv)
    from .modelfile import DEFAULT_MODEL, list_bundled_models
    infos = list_bundled_models()
    if args.json:
        print(json.dumps([{"name": i.name, "path": i.path, "card": i.card} for i in infos],
                         indent=2))
        return 0
    if not infos:
        print("no bundled models are installed")
        return 1
    for i in infos:
        card = i.card
        tag = " (default)" if i.name == DEFAULT_MODEL else ""
        print(f"{i.name}{tag}\n  {i.description}")
        print(f"  working spacing {card.get('working_spacing_mm')} mm; trained on "
              f"{card.get('training_data', '?')}")
        if card.get("validation"):
            print(f"  validation: {card['validation']}")
        print(f"  file: {i.path}")
    return 0


# ---------------------------------------------------------------------------------------------
# demo

def demo_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m EOIRRegistrationLib demo", description=(
        "Generate the bundled phantom pair (known deformation), register it with the default "
        "model and settings and report how well the true displacement is recovered."))
    p.add_argument("--output-dir", default="eoir-demo-output")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    keep_freed_memory()
    import SimpleITK as sitk

    from .phantom import displacement_error_mm, make_phantom_pair
    try:
        check_output_dir(args.output_dir, args.overwrite)
        pair = make_phantom_pair()
        sample = Path(args.output_dir) / "sample"
        sample.mkdir(parents=True, exist_ok=True)
        names = {"fixed": pair.fixed, "moving": pair.moving, "fixed_labels": pair.fixed_labels,
                 "moving_labels": pair.moving_labels,
                 "true_displacement": pair.true_displacement}
        for name, image in names.items():
            sitk.WriteImage(image, str(sample / f"{name}.nii.gz"))
        reg_args = argparse.Namespace(
            fixed=str(sample / "fixed.nii.gz"), moving=str(sample / "moving.nii.gz"),
            output_dir=args.output_dir, model=args.model, device=args.device,
            moving_labels=str(sample / "moving_labels.nii.gz"),
            fixed_labels=str(sample / "fixed_labels.nii.gz"), working_spacing=None,
            refine=None, refine_seconds=None, init="auto",
            initial_transform=None,
            threads=args.threads, no_png=False, overwrite=True, quiet=False)
        report = run_registration(reg_args)
        predicted = sitk.ReadImage(str(Path(args.output_dir) / "displacement.nii"))
        err = displacement_error_mm(predicted, pair.true_displacement, pair.fixed_labels)
        report["demo_recovery"] = err
        with open(Path(args.output_dir) / "report.json", "w") as f:
            json.dump(report, f, indent=2)
    except EOIRError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    print(_summary(report))
    print(f"displacement error vs the known truth: mean {err['mean_error_mm']:.2f} mm, "
          f"95th percentile {err['p95_error_mm']:.2f} mm (identity: "
          f"{err['identity_mean_error_mm']:.2f} / {err['identity_p95_error_mm']:.2f} mm)")
    print(f"outputs (and the sample pair in sample/) in {args.output_dir}; look at "
          f"{Path(args.output_dir) / 'overview.png'}")
    return 0


COMMANDS = {"register": register_main, "train": train_main, "models": models_main,
            "demo": demo_main}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m EOIRRegistrationLib {register,train,models,demo} ...\n"
              "  register  register two images (eoir-register)\n"
              "  train     train a model (eoir-train)\n"
              "  models    list bundled models (eoir-models)\n"
              "  demo      register the bundled phantom pair and score it", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])
