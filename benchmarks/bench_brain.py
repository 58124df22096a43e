"""Brain benchmark: our models against SimpleITK demons, elastix and ANTs SyN on real anatomy.

Pairs (``brain_pairs.py``, deterministic): fixed = the real skull-stripped T1
(real_t1_freesurfer/subject_t1_norm.nii.gz, FreeSurfer aparc.a2009s+aseg labels mapped to aseg
numbers) cropped to the brain's bounding box + 10 mm (151 x 157 x 200 voxels, 1 mm); moving =
"T1-like" images rendered from the held-out SynthSeg label maps 14, 15, 16 (one intensity per
label = the real T1's mean in that label, skull-stripped, 0.5 mm blur, noise, fixed seeds), plus
map 14 with a 20 degree rotation and a 15 mm shift written into its header ("seg14-misaligned"),
and, when the MNI152 2009a template is at hand (``--template-dir``, or nilearn installed in the
environment running this script: it ships the files), the template T1 as a moving image
("mni152": real intensities on both sides, scored on grey and white matter only, in a table of
its own; see brain_pairs.py). ``--t2-pairs NN ...`` adds the maps rendered T2-like
("segNN-t2": two contrasts, white matter dark and CSF bright against the real T1; a table of
their own; demons, a one-contrast method, is not run on them). Without nilearn: ``pip download
nilearn --no-deps`` and unzip
``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`` into a folder.

Methods, each in a fresh child process limited to --threads threads (OMP/MKL/ITK variables and
the tools' own thread settings), timed inside the child from reading the inputs to writing the
outputs (imports excluded), peak memory = the child's Linux VmHWM (imports included):

* ours: ``eoir-register FIXED MOVING --model M --device cpu [--refine N]``, default settings
  otherwise (``--init auto``: the affine unless already aligned; ``--contrast auto``: the
  MIND-SSC refinement alone on two contrasts; no ``--refine`` for the default N) (run
  as ``EOIRRegistrationLib.cli.register.main`` in the child, which is what ``eoir-register`` calls)
  for every model of --models (default: all bundled models) and every N of --refine-iterations
  (default: the engine's default refinement, named "ours:MODEL", and 0, "ours:MODEL (network
  only)");
* demons: SimpleITK DiffeomorphicDemonsRegistrationFilter, 3 levels (shrink 4/2/1, 50/50/25
  iterations, field smoothing 1.5 voxels) after an affine pre-alignment computed with OUR
  ``EOIRRegistrationLib.engine.alignment`` module (``optimised_matrix(..., "affine")``, what
  ``--init affine``/``auto`` use: Mattes MI on 4 mm copies) and histogram matching (256 bins,
  7 points, as in bench_pipeline.py);
* elastix (itk-elastix): default "affine" + default "bspline" parameter maps, --threads threads
  (ITK's global default: itk-elastix 0.25.4 segfaults when given number_of_threads=2);
  total field from ``itk.transformix_deformation_field``;
* ants (antspyx): ``ants.registration(type_of_transform="SyN")`` with
  ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=--threads; total field = its fwdtransforms (affine .mat,
  warp .nii.gz) composed with SimpleITK: ``CompositeTransform([affine, warp])`` (the warp acts
  first: x -> A(x + w(x))), sampled by ``sitk.TransformToDisplacementField``.

Every method leaves one total displacement field on the fixed grid (LPS mm, fixed point x ->
moving point x + d(x)); the parent scores them all the same way with EOIRRegistrationLib.core (qa, metrics):
mean Dice and mean HD95 (mm) over the standard 30 structures that both label maps have, except
24 (CSF: a few sulcal voxels in FreeSurfer, the whole extra-cerebral CSF shell in SynthSeg; 31/63,
choroid plexus, are missing from the SynthSeg maps, so 27 structures count), moving labels warped
by nearest neighbour through the field with SimpleITK; % folding (det J <= 0) and SDlogJ over
the whole fixed grid. An "identity" row (no registration) gives the starting point.

--check (cheap, once per run) compares the labels warped through each method's field with the
tool's own nearest-neighbour warp of the labels (ants.apply_transforms, transformix with a
nearest-neighbour resampler, our CLI's --moving-labels; for demons, whose "tool" is our own
composition, the field written out by hand in numpy, x -> A(x + d(x))) and, for ANTs and
demons, with the field composed in the reverse order; agreement
must exceed 99 % of the voxels where either label map is non-zero. With --check the timings
include that extra work: time without it.

Peers need antspyx and itk-elastix (requirements-bench.txt). antspyx 0.6.3 pins numpy < 2.4 and
scipy < 1.16, older than requirements-dev.txt, so install them in a separate environment that
sees this one's packages and point --peer-python at it:

    python -m venv --system-site-packages /tmp/bench-venv
    /tmp/bench-venv/bin/pip install -r requirements-bench.txt
    python benchmarks/bench_brain.py --peer-python /tmp/bench-venv/bin/python \
        [--data /work/shared/data] [--threads 2] [--pairs 14 15 16] [--misaligned 14] \
        [--t2-pairs 14 15 16] [--methods ours demons elastix ants] [--models NAME ...] \
        [--refine-iterations N ...] \
        [--results results.json] [--plot accuracy_vs_time.png] [--check] [--downsample F] \
        [--work-dir DIR]

--results FILE keeps rows across runs: existing rows are loaded, the requested methods (and
models) are re-run on the requested pairs and replace their old rows, and all rows are saved
(so the peers can be run once and our models re-run later). --downsample F resamples every pair to
F mm (development only; rows remember it and tables show the current F only). Needs no GPU.
Exits with 2 when the data folder is missing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINE = HERE.parent / "EOIRRegistration"
METHODS = ("ours", "demons", "elastix", "ants")
DEMONS_LEVELS = ((4, 50), (2, 50), (1, 25))  # (shrink factor, iterations)
DEMONS_SMOOTHING_VOXELS = 1.5
EXCLUDED_STRUCTURES = {24: "CSF: different definitions in FreeSurfer and SynthSeg"}
CHECK_MIN_AGREEMENT = 0.99


# ---------------------------------------------------------------------------------------------
# Child side: one method, one pair. Writes OUT/displacement.nii (total field, fixed grid, LPS
# mm, fixed -> moving, float32 vectors), OUT/warped.nii.gz and OUT/child.json (seconds, peak).

#: --refine-iterations value meaning "no --refine flag" (the preset's steps)
ENGINE_DEFAULT = -1

def _peak_kb() -> int:
    """This process's own peak resident set (VmHWM; ru_maxrss would count the parent's at fork)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])


