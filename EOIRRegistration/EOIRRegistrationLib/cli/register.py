"""``eoir-register``: register two image files and write the outputs (``outputs.py``).

The flags map one to one onto ``RegistrationOptions`` (``options_from_args``); the command's own
choices (output folder, label maps, PNG, overwrite, quiet) stay here."""
from __future__ import annotations

import argparse
import sys
import time

from EOIRRegistrationLib.cli.interrupts import Interrupted, message, raise_on_signals
from EOIRRegistrationLib.core.errors import EOIRError, InputError
from EOIRRegistrationLib.engine.allocator import keep_freed_memory
from EOIRRegistrationLib.engine.options import (
    CONTRASTS,
    DEVICES,
    INITIAL_ALIGNMENTS,
    PRESETS,
    REFINE_SIMILARITIES,
    RegistrationOptions,
)

DEFAULTS = RegistrationOptions()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eoir-register", description=(
        "Deformably register MOVING to FIXED. Writes displacement.nii (ITK displacement field: "
        "LPS mm on the fixed grid, fixed point -> moving point; a transform for SimpleITK, ANTs "
        "and Slicer), warped.nii.gz, jacobian.nii, folding.nii.gz, report.json and "
        "overview.png to --output-dir; with --inverse also "
        "inverse_displacement.nii (LPS mm on the moving grid, moving point -> fixed point)."))
    p.add_argument("fixed", help="fixed (reference) 3D image: any format ITK reads")
    p.add_argument("moving", help="moving 3D image, resampled onto the fixed grid")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--moving-labels", help="label map of the moving image to warp (nearest)")
    p.add_argument("--fixed-labels", help="label map of the fixed image: reports Dice; with "
                   "--inverse also carried into the moving space through the inverse "
                   "(fixed_labels_in_moving.nii.gz, nearest neighbour)")
    p.add_argument("--fixed-mask", metavar="FILE",
                   help="mask of the fixed image (nonzero: used; any grid): the similarity of "
                        "the alignment and the optimisation is restricted to it")
    p.add_argument("--moving-mask", metavar="FILE",
                   help="mask of the moving image (nonzero: used; any grid), e.g. to leave out a "
                        "lesion, resection or artefact present in one image only")
    add_registration_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace this command's files in an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def add_registration_options(p: argparse.ArgumentParser) -> None:
    """The flags of ``RegistrationOptions`` (read back by ``options_from_args``) and --no-png:
    shared by eoir-register and eoir-batch."""
    p.add_argument("--inverse", action="store_true",
                   help="also write inverse_displacement.nii: the exact inverse on the moving "
                        "image's grid (LPS mm, moving point y -> fixed point y + d'(y), the "
                        "initial linear part included)")
    p.add_argument("--model", default=DEFAULTS.model,
                   help="bundled model name (see eoir-models) or a model file path")
    p.add_argument("--device", default=DEFAULTS.device, choices=DEVICES)
    p.add_argument("--threads", type=int, default=DEFAULTS.threads,
                   help="CPU threads (default: torch's choice)")
    p.add_argument("--working-spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   default=DEFAULTS.working_spacing,
                   help="override the model card's working spacing (mm)")
    p.add_argument("--intensity-window", type=float, nargs=4, default=DEFAULTS.intensity_window,
                   metavar=("FIXED_LOW", "FIXED_HIGH", "MOVING_LOW", "MOVING_HIGH"),
                   help="intensity windows in image units (e.g. CT in HU) instead of the model "
                        "card's normalisation")
    p.add_argument("--init", choices=INITIAL_ALIGNMENTS, default=DEFAULTS.initial_alignment,
                   help="initial linear alignment before the deformable step: auto (default: affine "
                        "unless the inputs are already aligned), none, com (centres of mass), "
                        "rigid or affine (mutual information on a coarse grid); included in "
                        "displacement.nii, also written to affine.tfm")
    p.add_argument("--initial-transform", metavar="FILE",
                   help="linear ITK transform file (.tfm/.txt/.mat/.h5) mapping fixed points to "
                        "moving points, used as the starting point (overrides --init)")
    p.add_argument("--contrast", choices=CONTRASTS, default=DEFAULTS.contrast,
                   help="same: one contrast (the multi-scale LNCC optimisation); different: two "
                        "contrasts, e.g. T1 and T2 (the multi-scale MIND-SSC optimisation: the "
                        "bundled models are single-contrast; a model on MIND-SSC inputs keeps its "
                        "network); auto (default): decided from the images' correlation after "
                        "the initial alignment (written to report.json)")
    network = p.add_mutually_exclusive_group()
    network.add_argument("--network", action="store_true",
                         help="run the network first whatever the contrast, its field the "
                              "optimisation's start (by default it runs only with --refine 0, "
                              "or for two contrasts with a contrast-agnostic model: before the "
                              "optimisation it cost time and gained no accuracy on real brains)")
    network.add_argument("--no-network", action="store_true",
                         help="never run the network: the optimisation alone, from the initial "
                              "alignment (needs the optimisation: not with --refine 0)")
    p.add_argument("--preset", choices=PRESETS, default=DEFAULTS.preset,
                   help="schedule of the optimisation (LNCC or MIND-SSC), coarse "
                        "to fine down to the fixed image's own resolution: fast, default or "
                        "accurate (README, Benchmarks: what each gains and costs)")
    p.add_argument("--refine", type=int, default=DEFAULTS.refine_iterations, metavar="N",
                   help="optimisation steps at the finest scale of --preset (default: the "
                        "preset's); 0 = off (the network alone)")
    p.add_argument("--refine-seconds", type=float, default=DEFAULTS.refine_seconds,
                   help="time budget for the refinement (stops early when exceeded)")
    p.add_argument("--refine-similarity", choices=REFINE_SIMILARITIES,
                   default=DEFAULTS.refine_similarity,
                   help="similarity of the refinement (default: follows --contrast): lncc (one "
                        "contrast) or mind (MIND-SSC descriptors, two contrasts, e.g. T1 and T2)")
    p.add_argument("--no-foreground-box", action="store_true",
                   help="register on the whole fixed grid; by default the network and the "
                        "optimisation cover the fixed image's foreground (e.g. a CT's body) plus "
                        "25 mm when that leaves out at least a fifth of the grid")
    p.add_argument("--no-png", action="store_true", help="skip overview.png")


