"""End-to-end CPU benchmark of eoir-register (reading, every stage, writing) with peak memory,
next to SimpleITK's diffeomorphic demons on the same pairs in the same run.

Each run is a fresh process limited to --threads threads; peak memory is that process's maximum
resident set (Linux VmHWM). Pairs are synthetic phantoms (1 mm, known deformation) at
128^3 and 160x192x224. Prints a table; asserts nothing.

    python benchmarks/bench_pipeline.py [--threads 2] [--sizes 128,128,128 160,192,224]
        [--models default ...] [--refine N] [--no-demons]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINE = HERE.parent / "EOIRRegistration"
sys.path.insert(0, str(ENGINE))

DEMONS = r"""
import sys, time, SimpleITK as sitk
sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(sys.argv[4]))
t0 = time.perf_counter()
fixed = sitk.ReadImage(sys.argv[1], sitk.sitkFloat32)
moving = sitk.ReadImage(sys.argv[2], sitk.sitkFloat32)
moving = sitk.HistogramMatching(moving, fixed, 256, 7)
demons = sitk.DiffeomorphicDemonsRegistrationFilter()
demons.SetNumberOfIterations(50)
demons.SetStandardDeviations(1.5)
field = demons.Execute(fixed, moving)
tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
warped = sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0)
sitk.WriteImage(warped, sys.argv[3] + "/warped.nii.gz")
sitk.WriteImage(tx.GetDisplacementField(), sys.argv[3] + "/displacement.nii")
print(time.perf_counter() - t0)
"""


def make_pair(folder: Path, shape):
    import SimpleITK as sitk

    from EOIRRegistrationLib.training.phantom import make_phantom_pair
    pair = make_phantom_pair(seed=11, shape=shape, spacing=(1.0, 1.0, 1.0), rotation=(0, 0, 0),
                             origin=tuple(-s / 2 for s in reversed(shape)), velocity=4.0)
    paths = {}
    for name in ("fixed", "moving", "fixed_labels", "moving_labels", "true_displacement"):
        paths[name] = folder / f"{name}.nii.gz"
        sitk.WriteImage(getattr(pair, name), str(paths[name]))
    return paths


# Each child prints its own peak resident memory (Linux VmHWM) at exit.
WRAPPER = r"""
import atexit, runpy, sys
def peak():  # VmHWM is this process's own peak; ru_maxrss would include the parent's at fork
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print("PEAK_RSS_KB", hwm, file=sys.stderr)
atexit.register(peak)
kind, target, sys.argv = sys.argv[1], sys.argv[2], [sys.argv[2]] + sys.argv[3:]
if kind == "module":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    exec(compile(open(target).read(), target, "exec"), {"__name__": "__main__"})
"""


def run_child(kind: str, target: str, argv, threads: int):
    """Run a module or script in a fresh process; returns (wall seconds, peak GB)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(ENGINE))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, kind, target, *map(str, argv)],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{target} failed:\n{proc.stderr[-2000:]}")
    peak_kb = [int(line.split()[1]) for line in proc.stderr.splitlines()
               if line.startswith("PEAK_RSS_KB")]
    return wall, peak_kb[-1] / 1024 ** 2