def _sitk_field(transform, reference):
    import SimpleITK as sitk
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(reference)
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    return f.Execute(transform)


def _write_field(field, path):
    import SimpleITK as sitk
    sitk.WriteImage(sitk.Cast(field, sitk.sitkVectorFloat32), str(path))


def _child_ours(fixed, moving, out, threads, opts):
    import torch  # noqa: F401  (imports before the clock, as for the other methods)

    import EOIRRegistrationLib.cli.outputs  # noqa: F401
    import EOIRRegistrationLib.engine.pipeline  # noqa: F401
    from EOIRRegistrationLib.cli import register as register_cli
    argv = [fixed, moving, "--output-dir", str(out), "--model", opts["model"],
            "--device", "cpu", "--threads", str(threads), "--no-png", "--quiet", "--overwrite"]
    if opts["refine"] != ENGINE_DEFAULT:  # the default: the preset's steps
        argv += ["--refine", str(opts["refine"])]
    if opts.get("check"):
        argv += ["--moving-labels", opts["moving_labels"]]
    t0 = time.perf_counter()
    rc = register_cli.main(argv)
    seconds = time.perf_counter() - t0
    if rc:
        raise RuntimeError(f"eoir-register exited with {rc}")
    if opts.get("check"):
        os.replace(out / "warped_labels.nii.gz", out / "tool_warped_labels.nii.gz")
    report = json.loads((out / "report.json").read_text())
    return seconds, {"stages": report.get("seconds", {}), "model": report["model"]["name"],
                     "method": report.get("method", "")}


def _affine_transform(a):
    import SimpleITK as sitk
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(float(v) for v in a[:3, :3].ravel()))
    tx.SetTranslation(tuple(float(v) for v in a[:3, 3]))
    return tx


