"""How exact the inverse transform is on real brains: |forward o inverse - identity| in mm.

For each real-on-real pair of ``bench_real.py`` (the same volumes, /work/shared/data), the
command line registers with ``--inverse`` (default settings otherwise) in a child process limited
to --threads threads, writing ``displacement.nii`` (fixed grid, fixed point x -> moving point
x + d(x)) and ``inverse_displacement.nii`` (moving grid, moving point y -> fixed point y + d'(y)).
The residual is computed here with SimpleITK only, not with the engine's code: the forward field
is resampled (linear) at the points ``y + d'(y)`` through a ``DisplacementFieldTransform`` of
the inverse, so ``r(y) = d'(y) + d(y + d'(y))`` is how far the round trip y -> fixed -> moving
misses y. It is summarised over the moving image's brain-mask voxels whose inverse lies inside
the fixed field of view (``inside %``): mean, 99th percentile and maximum, with the seconds the
inversion took (report.json, stage "inverting").

    python benchmarks/bench_inverse.py [--data /work/shared/data] [--threads 2]
        [--pairs 'subj1<-subj2' ...] [--work-dir DIR] [--downsample F] [--save-results]

--save-results writes the table into benchmarks/results.json, section ``inverse`` (README block
``<!-- results:inverse -->``; ``python benchmarks/results.py --write-readme``). Exits with 2 when
the data folder is missing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ROOT = HERE.parent


def residuals(fixed_path: str, moving_mask_path: str, out: Path) -> np.ndarray:
    """|d'(y) + d(y + d'(y))| (mm) at the moving brain-mask voxels whose inverse lies inside
    the fixed field of view, with SimpleITK only."""
    import SimpleITK as sitk
    forward = sitk.ReadImage(str(out / "displacement.nii"), sitk.sitkVectorFloat64)
    inverse = sitk.ReadImage(str(out / "inverse_displacement.nii"), sitk.sitkVectorFloat64)
    mask = sitk.ReadImage(moving_mask_path)
    inverse_values = sitk.GetArrayFromImage(inverse)
    # d at y + d'(y): the forward field resampled onto the moving grid through the inverse
    psi = sitk.DisplacementFieldTransform(sitk.Image(inverse))
    d_at = sitk.GetArrayFromImage(sitk.Resample(forward, inverse, psi, sitk.sitkLinear,
                                                np.nan, sitk.sitkVectorFloat64))
    # inside: the fixed image read through psi is defined (default value outside: -1)
    fixed_ones = sitk.Cast(sitk.ReadImage(fixed_path) * 0 + 1, sitk.sitkFloat32)
    inside = sitk.GetArrayFromImage(sitk.Resample(fixed_ones, inverse, psi, sitk.sitkLinear,
                                                  -1.0, sitk.sitkFloat32)) > 0.5
    in_mask = sitk.GetArrayFromImage(sitk.Resample(mask, inverse, sitk.Transform(),
                                                   sitk.sitkNearestNeighbor, 0)) > 0
    r = np.linalg.norm(inverse_values + d_at, axis=-1)
    keep = in_mask & inside & np.isfinite(r)
    return r[keep], 100.0 * keep.sum() / max(1, in_mask.sum())


def register(fixed: str, moving: str, out: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads),
           "PYTHONPATH": str(ROOT / "EOIRRegistration")}
    cmd = [sys.executable, "-m", "EOIRRegistrationLib", "register", fixed, moving,
           "--output-dir", str(out), "--inverse", "--threads", str(threads), "--no-png",
           "--quiet", "--overwrite"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {done.returncode}:\n{done.stderr}")
    return json.loads((out / "report.json").read_text())


def main(argv=None) -> int:
    import bench_real
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", nargs="+", default=bench_real.pair_names())
    p.add_argument("--work-dir", default=None)
    p.add_argument("--downsample", type=float, default=1.0)
    p.add_argument("--save-results", action="store_true")
    args = p.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"bench_inverse: data folder {args.data} not found (see its MANIFEST.md)",
              file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="eoir-bench-inverse-"))
    names = {v for pair in args.pairs for v in bench_real.split_pair(pair)}
    vols = bench_real.make_volumes(args.data, work / "volumes", names,
                                   downsample=args.downsample)
    rows = []
    print(f"{'pair':<14} {'mean mm':>9} {'p99 mm':>9} {'max mm':>9} {'inside %':>9} "
          f"{'invert s':>9} {'total s':>8}")
    for pair in args.pairs:
        f, m = bench_real.split_pair(pair)
        out = work / pair.replace("<-", "_from_")
        report = register(vols[f]["image"], vols[m]["image"], out, args.threads)
        r, inside = residuals(vols[f]["image"], vols[m]["mask"], out)
        row = {"label": pair, "residual_mean_mm": float(f"{r.mean():.3g}"),
               "residual_p99_mm": float(f"{np.percentile(r, 99):.3g}"),
               "residual_max_mm": float(f"{r.max():.3g}"),
               "inside_percent": round(float(inside), 2),
               "inverse_seconds": report["seconds"].get("inverting"),
               "seconds": report["seconds"].get("total")}
        rows.append(row)
        print(f"{pair:<14} {row['residual_mean_mm']:>9.1e} {row['residual_p99_mm']:>9.1e} "
              f"{row['residual_max_mm']:>9.1e} {row['inside_percent']:>9.1f} "
              f"{row['inverse_seconds']:>9.1f} {row['seconds']:>8.1f}", flush=True)
    if args.save_results:
        import results
        from bench_brain import _engine_version as engine_version
        results.record("inverse", rows, {
            "first_header": "pair", "rank": False,
            "source": "python benchmarks/bench_inverse.py " + shlex.join(argv or sys.argv[1:]),
            "measured": f"{datetime.date.today().isoformat()} (engine {engine_version()})",
            "machine": f"{os.cpu_count()} CPUs visible, no GPU, {args.threads} threads, "
                       f"volumes at {args.downsample:g} mm, residual over the moving brain mask"})
        print("saved section inverse (python benchmarks/results.py --write-readme)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
