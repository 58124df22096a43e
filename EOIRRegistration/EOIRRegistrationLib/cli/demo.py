"""``python -m EOIRRegistrationLib demo``: the bundled phantom pair (a known deformation on an
oblique, anisotropic grid), registered with the default model and options, scored against the
truth."""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from EOIRRegistrationLib.cli.interrupts import Interrupted, message, raise_on_signals
from EOIRRegistrationLib.core.errors import EOIRError
from EOIRRegistrationLib.engine.allocator import keep_freed_memory
from EOIRRegistrationLib.engine.options import DEVICES, RegistrationOptions

DEFAULTS = RegistrationOptions()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m EOIRRegistrationLib demo", description=(
        "Generate the bundled phantom pair (known deformation), register it with the default "
        "model and settings and report how well the true displacement is recovered."))
    p.add_argument("--output-dir", default="eoir-demo-output")
    p.add_argument("--model", default=DEFAULTS.model)
    p.add_argument("--device", default=DEFAULTS.device, choices=DEVICES)
    p.add_argument("--threads", type=int, default=DEFAULTS.threads)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    keep_freed_memory()
    out = Path(args.output_dir)
    with raise_on_signals():
        try:
            report = _run(args, out)
        except EOIRError as exc:
            print(f"demo: error: {exc}", file=sys.stderr)
            return 2
        except Interrupted as exc:
            print(message("demo", exc, out), file=sys.stderr)
            return exc.exit_code
    from EOIRRegistrationLib.cli.outputs import summary
    err = report["demo_recovery"]
    print(summary(report))
    print(f"displacement error vs the known truth: mean {err['mean_error_mm']:.2f} mm, "
          f"95th percentile {err['p95_error_mm']:.2f} mm (identity: "
          f"{err['identity_mean_error_mm']:.2f} / {err['identity_p95_error_mm']:.2f} mm)")
    print(f"outputs (and the sample pair in sample/) in {out}; look at "
          f"{out / 'overview.png'}")
    return 0


def _run(args, out: Path) -> dict:
    """The phantom pair registered; the pair itself is written with the outputs (sample/)."""
    import SimpleITK as sitk

    from EOIRRegistrationLib.cli.outputs import register_files
    from EOIRRegistrationLib.cli.register import stderr_progress
    from EOIRRegistrationLib.training.phantom import displacement_error_mm, make_phantom_pair
    options = RegistrationOptions(model=args.model, device=args.device, threads=args.threads)
    pair = make_phantom_pair()
    images = {"fixed": pair.fixed, "moving": pair.moving, "fixed_labels": pair.fixed_labels,
              "moving_labels": pair.moving_labels, "true_displacement": pair.true_displacement}

    def amend(report, result):
        for role in ("fixed", "moving"):
            report["inputs"][role] = str(out / "sample" / f"{role}.nii.gz")
        written = sitk.Cast(result.displacement, sitk.sitkVectorFloat32)  # as displacement.nii
        report["demo_recovery"] = displacement_error_mm(written, pair.true_displacement,
                                                        pair.fixed_labels)

    with tempfile.TemporaryDirectory(prefix="eoir-demo-") as tmp:
        sample = Path(tmp)
        for name, image in images.items():
            sitk.WriteImage(image, str(sample / f"{name}.nii.gz"))
        return register_files(
            str(sample / "fixed.nii.gz"), str(sample / "moving.nii.gz"), str(out), options,
            moving_labels=str(sample / "moving_labels.nii.gz"),
            fixed_labels=str(sample / "fixed_labels.nii.gz"), overwrite=args.overwrite,
            progress=stderr_progress(False), amend_report=amend,
            extra_files={"sample": lambda p: shutil.copytree(sample, p)})