def _child_demons(fixed_path, moving_path, out, threads, opts):
    import SimpleITK as sitk

    from EOIRRegistrationLib.engine.alignment import optimised_matrix
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    t0 = time.perf_counter()
    fixed = sitk.ReadImage(fixed_path, sitk.sitkFloat32)
    moving = sitk.ReadImage(moving_path, sitk.sitkFloat32)
    affine = _affine_transform(optimised_matrix(fixed, moving, "affine"))  # fixed -> moving point
    moving_a = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0)
    moving_a = sitk.HistogramMatching(moving_a, fixed, 256, 7)
    field = None
    for shrink, iterations in DEMONS_LEVELS:
        f, m = fixed, moving_a
        if shrink > 1:
            sigma = 0.5 * shrink * min(fixed.GetSpacing())
            f = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed, sigma), [shrink] * 3)
            m = sitk.Shrink(sitk.SmoothingRecursiveGaussian(moving_a, sigma), [shrink] * 3)
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetNumberOfIterations(iterations)
        demons.SetStandardDeviations(DEMONS_SMOOTHING_VOXELS)
        if field is None:
            field = demons.Execute(f, m)
        else:  # physical displacements: resampling onto the finer grid needs no rescaling
            init = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0,
                                 sitk.sitkVectorFloat64)
            field = demons.Execute(f, m, init)
    if field.GetSize() != fixed.GetSize():
        field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0,
                              sitk.sitkVectorFloat64)
    field.CopyInformation(fixed)
    dfield = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    # The demons field maps fixed points into the affinely resampled moving image, whose point
    # y is the moving point A(y): total x -> A(x + d(x)); CompositeTransform applies the last
    # transform of its list first.
    total = sitk.CompositeTransform([affine, dfield])
    disp = _sitk_field(total, fixed)
    warped = sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(sitk.Image(disp)),
                           sitk.sitkLinear, 0.0)
    sitk.WriteImage(warped, str(out / "warped.nii.gz"))
    _write_field(disp, out / "displacement.nii")
    seconds = time.perf_counter() - t0
    extra = {"demons_levels": DEMONS_LEVELS}
    if opts.get("check"):
        # Reference: the total map written out by hand, x -> A(x + d(x)), in numpy (two-step
        # nearest-neighbour resampling is too lossy to compare label maps with).
        import numpy as np
        a = np.asarray(affine.GetMatrix()).reshape(3, 3)
        t = np.asarray(affine.GetTranslation())  # no centre: x -> a x + t
        d = sitk.GetArrayFromImage(field).reshape(-1, 3)  # (k, j, i) voxels, (x, y, z) LPS
        idx = np.indices(fixed.GetSize()[::-1]).reshape(3, -1)[::-1].T  # (i, j, k) per voxel
        m = np.asarray(fixed.GetDirection()).reshape(3, 3) * np.asarray(fixed.GetSpacing())
        x = idx @ m.T + np.asarray(fixed.GetOrigin())
        formula = (x + d) @ a.T + t - x
        ref = sitk.GetImageFromArray(formula.reshape(*fixed.GetSize()[::-1], 3), isVector=True)
        ref.CopyInformation(fixed)
        labels = sitk.ReadImage(opts["moving_labels"])
        tool = sitk.Resample(labels, fixed, sitk.DisplacementFieldTransform(ref),
                             sitk.sitkNearestNeighbor, 0)
        sitk.WriteImage(tool, str(out / "tool_warped_labels.nii.gz"))
        reverse = _sitk_field(sitk.CompositeTransform([dfield, affine]), fixed)
        _write_field(reverse, out / "displacement_reversed.nii.gz")
        used = sitk.GetArrayFromImage(disp).reshape(-1, 3)
        extra["max_abs_mm_vs_formula"] = float(np.abs(used - formula).max())
        extra["reversed_max_abs_mm_vs_formula"] = float(
            np.abs(sitk.GetArrayFromImage(reverse).reshape(-1, 3) - formula).max())
    return seconds, extra


def _child_elastix(fixed_path, moving_path, out, threads, opts):
    import itk
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    # itk loads its modules lazily: touch what is used before starting the clock.
    _ = (itk.ParameterObject, itk.elastix_registration_method, itk.transformix_deformation_field,
         itk.imread, itk.imwrite, itk.transformix_filter)
    t0 = time.perf_counter()
    fixed = itk.imread(fixed_path, itk.F)
    moving = itk.imread(moving_path, itk.F)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("affine"))
    params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
    # Threads: ITK's global default (set above and by ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS).
    # Passing number_of_threads=2 segfaults in itk-elastix 0.25.4 (ITKElastix issue #295).
    warped, result = itk.elastix_registration_method(
        fixed, moving, parameter_object=params, log_to_console=False, output_directory=str(out))
    field = itk.transformix_deformation_field(moving, result)
    itk.imwrite(warped, str(out / "warped.nii.gz"))
    itk.imwrite(field, str(out / "displacement.nii"))
    seconds = time.perf_counter() - t0
    if opts.get("check"):
        labels = itk.imread(opts["moving_labels"], itk.F)
        nn = itk.ParameterObject.New()
        for i in range(result.GetNumberOfParameterMaps()):
            nn.AddParameterMap(result.GetParameterMap(i))
        nn.SetParameter("ResampleInterpolator", "FinalNearestNeighborInterpolator")
        nn.SetParameter("FinalBSplineInterpolationOrder", "0")
        tool = itk.transformix_filter(labels, nn, log_to_console=False)
        itk.imwrite(tool, str(out / "tool_warped_labels.nii.gz"))
    return seconds, {"parameter_maps": ["default affine", "default bspline"]}