def read_initial_transform(path: str | None):
    """The 4x4 LPS matrix (fixed point -> moving point) of a linear ITK transform file."""
    if not path:
        return None
    import SimpleITK as sitk

    from EOIRRegistrationLib.engine.alignment import matrix_from_transform
    try:
        transform = sitk.ReadTransform(path)
    except RuntimeError as exc:
        raise InputError(f"cannot read the initial transform {path}: not an ITK transform "
                         "file") from exc
    return matrix_from_transform(transform)


def options_from_args(args: argparse.Namespace) -> RegistrationOptions:
    window = args.intensity_window
    return RegistrationOptions(
        model=args.model, device=args.device, threads=args.threads,
        working_spacing=args.working_spacing,
        intensity_window=None if window is None else (window[:2], window[2:]),
        initial_alignment=args.init,
        initial_transform=read_initial_transform(args.initial_transform),
        contrast=args.contrast, preset=args.preset,
        network=True if args.network else False if args.no_network else None,
        refine_iterations=args.refine, refine_seconds=args.refine_seconds,
        refine_similarity=args.refine_similarity, inverse=args.inverse,
        foreground_box=not args.no_foreground_box)


def stderr_progress(quiet: bool):
    start = time.perf_counter()

    def report(stage: str, fraction: float):
        if not quiet:
            print(f"[{100 * fraction:5.1f}%] {time.perf_counter() - start:6.1f} s  {stage}",
                  file=sys.stderr, flush=True)
    return report


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    keep_freed_memory()
    from EOIRRegistrationLib.cli.outputs import register_files, summary
    with raise_on_signals():
        try:
            options = options_from_args(args)
            report = register_files(args.fixed, args.moving, args.output_dir, options,
                                    moving_labels=args.moving_labels,
                                    fixed_labels=args.fixed_labels, fixed_mask=args.fixed_mask,
                                    moving_mask=args.moving_mask, png=not args.no_png,
                                    initial_transform_file=args.initial_transform,
                                    overwrite=args.overwrite, progress=stderr_progress(args.quiet))
        except EOIRError as exc:
            print(f"eoir-register: error: {exc}", file=sys.stderr)
            return 2
        except Interrupted as exc:
            print(message("eoir-register", exc, args.output_dir), file=sys.stderr)
            return exc.exit_code
    print(summary(report))
    print(f"outputs in {args.output_dir}")
    return 0