def score(out: Path, paths) -> dict:
    import numpy as np
    import SimpleITK as sitk

    from EOIRRegistrationLib.core import geometry, metrics, qa
    from EOIRRegistrationLib.training.phantom import displacement_error_mm
    disp = sitk.ReadImage(str(out / "displacement.nii"))
    err = displacement_error_mm(disp, sitk.ReadImage(str(paths["true_displacement"])),
                                sitk.ReadImage(str(paths["fixed_labels"])))
    fl = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["fixed_labels"]))).astype(int)
    ml = sitk.ReadImage(str(paths["moving_labels"]))
    tx = sitk.DisplacementFieldTransform(sitk.Cast(disp, sitk.sitkVectorFloat64))
    wl = sitk.GetArrayFromImage(sitk.Resample(ml, disp, tx, sitk.sitkNearestNeighbor)).astype(int)
    dice = qa.dice(fl, wl)
    d, grid = geometry.displacement_from_image(disp)
    summary = qa.jacobian_summary(metrics.jacobian_determinant(d.float(), grid).numpy())
    return {"dice": float(np.nanmean(list(dice.values()))), "err": err["mean_error_mm"],
            "ident": err["identity_mean_error_mm"], "fold": summary["folding_percent"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", nargs="+", default=["128,128,128", "224,192,160"],
                    help="array shapes k,j,i (the second default is 160x192x224 in x,y,z)")
    ap.add_argument("--models", nargs="+", default=["default"],
                    help="bundled model names or model files, each run on every pair")
    ap.add_argument("--refine", type=int, default=None,
                    help="--refine N for our models (default: eoir-register's own default)")
    ap.add_argument("--no-demons", action="store_true")
    ap.add_argument("--save-results", action="store_true",
                    help="write the table into benchmarks/results.json (section phantoms); the "
                         "README's table is generated from it (benchmarks/results.py)")
    args = ap.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs visible, {args.threads} threads "
          f"per run, models {', '.join(args.models)}")
    rows = []
    for size in args.sizes:
        shape = tuple(int(s) for s in size.split(","))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            paths = make_pair(tmp, shape)
            for model in args.models:
                out = tmp / f"eoir-{len(rows)}"
                argv = ["register", paths["fixed"], paths["moving"], "--output-dir", out,
                        "--model", model, "--threads", args.threads, "--no-png", "--quiet"]
                if args.refine is not None:
                    argv += ["--refine", args.refine]
                wall, peak = run_child("module", "EOIRRegistrationLib", argv, args.threads)
                report = json.loads((out / "report.json").read_text())
                rows.append({"method": report["model"]["name"], "size": shape, "wall": wall,
                             "peak": peak, "stages": report["seconds"], **score(out, paths)})
            if not args.no_demons:
                dout = tmp / "demons"
                dout.mkdir()
                script = tmp / "demons.py"
                script.write_text(DEMONS)
                wall, peak = run_child("script", str(script), [paths["fixed"], paths["moving"],
                                                               dout, args.threads], args.threads)
                rows.append({"method": "SimpleITK diffeomorphic demons (50 it)", "size": shape,
                             "wall": wall, "peak": peak, "stages": {}, **score(dout, paths)})
    print(f"\n{'method':<40} {'size (x,y,z)':<14} {'wall s':>7} {'peak GB':>8} {'Dice':>6} "
          f"{'err mm':>7} {'ident mm':>8} {'fold %':>7}")
    for r in rows:
        size = "x".join(str(s) for s in reversed(r["size"]))
        print(f"{r['method']:<40} {size:<14} {r['wall']:7.1f} {r['peak']:8.2f} {r['dice']:6.3f} "
              f"{r['err']:7.2f} {r['ident']:8.2f} {r['fold']:7.3f}")
    print("\nSeconds per stage of our models (inside the process; wall also counts interpreter start-up):")
    for r in rows:
        if r["stages"]:
            stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items() if v is not None)
            print(f"  {r['method']} {'x'.join(str(s) for s in reversed(r['size']))}: {stages}")
    if args.save_results:
        save_results(rows, args)
    return 0


def save_results(rows, args) -> None:
    """The rows as the ``phantoms`` section of benchmarks/results.json."""
    import results

    labels = {"SimpleITK diffeomorphic demons (50 it)": "SimpleITK diffeomorphic demons"}
    results.record("phantoms", [
        {"label": labels.get(r["method"], f"EOIR `{r['method']}`"),
         "size": "x".join(str(s) for s in reversed(r["size"])), "seconds": round(r["wall"], 1),
         "peak_gb": round(r["peak"], 2), "dice": round(r["dice"], 3),
         "error_mm": round(r["err"], 2), "identity_error_mm": round(r["ident"], 2),
         "folding_percent": round(r["fold"], 3)} for r in rows],
        {"source": f"benchmarks/bench_pipeline.py --threads {args.threads}",
         "measured": time.strftime("%Y-%m-%d"),
         "machine": f"{os.cpu_count()} CPUs visible, no GPU, {args.threads} threads per run, wall "
                    "time of the whole process"})
    print("saved to benchmarks/results.json (python benchmarks/results.py --write-readme)")


if __name__ == "__main__":
    sys.exit(main())