def _child_ants(fixed_path, moving_path, out, threads, opts):
    import ants
    import SimpleITK as sitk
    ants.config._random_seed = 1  # set_ants_deterministic() would also force 1 thread
    t0 = time.perf_counter()
    fixed = ants.image_read(fixed_path)
    moving = ants.image_read(moving_path)
    reg = ants.registration(fixed, moving, type_of_transform="SyN",
                            outprefix=str(out / "ants_"))
    fwd = list(reg["fwdtransforms"])  # [warp.nii.gz, affine.mat]: antsApplyTransforms order
    warp_path = next(p for p in fwd if p.endswith((".nii.gz", ".nii")))
    affine_path = next(p for p in fwd if p.endswith(".mat"))
    fixed_s = sitk.ReadImage(fixed_path, sitk.sitkFloat32)
    affine = sitk.ReadTransform(affine_path)
    warp = sitk.DisplacementFieldTransform(sitk.ReadImage(warp_path, sitk.sitkVectorFloat64))
    # Point mapping fixed -> moving: the warp (on the fixed grid) first, then the affine:
    # x -> A(x + w(x)). CompositeTransform applies the last transform of its list first.
    disp = _sitk_field(sitk.CompositeTransform([affine, warp]), fixed_s)
    ants.image_write(reg["warpedmovout"], str(out / "warped.nii.gz"))
    _write_field(disp, out / "displacement.nii")
    seconds = time.perf_counter() - t0
    if opts.get("check"):
        labels = ants.image_read(opts["moving_labels"])
        tool = ants.apply_transforms(fixed, labels, transformlist=fwd,
                                     interpolator="nearestNeighbor")
        ants.image_write(tool, str(out / "tool_warped_labels.nii.gz"))
        _write_field(_sitk_field(sitk.CompositeTransform([warp, affine]), fixed_s),
                     out / "displacement_reversed.nii.gz")
    return seconds, {"fwdtransforms": [Path(p).name for p in fwd]}


def child_main(argv) -> int:
    method, fixed, moving, out, threads, opts = argv
    out, threads, opts = Path(out).resolve(), int(threads), json.loads(opts)
    if method != "ours":  # eoir-register refuses an output folder that holds the working folder
        os.chdir(out)  # tools that drop files in the working folder (transformix) drop them here
    runner = {"ours": _child_ours, "demons": _child_demons, "elastix": _child_elastix,
              "ants": _child_ants}[method]
    seconds, extra = runner(fixed, moving, out, threads, opts)
    (out / "child.json").write_text(json.dumps({"seconds": seconds, "peak_kb": _peak_kb(),
                                                **extra}))
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side.

