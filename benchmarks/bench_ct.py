"""CT-sized benchmark: one 512x512x320 pair (0.7x0.7x1.0 mm) with default settings, end to end.

The pair (``ct_phantom.py``, generated once into --work-dir and reused): a trunk phantom in air
(-1000 HU; soft tissue 40 HU, bone 700 HU, lungs, organs) and the same anatomy through a known
smooth deformation (rotation, shift and Gaussian bumps; up to ~10 mm). There is no CT pair in
/work/shared/data (see its MANIFEST.md).

The run: ``python -m EOIRRegistrationLib register FIXED MOVING --output-dir OUT --threads N
--no-png --quiet`` plus --ours-args, in a fresh child process (``bench_brain.run_child``, the
child being ``bench_real._child_ours``: default settings, timed from reading the inputs to
writing the outputs), peak memory = the child's VmHWM. The child also records the peak resident
memory of each stage (VmHWM read and reset through /proc/self/clear_refs at every stage
boundary of the engine): "reading inputs" is everything before the first stage, "writing
outputs" everything after the last, imports included in the first.

Scored in the parent with SimpleITK only: Dice of the moving labels warped through
displacement.nii by nearest neighbour (mean over ``ct_phantom.SCORED``), and the error at 2000
landmarks on the organ and bone surfaces (|x + d(x) - true moving point|, mm, d read through
``sitk.DisplacementFieldTransform``), against the same figures without registration.

    python benchmarks/bench_ct.py [--work-dir /tmp/eoir-bench-ct] [--threads 2]
        [--ours-args '--preset fast'] [--save-results]

Needs ~10 GB of free memory for the pair and one run (the machine's 24 GB: never two at once).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "EOIRRegistration"))

import bench_brain  # noqa: E402  (the process runner)
import ct_phantom  # noqa: E402

TARGET_SECONDS, TARGET_PEAK_GB = 60.0, 8.0


# ---------------------------------------------------------------------------------------------
# Child side: bench_real's runner of ours, with the peak memory of each stage.

def _vm_hwm_kb() -> int:
    return bench_brain._peak_kb()


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _watch_stages(peaks: dict, whole: dict) -> None:
    """Record the peak resident GB of each engine stage into ``peaks`` and the whole run's peak
    (kB; it survives the per-stage resets) into ``whole["peak_kb"]``."""
    from EOIRRegistrationLib.engine import pipeline
    start, done = pipeline._Stages.start, pipeline._Stages.done
    state = {"name": "reading inputs"}

    def close(next_name):
        hwm = _vm_hwm_kb()
        whole["peak_kb"] = max(whole["peak_kb"], hwm)
        peaks[state["name"]] = round(hwm / 1024 ** 2, 2)
        _reset_peak()
        state["name"] = next_name

    def start_hook(self, name):
        close(name)
        return start(self, name)

    def done_hook(self):
        close("writing outputs")
        return done(self)

    pipeline._Stages.start, pipeline._Stages.done = start_hook, done_hook
    whole["close"] = close


def child_main(argv) -> int:
    import bench_real
    method, fixed, moving, out, threads, opts = argv
    peaks, whole = {}, {"peak_kb": 0}
    _watch_stages(peaks, whole)
    out = Path(out).resolve()
    threads, opts = int(threads), json.loads(opts)
    seconds, extra = bench_real._child_ours(fixed, moving, out, threads, opts)
    whole["close"](None)
    (out / "child.json").write_text(json.dumps({
        "seconds": seconds, "peak_kb": whole["peak_kb"], "stage_peak_gb": peaks, **extra}))
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side.

def score(paths: dict, displacement: Path | None) -> dict:
    """Mean Dice over the scored labels and the landmark error (mm) through ``displacement``
    (None: no registration), with SimpleITK."""
    import numpy as np
    import SimpleITK as sitk

    from EOIRRegistrationLib.core import qa
    marks = json.loads(paths["landmarks"].read_text())
    fixed_points = np.asarray(marks["fixed_points_lps"])
    truth = np.asarray(marks["moving_points_lps"])
    fixed_labels = sitk.ReadImage(str(paths["fixed_labels"]))
    moving_labels = sitk.ReadImage(str(paths["moving_labels"]))
    if displacement is None:
        tx = sitk.Transform()
    else:
        field = sitk.ReadImage(str(displacement), sitk.sitkVectorFloat64)
        tx = sitk.DisplacementFieldTransform(field)
        del field
    warped = sitk.Resample(moving_labels, fixed_labels, tx, sitk.sitkNearestNeighbor)
    dice = qa.dice(sitk.GetArrayViewFromImage(fixed_labels),
                   sitk.GetArrayViewFromImage(warped), ct_phantom.SCORED)
    mapped = np.asarray([tx.TransformPoint(tuple(p)) for p in fixed_points])
    errors = np.linalg.norm(mapped - truth, axis=1)
    return {"dice": float(np.mean(list(dice.values()))),
            "dice_per_label": {ct_phantom.LABELS[k]: round(v, 4) for k, v in dice.items()},
            "error_mm": float(errors.mean()), "error_p95_mm": float(np.percentile(errors, 95))}


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_child":
        return child_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default="/tmp/eoir-bench-ct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ours-args", default="", help="extra eoir-register arguments")
    ap.add_argument("--size", type=int, nargs=3, default=ct_phantom.CT_SIZE, metavar=("X", "Y", "Z"))
    ap.add_argument("--spacing", type=float, nargs=3, default=ct_phantom.CT_SPACING,
                    metavar=("X", "Y", "Z"))
    ap.add_argument("--save-results", action="store_true",
                    help="write the row into benchmarks/results.json (section ct); the README's "
                         "table is generated from it (benchmarks/results.py --write-readme)")
    args = ap.parse_args(argv)
    work = Path(args.work_dir)
    t0 = time.perf_counter()
    paths = ct_phantom.make_ct_pair(work / "pair", tuple(args.size), tuple(args.spacing))
    print(f"pair in {work / 'pair'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    res = bench_brain.run_child(sys.executable, "ours", str(paths["fixed"]), str(paths["moving"]),
                                work / "ours", args.threads, {"args": args.ours_args},
                                script=__file__)
    report = json.loads((work / "ours" / "report.json").read_text())
    before = score(paths, None)
    after = score(paths, work / "ours" / "displacement.nii")
    size_gb = (work / "ours" / "displacement.nii").stat().st_size / 1024 ** 3
    row = {"seconds": res["seconds"], "process_seconds": res["process_seconds"],
           "peak_gb": res["peak_gb"], "stage_seconds": res["stages"],
           "stage_peak_gb": res["stage_peak_gb"], "before": before, "after": after,
           "folding_percent": report["quality"]["folding_percent"],
           "sdlogj": report["quality"]["sdlogj"], "displacement_file_gb": size_gb,
           "method": res["method"], "working_grid": report["working_grid"]}
    print(json.dumps(row, indent=1))
    ok = row["process_seconds"] <= TARGET_SECONDS and row["peak_gb"] <= TARGET_PEAK_GB
    print(f"\n{args.size[0]}x{args.size[1]}x{args.size[2]}: {row['process_seconds']:.1f} s "
          f"(target {TARGET_SECONDS:g}), peak {row['peak_gb']:.2f} GB (target {TARGET_PEAK_GB:g}),"
          f" Dice {before['dice']:.3f} -> {after['dice']:.3f}, landmark error "
          f"{before['error_mm']:.2f} -> {after['error_mm']:.2f} mm: "
          f"{'within' if ok else 'OUTSIDE'} the target")
    if args.save_results:
        save_results(row, args)
    return 0


def save_results(row: dict, args) -> None:
    import results
    size = "x".join(str(v) for v in args.size)
    label = "EOIR default settings" + (f" (`{args.ours_args}`)" if args.ours_args else "")
    results.record("ct", [
        {"label": "no registration", "baseline": True, "size": size,
         "dice": round(row["before"]["dice"], 3), "error_mm": round(row["before"]["error_mm"], 2)},
        {"label": label, "size": size, "dice": round(row["after"]["dice"], 3),
         "error_mm": round(row["after"]["error_mm"], 2),
         "folding_percent": round(row["folding_percent"], 3),
         "seconds": round(row["process_seconds"], 1), "peak_gb": round(row["peak_gb"], 2)}],
        {"source": "benchmarks/bench_ct.py" + (f" --ours-args '{args.ours_args}'"
                                                if args.ours_args else ""),
         "measured": time.strftime("%Y-%m-%d"),
         "machine": f"{os.cpu_count()} CPUs visible, no GPU, {args.threads} threads, wall time "
                    "of the whole process",
         "first_header": f"CT-sized phantom pair, {size} voxels of "
                         f"{'x'.join(f'{v:g}' for v in args.spacing)} mm"})
    print("saved to benchmarks/results.json (python benchmarks/results.py --write-readme)")


if __name__ == "__main__":
    sys.exit(main())