def run_child(python: str, method: str, fixed: str, moving: str, out: Path, threads: int,
              opts: dict, script: str | None = None) -> dict:
    """``script _child METHOD ...`` (default: this file) in a fresh process limited to
    ``threads``; its child.json with the wall seconds of the whole process and the peak in GB.
    Its output is kept in OUT/child.log."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads),
               ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ENGINE), str(HERE)] + [p for p in os.environ.get(
                   "PYTHONPATH", "").split(os.pathsep) if p]))
    t0 = time.perf_counter()
    proc = subprocess.run([python, str(Path(script or __file__).resolve()), "_child", method,
                           fixed, moving, str(out), str(threads), json.dumps(opts)],
                          capture_output=True, text=True, env=env)
    process_seconds = time.perf_counter() - t0
    (out / "child.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode or not (out / "child.json").exists():
        raise RuntimeError(f"{method} child failed (exit {proc.returncode}):\n"
                           f"{(proc.stderr or proc.stdout)[-3000:]}")
    info = json.loads((out / "child.json").read_text())
    info["process_seconds"] = process_seconds
    info["peak_gb"] = info.pop("peak_kb") / 1024 ** 2
    return info


def _read_labels(path):
    import SimpleITK as sitk
    return sitk.ReadImage(str(path), sitk.sitkInt16)


def _warp_labels(moving_labels, fixed_labels, disp):
    import SimpleITK as sitk
    if disp is None:
        tx = sitk.Transform()
    else:
        tx = sitk.DisplacementFieldTransform(sitk.Cast(disp, sitk.sitkVectorFloat64))
    return sitk.GetArrayFromImage(sitk.Resample(moving_labels, fixed_labels, tx,
                                                sitk.sitkNearestNeighbor, 0)).astype(int)


def structures_of(fixed_labels_arr, moving_labels_arr) -> list[int]:
    import numpy as np

    from EOIRRegistrationLib.core.qa import STANDARD_30_LABELS
    have_f, have_m = set(np.unique(fixed_labels_arr).tolist()), set(np.unique(moving_labels_arr).tolist())
    return [v for v in STANDARD_30_LABELS
            if v in have_f and v in have_m and v not in EXCLUDED_STRUCTURES]


def score(fixed_labels, moving_labels, disp_path, values=None) -> dict:
    """Dice/HD95 over ``values`` (default: structures_of), folding and SDlogJ of one total field
    (None = identity)."""
    import numpy as np
    import SimpleITK as sitk

    from EOIRRegistrationLib.core import geometry, metrics, qa
    fl = sitk.GetArrayFromImage(fixed_labels).astype(int)
    disp = None
    if disp_path is not None:
        disp = sitk.ReadImage(str(disp_path))
        g, f = geometry.Grid.from_image(disp), geometry.Grid.from_image(fixed_labels)
        if g.size != f.size or not (np.allclose(g.origin, f.origin, atol=1e-3)
                                    and np.allclose(g.spacing, f.spacing, atol=1e-4)
                                    and np.allclose(g.direction, f.direction, atol=1e-4)):
            raise RuntimeError(f"{disp_path}: displacement is not on the fixed grid ({g} vs {f})")
        disp.CopyInformation(fixed_labels)
    wl = _warp_labels(moving_labels, fixed_labels, disp)
    if values is None:
        values = structures_of(fl, sitk.GetArrayFromImage(moving_labels))
    dice = qa.dice(fl, wl, values=values)
    hd = {v: metrics.hd95(fl, wl, v, geometry.Grid.from_image(fixed_labels)) for v in values}
    if disp is None:
        summary = {"folding_percent": 0.0, "sdlogj": 0.0, "jacobian_min": 1.0,
                   "jacobian_max": 1.0}
    else:
        d, grid = geometry.displacement_from_image(disp)
        summary = qa.jacobian_summary(metrics.jacobian_determinant(d, grid).numpy())
    return {"dice": float(np.nanmean(list(dice.values()))),
            "hd95": float(np.nanmean(list(hd.values()))),
            "folding_percent": summary["folding_percent"], "sdlogj": summary["sdlogj"],
            "jacobian_min": summary["jacobian_min"], "n_structures": len(values),
            "dice_per_structure": {str(k): v for k, v in dice.items()},
            "hd95_per_structure": {str(k): v for k, v in hd.items()}}


def check(out: Path, fixed_labels, moving_labels) -> dict:
    """Agreement of the labels warped through the field(s) with the tool's own warped labels."""
    import numpy as np
    import SimpleITK as sitk
    tool_path = out / "tool_warped_labels.nii.gz"
    if not tool_path.exists():
        return {}
    tool = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(tool_path)))).astype(int)
    res = {}
    for name, path in (("displacement", out / "displacement.nii"),
                       ("displacement_reversed", out / "displacement_reversed.nii.gz")):
        if not path.exists():
            continue
        disp = sitk.ReadImage(str(path))
        disp.CopyInformation(fixed_labels)
        ours = _warp_labels(moving_labels, fixed_labels, disp)
        either = (ours != 0) | (tool != 0)
        res[name] = {"agree_all_voxels": float((ours == tool).mean()),
                     "agree_labelled_voxels": float((ours == tool)[either].mean())}
    return res


def row_key(r) -> tuple:
    return (r["method"], r["pair"], float(r.get("downsample", 1.0)))


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) and not math.isnan(v) else "-"


def print_table(rows, title):
    print(f"\n{title}")
    print(f"{'method':<34} {'Dice':>6} {'HD95 mm':>8} {'fold %':>8} {'SDlogJ':>7} {'sec':>8} "
          f"{'peak GB':>8}")
    for r in rows:
        print(f"{r['method']:<34} {_fmt(r['dice'], '6.3f')} {_fmt(r['hd95'], '8.2f')} "
              f"{_fmt(r['folding_percent'], '8.3f')} {_fmt(r['sdlogj'], '7.3f')} "
              f"{_fmt(r.get('seconds'), '8.1f')} {_fmt(r.get('peak_gb'), '8.2f')}")


def summarise(rows) -> list[dict]:
    import numpy as np
    order, groups = [], {}
    for r in rows:
        if r["method"] not in groups:
            order.append(r["method"])
            groups[r["method"]] = []
        groups[r["method"]].append(r)
    out = []
    def mean(g, k):
        values = [r.get(k) for r in g]
        ok = all(isinstance(v, (int, float)) for v in values)
        return float(np.mean(values)) if ok else math.nan

    for m in order:
        g = groups[m]
        out.append({"method": m, "pairs": len(g), **{k: mean(g, k) for k in (
            "dice", "hd95", "folding_percent", "sdlogj", "seconds", "peak_gb")}})
    return out


def plot(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>pP*hX"
    points = [x for x in summary if x["method"] != "identity"]
    # neighbours in Dice get labels on alternate sides (above/below) so close points stay legible
    rank = {id(x): r for r, x in enumerate(sorted(points, key=lambda x: -x["dice"]))}
    for i, s in enumerate(points):
        ax.scatter(s["seconds"], s["dice"], marker=markers[i % len(markers)], s=60,
                   label=s["method"])
        ax.annotate(s["method"], (s["seconds"], s["dice"]), textcoords="offset points",
                    xytext=(5, 4 if rank[id(s)] % 2 == 0 else -11), fontsize=8)
    ident = next((x for x in summary if x["method"] == "identity"), None)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.margins(x=0.3, y=0.15)
    ax.set_xlabel("seconds per pair (CPU, end to end in the child, log scale)")
    ax.set_ylabel("mean Dice (standard structures)")
    ax.set_title("Accuracy vs time, mean over pairs" + (
        f" (no registration: Dice {ident['dice']:.3f})" if ident is not None else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _refine_suffix(iterations: int) -> str:
    """Method-name suffix of our runs: none for the engine's default refinement."""
    if iterations == ENGINE_DEFAULT:
        return ""
    return " (network only)" if iterations == 0 else f" refine{iterations}"


def _label(method: str) -> str:
    """The README's name of a method row."""
    peers = {"identity": "no registration", "demons (affine + diffeo demons)":
             "SimpleITK diffeomorphic demons", "elastix (affine + bspline)":
             "elastix affine + B-spline", "ants (SyN)": "ANTs SyN"}
    if method in peers:
        return peers[method]
    name, _, suffix = method.removeprefix("ours:").partition(" ")
    what = {"": "default settings", "(network only)": "network only (`--refine 0`)"}
    return f"`{name}`, {what.get(suffix, suffix)}"


def save_results(args, common, summary, template_rows, t2_summary) -> None:
    """The three tables into benchmarks/results.json."""
    import results

    keys = ("dice", "hd95", "folding_percent", "sdlogj", "seconds", "peak_gb")
    meta = {"source": "benchmarks/bench_brain.py", "measured": f"{common['date']} (engine "
            f"{common['engine']})", "machine": f"{os.cpu_count()} CPUs visible, no GPU, "
            f"{args.threads} threads per run, mean over the pairs"}

    def rows(summary_rows, columns):
        return [{"label": _label(r["method"]), **({"baseline": True} if r["method"] == "identity"
                                                  else {}),
                 **{k: (None if not isinstance(r.get(k), (int, float)) or math.isnan(r[k])
                        else round(r[k], 3)) for k in columns}} for r in summary_rows]

    if summary:
        results.record("brain_label_maps", rows(summary, keys), meta)
    if template_rows:
        results.record("brain_template", rows(template_rows, keys[:3] + ("seconds",)), meta)
    if t2_summary:
        results.record("brain_two_contrasts", rows(t2_summary, keys),
                       dict(meta, source="benchmarks/bench_brain.py --t2-pairs "
                                         + " ".join(map(str, args.t2_pairs))))
    print("saved to benchmarks/results.json (python benchmarks/results.py --write-readme)")


def _jobs(args):
    """(group, label, options) of every method run requested."""
    jobs = []
    for method in args.methods:
        if method == "ours":
            for model in args.models:
                name = Path(model).stem if model.endswith(".pt") else model
                model = str(Path(model).resolve()) if Path(model).is_file() else model
                for n in args.refine_iterations:
                    jobs.append(("ours", f"ours:{name}" + _refine_suffix(n),
                                 {"model": model, "refine": n}))
        else:
            jobs.append((method, {"demons": "demons (affine + diffeo demons)",
                                  "elastix": "elastix (affine + bspline)",
                                  "ants": "ants (SyN)"}[method], {}))
    return jobs


def _engine_version() -> str:
    """Commit of the engine's repository, "+dirty" when EOIRRegistration/ has local changes."""
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(ENGINE), *a], capture_output=True,  # noqa: E731
                                        text=True, check=True).stdout.strip()
        return run("rev-parse", "--short", "HEAD") + ("+dirty" if run(
            "status", "--porcelain", "--", ".") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data", help="data folder (see MANIFEST.md)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, nargs="*", default=[14, 15, 16],
                    help="held-out SynthSeg maps (14-16) used as moving images")
    ap.add_argument("--misaligned", type=int, nargs="*", default=[14],
                    help="maps also used with a 20 degree / 15 mm header misalignment")
    ap.add_argument("--t2-pairs", type=int, nargs="*", default=[],
                    help="maps also rendered T2-like (segNN-t2: two contrasts; own table; demons, "
                         "mono-modal, is not run on them)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS,
                    help="methods to (re)run; none: only print the tables (and plot) of --results")
    ap.add_argument("--models", nargs="+", default=None,
                    help="bundled model names or model files (default: all bundled models)")
    ap.add_argument("--refine-iterations", type=int, nargs="+", default=None,
                    help="run our models with each --refine N (default: the engine's default, "
                         "named ours:MODEL, and 0, named 'ours:MODEL (network only)')")
    ap.add_argument("--results", help="JSON file of rows: loaded, updated, saved")
    ap.add_argument("--plot", help="PNG: mean Dice vs mean seconds per method")
    ap.add_argument("--save-results", action="store_true",
                    help="write the summary tables into benchmarks/results.json (sections "
                         "brain_label_maps, brain_template, brain_two_contrasts); the README's "
                         "tables are generated from it (benchmarks/results.py)")
    ap.add_argument("--check", action="store_true",
                    help="verify each field against the tool's own label warping")
    ap.add_argument("--downsample", type=float, default=1.0,
                    help="resample the pairs to F mm (development; default 1 = native)")
    ap.add_argument("--work-dir", help="folder for pairs and outputs (default: a temp folder, "
                                       "deleted at the end)")
    ap.add_argument("--template-dir", default="auto",
                    help="folder with the MNI152 files of brain_pairs.TEMPLATE_FILES for the "
                         "template pair (auto: nilearn's copy if nilearn is installed; none: "
                         "no template pair)")
    ap.add_argument("--peer-python", default=sys.executable,
                    help="python with antspyx / itk-elastix for the elastix and ants children")
    args = ap.parse_args(argv)

    data = Path(args.data)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ENGINE))
    import brain_pairs
    needed = [brain_pairs.T1_PATH, brain_pairs.SEG_PATH] + [
        brain_pairs.SYNTHSEG_PATH.format(m)
        for m in sorted(set(args.pairs) | set(args.misaligned) | set(args.t2_pairs))]
    missing = [p for p in needed if not (data / p).exists()]
    if missing:
        print(f"bench_brain: error: data folder {data} is missing or incomplete (no "
              f"{', '.join(missing)}); pass --data (see /work/shared/data/MANIFEST.md)",
              file=sys.stderr)
        return 2
    bad = [m for m in set(args.pairs) | set(args.misaligned) | set(args.t2_pairs)
           if m not in brain_pairs.HELD_OUT_MAPS]
    if bad:
        print(f"bench_brain: error: maps {bad} are training data; use {brain_pairs.HELD_OUT_MAPS}",
              file=sys.stderr)
        return 2
    if args.models is None:
        from EOIRRegistrationLib.engine.modelfile import list_bundled_models
        args.models = [m.name for m in list_bundled_models()]
    if args.refine_iterations is None:
        args.refine_iterations = [ENGINE_DEFAULT, 0]

    import SimpleITK as sitk
    import torch
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)

    rows = []
    if args.results and Path(args.results).exists():
        rows = json.loads(Path(args.results).read_text())["rows"]

    def save():
        if args.results:
            Path(args.results).write_text(json.dumps({"rows": rows}, indent=1))

    def put(row):
        rows[:] = [r for r in rows if row_key(r) != row_key(row)] + [row]
        save()

    temp = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="bench_brain_")) if temp else Path(args.work_dir).resolve()
    ds = float(args.downsample)
    try:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs visible, {args.threads} "
              f"threads per run, downsample {ds:g} mm, work folder {work}")
        info = brain_pairs.make_pairs(data, work / f"pairs-{ds:g}mm", maps=args.pairs,
                                      misaligned_maps=args.misaligned,
                                      t2_maps=args.t2_pairs, downsample=ds)
        print(f"fixed grid {'x'.join(map(str, info['fixed_size']))} voxels "
              f"(1 mm crop: {'x'.join(map(str, info['fixed_size_1mm']))}); pairs "
              f"{', '.join(info['pairs'])}")
        template_dir = (brain_pairs.template_dir_of_nilearn() if args.template_dir == "auto"
                        else None if args.template_dir == "none" else Path(args.template_dir))
        if template_dir is not None:
            info["pairs"]["mni152"] = brain_pairs.make_template_pair(
                data, template_dir, work / f"pairs-{ds:g}mm", downsample=ds)
        else:
            print("no template pair (nilearn not installed and no --template-dir)")
        fixed = info["fixed"]
        common = {"downsample": ds, "threads": args.threads,
                  "fixed_size": info["fixed_size"], "date": time.strftime("%Y-%m-%d %H:%M"),
                  "engine": _engine_version()}
        check_failures = []
        for pair, paths in info["pairs"].items():
            moving_labels = _read_labels(paths["moving_labels"])
            fixed_labels = _read_labels(paths.get("fixed_labels", info["fixed_labels"]))
            values = paths.get("label_values")  # None: the standard structures
            if not any(row_key(r) == ("identity", pair, ds) for r in rows):
                put({"method": "identity", "group": "identity", "pair": pair, **common,
                     "seconds": math.nan, "peak_gb": math.nan,
                     **score(fixed_labels, moving_labels, None, values)})
            for group, label, opts in _jobs(args):
                if group == "demons" and pair.endswith("-t2"):
                    continue  # intensity differences and histogram matching: one contrast only
                out = work / "runs" / f"{pair}-{ds:g}mm" / label.replace(":", "_")
                python = args.peer_python if group in ("elastix", "ants") else sys.executable
                opts = dict(opts, check=args.check, moving_labels=paths["moving_labels"])
                print(f"  {pair}: {label} ...", end=" ", flush=True)
                try:
                    res = run_child(python, group, fixed, paths["moving"], out, args.threads,
                                    opts)
                except RuntimeError as exc:
                    print(f"FAILED\n{exc}")
                    continue
                row = {"method": label, "group": group, "pair": pair, **common,
                       "seconds": res.pop("seconds"), "peak_gb": res.pop("peak_gb"),
                       "process_seconds": res.pop("process_seconds"), "extra": res,
                       **score(fixed_labels, moving_labels, out / "displacement.nii", values)}
                if args.check:
                    row["check"] = check(out, fixed_labels, moving_labels)
                    row["checked_timing"] = True
                    used = row["check"].get("displacement", {}).get("agree_labelled_voxels")
                    if used is not None and used < CHECK_MIN_AGREEMENT:
                        check_failures.append(f"{pair} {label}: {used:.4f}")
                put(row)
                print(f"{row['seconds']:.1f} s, Dice {row['dice']:.3f}"
                      + (f", check {json.dumps(row['check'])}" if args.check else ""))

        current = [r for r in rows if float(r.get("downsample", 1.0)) == ds
                   and r["pair"] in info["pairs"]]
        if len({r.get("threads") for r in current if r["method"] != "identity"}) > 1:
            print("\nnote: the rows below were timed with different --threads")
        for pair in info["pairs"]:
            print_table([r for r in current if r["pair"] == pair], f"pair {pair} "
                        f"(fixed real T1 {'x'.join(map(str, info['fixed_size']))}, {ds:g} mm)")
        tissue = {p for p, v in info["pairs"].items() if v.get("scoring") == "tissue"}
        t2 = {p for p in info["pairs"] if p.endswith("-t2")}
        structure_rows = [r for r in current if r["pair"] not in tissue | t2]
        n = sorted({r["n_structures"] for r in structure_rows})
        summary = summarise(structure_rows)
        if structure_rows:
            print_table(summary, f"summary: mean over {len(info['pairs']) - len(tissue | t2)} "
                        f"label-map pairs ({args.threads} threads; Dice/HD95 over "
                        f"{'/'.join(map(str, n))} structures: the standard 30 less 24 and "
                        "those absent from a label map)")
        for pair in sorted(tissue):
            print_table([r for r in current if r["pair"] == pair],
                        f"template pair {pair}: Dice/HD95 over grey and white matter only "
                        "(not comparable with the structure Dice above)")
        if t2:
            print_table(summarise([r for r in current if r["pair"] in t2]),
                        f"two contrasts: mean over the {len(t2)} T2-like pairs "
                        f"({', '.join(sorted(t2))}; fixed real T1; Dice/HD95 over the same "
                        "structures; ours with its default --contrast auto)")
        if args.plot and summary:
            plot(summary, args.plot)
            print(f"plot: {args.plot}")
        if args.save_results:
            save_results(args, common, summary, [r for r in current if r["pair"] in tissue],
                         summarise([r for r in current if r["pair"] in t2]))
        if check_failures:
            print("\nCHECK FAILED (field vs the tool's own warp): " + "; ".join(check_failures))
            return 1
        return 0
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        sys.exit(child_main(sys.argv[2:]))
    sys.exit(main())
