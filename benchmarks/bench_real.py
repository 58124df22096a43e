"""Real-on-real brain benchmark: our engine against demons, ANTs SyN, greedy, FireANTs and elastix.

Every image here is a real scan (no rendered label maps): the data folder's two FreeSurfer
subjects and the MNI152 2009 template (/work/shared/data, see MANIFEST.md; never part of this
repository). Volumes (``make_volumes``), each cropped to its brain's bounding box + 10 mm (as
``brain_pairs.py`` does; 1 mm, about 150x160x200 voxels):

* ``subj1``: real_t1_freesurfer/subject_t1_norm.nii.gz (skull-stripped), tissue from
  subject_aparc_a2009s_aseg.nii.gz (``subject1_tissue``: WM = aseg 2 + 41, GM = 3 + 42 and the
  cortical parcels 11100-12175), brain mask = image > 0;
* ``subj2``: real_t1_pairs/subject2_t1_brainmask.nii.gz (skull-stripped), WM =
  subject2_wm.nii.gz > 1 (``subject2_tissue``; no GM labels), brain mask = image > 0;
* ``mni``: real_t1_pairs/mni152_2009_t1.nii.gz, tissue from mni152_2009_pveseg.nii.gz (0.74 mm
  grid, resampled by nearest neighbour onto the T1's grid; ``mni_tissue``: GM = 2, WM = 3),
  brain mask = pveseg > 0. The template T1 has a skull: by default it is masked with that brain
  mask, like the two skull-stripped subjects (``--mni-skull`` keeps the skull).

Pairs (fixed <- moving), each direction: subj1 <-> subj2 (scored on WM), subj1 <-> mni (GM and
WM), subj2 <-> mni (WM: subject 2 has no GM labels). ``--perturbed`` adds, for each pair, the
moving volume resampled through a known affine (``perturbation``: 10 degree rotation about a
random axis, 8 mm shift in a random direction, +-6 % scale per axis, fixed seed per volume),
named ``FIXED<-MOVING~aff``. The pairs are not affinely aligned to start with: each method's
initial alignment is part of what is measured.

Methods, each in a fresh child process limited to --threads threads (OMP/MKL/OpenBLAS/ITK
variables, ``torch.set_num_threads``, ITK's global default, greedy's ``-threads``), timed inside
the child from reading the inputs to writing the displacement field (imports excluded), peak
memory = the child's Linux VmHWM (imports included):

* ours: ``python -m EOIRRegistrationLib register FIXED MOVING --output-dir OUT --threads N
  --no-png --quiet`` plus the variant's arguments (run in the child as
  ``EOIRRegistrationLib.cli.main.main``, which is what ``python -m`` calls). Variants: ``default``
  (no extra arguments), ``refine0`` (``--refine 0``) and every ``--ours-args 'NAME=ARGS'``
  (repeatable; a built-in NAME is overridden), so engine variants can be compared without editing
  this script; ``--ours-variants NAME ...`` picks some. Rows are named ``ours:NAME``.
* demons: SimpleITK diffeomorphic demons after our ``engine.alignment`` affine and histogram
  matching, 3 levels (``bench_brain._child_demons``, the same code as the brain benchmark);
* ants: antspyx ``ants.registration(type_of_transform="SyN")`` (``bench_brain._child_ants``);
* elastix: itk-elastix default "affine" + "bspline" parameter maps (``bench_brain._child_elastix``);
* greedy (picsl-greedy): affine (``-a -dof 12 -ia-image-centers -m NMI -n 100x50x10``), then
  deformable ``-sv -m WNCC 2x2x2 -n 100x50x10 -it affine.mat``; the total field is greedy's own
  composition of the warp and the affine (reslice mode ``-r warp.nii.gz affine.mat -rc``);
* fireants (CPU, ``torch.backends.mkldnn.enabled = False``): the FireANTs quick-start brain
  recipe (docs "Quickstart") at scales 4/2/1 with 100/50/10 iterations for both stages (the
  quick-start's affine runs 200/100/50: on this CPU that alone took ~100 s per 2 mm pair),
  ``AffineRegistration([4, 2, 1], [100, 50, 10], optimizer="Adam", optimizer_lr=3e-3,
  cc_kernel_size=5)`` started from ``MomentsRegistration(scale=4, moments=1)`` (as FireANTs'
  own template pipeline configures it; from the identity, its default, the affine missed the
  unaligned pairs: Dice 0.54) then
  ``GreedyRegistration(scales=[4, 2, 1], iterations=[100, 50, 10], cc_kernel_size=5,
  deformation_type="compositive", smooth_grad_sigma=1, optimizer="adam", optimizer_lr=0.5,
  init_affine=...)``; total field from ``save_as_ants_transforms`` (the
  affine included, ANTs/ITK convention).

Every method leaves its total displacement field on the fixed grid in OUT/displacement.nii (LPS
mm, fixed point x -> moving point x + d(x)); the parent scores them all the same way
(``score``): the moving tissue labels and brain mask warped by nearest neighbour through the
field with SimpleITK and compared on the fixed grid: Dice (mean over the tissue classes both
volumes have), per-class Dice, brain-mask Dice, HD95 (mean over the classes, ``core.metrics.hd95``),
% folding and SDlogJ of the field's Jacobian over the fixed grid
(``core.metrics.jacobian_determinant``, ``core.qa.jacobian_summary``). A "no registration" row
(identity in physical space) gives the starting point. As a check of each field's convention,
the moving image warped through the field is correlated with the tool's own warped image
(``warped.nii.gz``) inside the fixed brain mask ("check r": near 1 when the field is right).

Peers need a separate environment (requirements-bench.txt lists the versions measured):

    python3.11 -m venv /tmp/peers-venv
    /tmp/peers-venv/bin/pip install -r requirements-bench.txt
    /tmp/peers-venv/bin/pip install --no-deps fireants==1.5.0   # it pins an old SimpleITK
    python benchmarks/bench_real.py --peer-python /tmp/peers-venv/bin/python \
        [--data /work/shared/data] [--threads 2] [--methods ours demons ants greedy fireants elastix]
        [--ours-args 'NAME=ARGS' ...] [--ours-variants NAME ...] [--pairs 'subj1<-subj2' ...]
        [--perturbed] [--results rows.json] [--plot dice_vs_seconds.png] [--save-results]
        [--section real_pairs|real_pairs_perturbed]
        [--downsample F] [--work-dir DIR] [--mni-skull]

--results FILE keeps per-pair rows across runs: existing rows are loaded, the requested methods
re-run on the requested pairs replace theirs, and all are saved (run the peers once, re-run ours
when the engine changes). --downsample F resamples every volume to F mm (development only; rows
remember F and tables show the current F only). --save-results writes the mean table into
benchmarks/results.json, section ``real_pairs`` (the README needs a ``<!-- results:real_pairs
-->`` block for it). Needs no GPU. Exits with 2 when the data folder is missing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import bench_brain  # the process runner and the demons, ANTs, elastix children

HERE = Path(__file__).resolve().parent
ENGINE = HERE.parent / "EOIRRegistration"

FILES = {
    "subj1_t1": "real_t1_freesurfer/subject_t1_norm.nii.gz",
    "subj1_seg": "real_t1_freesurfer/subject_aparc_a2009s_aseg.nii.gz",
    "subj2_t1": "real_t1_pairs/subject2_t1_brainmask.nii.gz",
    "subj2_wm": "real_t1_pairs/subject2_wm.nii.gz",
    "mni_t1": "real_t1_pairs/mni152_2009_t1.nii.gz",
    "mni_seg": "real_t1_pairs/mni152_2009_pveseg.nii.gz",
}
VOLUMES = ("subj1", "subj2", "mni")
BASE_PAIRS = (("subj1", "subj2"), ("subj2", "subj1"), ("subj1", "mni"), ("mni", "subj1"),
              ("subj2", "mni"), ("mni", "subj2"))
PERTURBED_SUFFIX = "~aff"
GM, WM = 1, 2  # tissue label values of every volume's tissue map
TISSUE_NAMES = {GM: "gm", WM: "wm"}
MARGIN_MM = 10.0
PERTURB_DEGREES, PERTURB_SHIFT_MM, PERTURB_SCALE = 10.0, 8.0, 0.06
PERTURB_SEEDS = {"subj1": 101, "subj2": 102, "mni": 103}
PERTURB_PAD_MM = 25.0  # the perturbed volume's grid before cropping: the original + this margin
PEERS = ("demons", "ants", "greedy", "fireants", "elastix")
METHODS = ("ours",) + PEERS
PEER_VENV = ("ants", "greedy", "fireants", "elastix")  # run with --peer-python
OURS_VARIANTS = {"default": "", "refine0": "--refine 0"}
GREEDY_ITERATIONS = "100x50x10"
FIREANTS_SCALES = [4, 2, 1]
FIREANTS_AFFINE_ITERATIONS = [100, 50, 10]
FIREANTS_ITERATIONS = [100, 50, 10]
CHECK_MIN_R = 0.98
PEER_LABELS = {"identity": "no registration", "demons": "SimpleITK diffeomorphic demons",
               "ants": "ANTs SyN", "greedy": "greedy affine + SVF (WNCC 2x2x2, 100x50x10)",
               "fireants": "FireANTs affine + greedy (CPU)",
               "elastix": "elastix affine + B-spline"}


# ---------------------------------------------------------------------------------------------
# Labels and volumes.

def subject1_tissue(seg):
    """aparc.a2009s+aseg -> GM / WM / 0 (int16): WM = 2, 41; GM = 3, 42 and 11100-12175."""
    import numpy as np
    seg = np.asarray(seg)
    out = np.zeros(seg.shape, np.int16)
    out[np.isin(seg, (3, 42)) | ((seg >= 11100) & (seg <= 12175))] = GM
    out[np.isin(seg, (2, 41))] = WM
    return out


def subject2_tissue(wm):
    """FreeSurfer wm.mgz values -> WM where > 1 (110 WM, 250 filled, edited values), else 0."""
    import numpy as np
    wm = np.asarray(wm)
    return np.where(wm > 1, WM, 0).astype(np.int16)


def mni_tissue(pveseg):
    """FSL pveseg (1 CSF, 2 GM, 3 WM) -> GM / WM / 0 (int16)."""
    import numpy as np
    pveseg = np.asarray(pveseg)
    out = np.zeros(pveseg.shape, np.int16)
    out[pveseg == 2] = GM
    out[pveseg == 3] = WM
    return out


def perturbation(seed: int, degrees: float = PERTURB_DEGREES, shift_mm: float = PERTURB_SHIFT_MM,
                 scale: float = PERTURB_SCALE):
    """(matrix 3x3, translation 3) of the known affine: rotation of ``degrees`` about a random
    axis times a per-axis scale 1 +- ``scale`` (random signs), and a shift of ``shift_mm`` in a
    random direction; all drawn from ``default_rng(seed)``. Applied about the image centre c:
    a point p of the perturbed image shows the original image's point A (p - c) + c + t."""
    import numpy as np
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    r = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    s = np.diag(1.0 + scale * rng.choice([-1.0, 1.0], size=3))
    t = rng.normal(size=3)
    t = shift_mm * t / np.linalg.norm(t)
    return r @ s, t


def crop(images: dict, mask_key: str = "mask", margin_mm: float = MARGIN_MM) -> dict:
    """Every image of ``images`` cropped to the bounding box of ``images[mask_key] > 0`` plus
    ``margin_mm`` (``brain_pairs.crop_to_mask``)."""
    import brain_pairs
    import SimpleITK as sitk
    start, size = brain_pairs.crop_to_mask(images[mask_key],
                                           sitk.GetArrayViewFromImage(images[mask_key]) > 0,
                                           margin_mm)
    return {k: sitk.RegionOfInterest(v, size, start) for k, v in images.items()}


def perturb(images: dict, seed: int, pad_mm: float = PERTURB_PAD_MM) -> tuple[dict, list]:
    """``images`` ({"image", "tissue", "mask"} on one grid) resampled through ``perturbation(seed)``
    about the image centre onto the grid padded by ``pad_mm`` (image linear, labels nearest),
    then cropped again; returns (images, 4x4 matrix perturbed point -> original point)."""
    import numpy as np
    import SimpleITK as sitk
    ref = images["image"]
    a, t = perturbation(seed)
    size = np.asarray(ref.GetSize())
    centre = ref.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2.0))
    tx = sitk.AffineTransform(3)
    tx.SetCenter(centre)
    tx.SetMatrix(tuple(float(v) for v in a.ravel()))
    tx.SetTranslation(tuple(float(v) for v in t))
    pad = np.ceil(pad_mm / np.asarray(ref.GetSpacing())).astype(int)
    d = np.asarray(ref.GetDirection()).reshape(3, 3)
    origin = np.asarray(ref.GetOrigin()) - d @ (pad * np.asarray(ref.GetSpacing()))
    grid = dict(size=[int(v) for v in size + 2 * pad], outputOrigin=tuple(origin),
                outputSpacing=ref.GetSpacing(), outputDirection=ref.GetDirection())
    out = {}
    for k, img in images.items():
        interp = sitk.sitkLinear if k == "image" else sitk.sitkNearestNeighbor
        out[k] = sitk.Resample(img, transform=tx, interpolator=interp, defaultPixelValue=0,
                               outputPixelType=img.GetPixelID(), **grid)
    matrix = np.eye(4)
    matrix[:3, :3] = a
    c = np.asarray(centre)
    matrix[:3, 3] = t + c - a @ c
    return crop(out), matrix.tolist()


def _read_volume(data: Path, name: str, mni_skull: bool) -> dict:
    """One volume at its native 1 mm: {"image" float32, "tissue" int16, "mask" uint8}."""
    import numpy as np
    import SimpleITK as sitk

    def like(array, ref, pixel):
        img = sitk.GetImageFromArray(array.astype(pixel))
        img.CopyInformation(ref)
        return img

    if name == "subj1":
        t1 = sitk.ReadImage(str(data / FILES["subj1_t1"]), sitk.sitkFloat32)
        seg = sitk.ReadImage(str(data / FILES["subj1_seg"]))
        tissue = subject1_tissue(sitk.GetArrayFromImage(seg))
        mask = sitk.GetArrayFromImage(t1) > 0
    elif name == "subj2":
        t1 = sitk.ReadImage(str(data / FILES["subj2_t1"]), sitk.sitkFloat32)
        wm = sitk.ReadImage(str(data / FILES["subj2_wm"]))
        tissue = subject2_tissue(sitk.GetArrayFromImage(wm))
        mask = sitk.GetArrayFromImage(t1) > 0
    elif name == "mni":
        t1 = sitk.ReadImage(str(data / FILES["mni_t1"]), sitk.sitkFloat32)
        pve = sitk.ReadImage(str(data / FILES["mni_seg"]))
        pve = sitk.Resample(pve, t1, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                            pve.GetPixelID())
        pve_a = sitk.GetArrayFromImage(pve)
        tissue = mni_tissue(pve_a)
        mask = pve_a > 0
        if not mni_skull:
            t1 = like(sitk.GetArrayFromImage(t1) * mask, t1, np.float32)
    else:
        raise ValueError(f"unknown volume {name!r}")
    return crop({"image": t1, "tissue": like(tissue, t1, np.int16),
                 "mask": like(mask, t1, np.uint8)})


def make_volumes(data, out_dir, names, perturbed: bool = False, downsample: float = 1.0,
                 mni_skull: bool = False, log=print) -> dict:
    """Write each volume of ``names`` (and its perturbed variant ``NAME~aff`` when asked) to
    ``out_dir``; returns {name: {"image", "tissue", "mask": path, "size": (x, y, z),
    "values": tissue values present, "perturbation": 4x4 or None}}. Files written by an
    identical call are reused (``volumes.json`` records the call)."""
    import brain_pairs
    import numpy as np
    import SimpleITK as sitk
    data, out_dir = Path(data), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    call = {"names": sorted(names), "perturbed": bool(perturbed), "downsample": float(downsample),
            "mni_skull": bool(mni_skull), "version": 1}
    record = out_dir / "volumes.json"
    if record.exists():
        old = json.loads(record.read_text())
        if old.get("call") == call and all(Path(v[k]).exists() for v in old["result"].values()
                                           for k in ("image", "tissue", "mask")):
            return old["result"]
    result = {}
    for name in sorted(names):
        vol = _read_volume(data, name, mni_skull)
        variants = [(name, vol, None)]
        if perturbed:
            pv, matrix = perturb(vol, PERTURB_SEEDS[name])
            variants.append((name + PERTURBED_SUFFIX, pv, matrix))
        for vname, images, matrix in variants:
            entry = {"perturbation": matrix, "size_1mm": list(images["image"].GetSize())}
            for k, img in images.items():
                path = out_dir / f"{vname.replace('~', '_')}_{k}.nii.gz"
                if downsample and downsample != 1:
                    img = brain_pairs._resample_to(img, downsample, labels=(k != "image"))
                sitk.WriteImage(img, str(path))
                entry[k] = str(path)
            entry["size"] = list(sitk.ReadImage(entry["image"]).GetSize())
            tissue = sitk.GetArrayFromImage(sitk.ReadImage(entry["tissue"]))
            entry["values"] = [int(v) for v in np.unique(tissue) if v != 0]
            result[vname] = entry
            log(f"  volume {vname}: {'x'.join(map(str, entry['size']))} voxels "
                f"({'x'.join(map(str, entry['size_1mm']))} at 1 mm), tissue "
                f"{'/'.join(TISSUE_NAMES[v] for v in entry['values'])}")
    record.write_text(json.dumps({"call": call, "result": result}, indent=1))
    return result


def pair_names(perturbed: bool = False) -> list[str]:
    """``FIXED<-MOVING`` for every pair (the perturbed ones with a ``~aff`` moving volume)."""
    names = [f"{f}<-{m}" for f, m in BASE_PAIRS]
    if perturbed:
        names += [f"{f}<-{m}{PERTURBED_SUFFIX}" for f, m in BASE_PAIRS]
    return names


def split_pair(pair: str) -> tuple[str, str]:
    fixed, sep, moving = pair.partition("<-")
    if not sep or fixed not in VOLUMES or moving.removesuffix(PERTURBED_SUFFIX) not in VOLUMES:
        raise ValueError(f"not a pair: {pair!r} (use FIXED<-MOVING, volumes {VOLUMES})")
    return fixed, moving


# ---------------------------------------------------------------------------------------------
# Child side: one method, one pair. Writes OUT/displacement.nii (total field, fixed grid, LPS
# mm, fixed -> moving), OUT/warped.nii.gz (the tool's own warped moving image) and
# OUT/child.json (seconds, peak).

def _child_ours(fixed, moving, out, threads, opts):
    import torch
    torch.set_num_threads(threads)

    import EOIRRegistrationLib.cli.outputs  # noqa: F401  (imports before the clock)
    import EOIRRegistrationLib.cli.register  # noqa: F401
    import EOIRRegistrationLib.engine.pipeline  # noqa: F401
    from EOIRRegistrationLib.cli.main import main as cli_main
    argv = ["register", fixed, moving, "--output-dir", str(out), "--threads", str(threads),
            "--no-png", "--quiet", "--overwrite", *shlex.split(opts.get("args", ""))]
    t0 = time.perf_counter()
    rc = cli_main(argv)
    seconds = time.perf_counter() - t0
    if rc:
        raise RuntimeError(f"python -m EOIRRegistrationLib register exited with {rc}")
    report = json.loads((out / "report.json").read_text())
    return seconds, {"stages": report.get("seconds", {}), "model": report.get("model", {}).get(
        "name"), "method": report.get("method", ""), "contrast": report.get("contrast"),
        "initial_alignment": report.get("initial_alignment")}


def _child_greedy(fixed, moving, out, threads, opts):
    import SimpleITK as sitk
    from picsl_greedy import Greedy3D
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    g = Greedy3D()
    common = f"-d 3 -threads {threads} -seed 1"
    with open(out / "greedy.log", "w") as log:
        run = lambda cmd: g.execute(f"{common} {cmd}", out=log, err=log)  # noqa: E731
        t0 = time.perf_counter()
        run(f"-a -dof 12 -ia-image-centers -m NMI -n {GREEDY_ITERATIONS} "
            f"-i {fixed} {moving} -o {out / 'affine.mat'}")
        run(f"-sv -m WNCC 2x2x2 -n {GREEDY_ITERATIONS} -i {fixed} {moving} "
            f"-it {out / 'affine.mat'} -o {out / 'warp.nii.gz'}")
        # Reslice mode with -rc writes the composed transform (warp then affine, the order of
        # -r) as one warp on the fixed grid: greedy's own composition of its two outputs.
        run(f"-rf {fixed} -rm {moving} {out / 'warped.nii.gz'} "
            f"-r {out / 'warp.nii.gz'} {out / 'affine.mat'} -rc {out / 'total_warp.nii.gz'}")
        field = sitk.ReadImage(str(out / "total_warp.nii.gz"), sitk.sitkVectorFloat32)
        sitk.WriteImage(field, str(out / "displacement.nii"))
        seconds = time.perf_counter() - t0
    return seconds, {"affine": f"-a -dof 12 -ia-image-centers -m NMI -n {GREEDY_ITERATIONS}",
                     "deformable": f"-sv -m WNCC 2x2x2 -n {GREEDY_ITERATIONS}"}


def _child_fireants(fixed, moving, out, threads, opts):
    import logging

    import SimpleITK as sitk
    import torch
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = False
    logging.disable(logging.WARNING)  # "fused ops not found" notices on every CPU run
    from fireants.io.image import BatchedImages, FakeBatchedImages, Image
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.greedy import GreedyRegistration
    from fireants.registration.moments import MomentsRegistration
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    t0 = time.perf_counter()
    f = BatchedImages([Image.load_file(fixed, device="cpu")])
    m = BatchedImages([Image.load_file(moving, device="cpu")])
    # FireANTs' own pipeline starts from a moments match (its templates' configs: scale 4, first
    # moments); from the identity its affine missed the unaligned pairs (Dice 0.54).
    moments = MomentsRegistration(scale=4, moments=1, fixed_images=f, moving_images=m)
    moments.optimize()
    affine = AffineRegistration(FIREANTS_SCALES, FIREANTS_AFFINE_ITERATIONS, f, m,
                                optimizer="Adam", optimizer_lr=3e-3, cc_kernel_size=5,
                                init_rigid=moments.get_affine_init())
    affine.optimize()
    reg = GreedyRegistration(scales=FIREANTS_SCALES, iterations=FIREANTS_ITERATIONS,
                             fixed_images=f, moving_images=m, cc_kernel_size=5,
                             deformation_type="compositive", smooth_grad_sigma=1,
                             optimizer="adam", optimizer_lr=0.5,
                             init_affine=affine.get_affine_matrix().detach())
    reg.optimize()
    # The total map (affine included) as an ANTs/ITK displacement field on the fixed grid.
    reg.save_as_ants_transforms(str(out / "displacement.nii"))
    with torch.no_grad():
        FakeBatchedImages(reg.evaluate(f, m), f).write_image(str(out / "warped.nii.gz"))
    seconds = time.perf_counter() - t0
    return seconds, {"affine": [FIREANTS_SCALES, FIREANTS_AFFINE_ITERATIONS],
                     "greedy": [FIREANTS_SCALES, FIREANTS_ITERATIONS]}


def child_main(argv) -> int:
    method, fixed, moving, out, threads, opts = argv
    out, threads, opts = Path(out).resolve(), int(threads), json.loads(opts)
    if method != "ours":  # eoir-register refuses an output folder that holds the working folder
        os.chdir(out)  # tools that drop files in the working folder (transformix) drop them here
    if method in ("demons", "ants", "elastix"):  # the brain benchmark's peers, unchanged
        runner = {"demons": bench_brain._child_demons, "ants": bench_brain._child_ants,
                  "elastix": bench_brain._child_elastix}[method]
    else:
        runner = {"ours": _child_ours, "greedy": _child_greedy,
                  "fireants": _child_fireants}[method]
    seconds, extra = runner(fixed, moving, out, threads, opts)
    (out / "child.json").write_text(json.dumps({"seconds": seconds, "peak_kb": bench_brain._peak_kb(),
                                                **extra}))
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side.

def _warp(image, reference, disp, nearest: bool):
    import SimpleITK as sitk
    tx = sitk.Transform() if disp is None else sitk.DisplacementFieldTransform(
        sitk.Cast(disp, sitk.sitkVectorFloat64))
    return sitk.Resample(image, reference, tx,
                         sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0)


def score(fixed: dict, moving: dict, disp_path=None, values=None) -> dict:
    """Score one total field (None: identity) of the pair ``fixed`` <- ``moving`` (volume
    entries: paths of "tissue", "mask" and, for the check, "image"): Dice per tissue value of
    ``values`` (default: those both have) and their mean, HD95 (mean over them), brain-mask Dice,
    folding % and SDlogJ over the fixed grid, and "check_r" (see the module docstring)."""
    import numpy as np
    import SimpleITK as sitk

    from EOIRRegistrationLib.core import geometry, metrics, qa
    f_tissue = sitk.ReadImage(str(fixed["tissue"]), sitk.sitkInt16)
    f_mask = sitk.ReadImage(str(fixed["mask"]), sitk.sitkUInt8)
    grid = geometry.Grid.from_image(f_tissue)
    disp = None
    if disp_path is not None:
        disp = sitk.ReadImage(str(disp_path))
        g = geometry.Grid.from_image(disp)
        if g.size != grid.size or not (np.allclose(g.origin, grid.origin, atol=1e-3)
                                       and np.allclose(g.spacing, grid.spacing, atol=1e-4)
                                       and np.allclose(g.direction, grid.direction, atol=1e-4)):
            raise RuntimeError(f"{disp_path}: displacement is not on the fixed grid ({g} vs "
                               f"{grid})")
        disp.CopyInformation(f_tissue)
    fl = sitk.GetArrayFromImage(f_tissue).astype(int)
    wl = sitk.GetArrayFromImage(_warp(sitk.ReadImage(str(moving["tissue"]), sitk.sitkInt16),
                                      f_tissue, disp, True)).astype(int)
    fm = sitk.GetArrayFromImage(f_mask).astype(int)
    wm = sitk.GetArrayFromImage(_warp(sitk.ReadImage(str(moving["mask"]), sitk.sitkUInt8),
                                      f_mask, disp, True)).astype(int)
    if values is None:
        values = sorted(set(fixed.get("values", [GM, WM])) & set(moving.get("values", [GM, WM])))
    dice = qa.dice(fl, wl, values=values)
    hd = {v: metrics.hd95(fl, wl, v, grid) for v in values}
    if disp is None:
        summary = {"folding_percent": 0.0, "sdlogj": 0.0, "jacobian_min": 1.0}
    else:
        d, dgrid = geometry.displacement_from_image(disp)
        summary = qa.jacobian_summary(metrics.jacobian_determinant(d, dgrid).numpy())
    row = {"dice": float(np.nanmean(list(dice.values()))),
           "mask_dice": float(qa.dice(fm, wm, values=[1])[1]),
           "hd95": float(np.nanmean(list(hd.values()))),
           "folding_percent": summary["folding_percent"], "sdlogj": summary["sdlogj"],
           "jacobian_min": summary["jacobian_min"], "values": list(values),
           **{f"dice_{TISSUE_NAMES[v]}": dice[v] for v in values},
           **{f"hd95_{TISSUE_NAMES[v]}": hd[v] for v in values}}
    if disp_path is not None:
        tool = Path(disp_path).parent / "warped.nii.gz"
        if tool.exists() and "image" in moving:
            ours = sitk.GetArrayFromImage(_warp(sitk.ReadImage(str(moving["image"]),
                                                               sitk.sitkFloat32),
                                                f_tissue, disp, False))
            theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(tool), sitk.sitkFloat32))
            sel = fm > 0
            if theirs.shape == ours.shape and sel.any():
                row["check_r"] = float(np.corrcoef(ours[sel], theirs[sel])[0, 1])
    return row


def row_key(r) -> tuple:
    return (r["method"], r["pair"], float(r.get("downsample", 1.0)))


def _fmt(v, spec):
    if isinstance(v, (int, float)) and not math.isnan(v):
        return format(v, spec)
    width = "".join(c for c in spec.split(".")[0] if c.isdigit())
    return "-".rjust(int(width) if width else 0)


def print_table(rows, title):
    print(f"\n{title}")
    print(f"{'method':<24} {'n':>2} {'Dice':>6} {'GM':>6} {'WM':>6} {'mask':>6} {'HD95':>6} "
          f"{'fold %':>7} {'SDlogJ':>6} {'sec':>7} {'peak GB':>7} {'check r':>7}")
    for r in rows:
        print(f"{r['method']:<24} {r.get('pairs', 1):>2} {_fmt(r['dice'], '6.3f')} "
              f"{_fmt(r.get('dice_gm'), '6.3f')} {_fmt(r.get('dice_wm'), '6.3f')} "
              f"{_fmt(r.get('mask_dice'), '6.3f')} {_fmt(r['hd95'], '6.2f')} "
              f"{_fmt(r['folding_percent'], '7.3f')} {_fmt(r['sdlogj'], '6.3f')} "
              f"{_fmt(r.get('seconds'), '7.1f')} {_fmt(r.get('peak_gb'), '7.2f')} "
              f"{_fmt(r.get('check_r'), '7.4f')}")


MEAN_KEYS = ("dice", "dice_gm", "dice_wm", "mask_dice", "hd95", "folding_percent", "sdlogj",
             "seconds", "peak_gb", "check_r")


def summarise(rows) -> list[dict]:
    """Mean of each figure per method over its rows (NaN where a row lacks it; per-class Dice and
    the check over the rows that have them), in first-seen order; ``pairs`` = how many rows."""
    import numpy as np
    order, groups = [], {}
    for r in rows:
        if r["method"] not in groups:
            order.append(r["method"])
            groups[r["method"]] = []
        groups[r["method"]].append(r)
    out = []
    for m in order:
        g = groups[m]
        means = {}
        for k in MEAN_KEYS:
            values = [r.get(k) for r in g]
            if k in ("dice_gm", "dice_wm", "check_r"):
                values = [v for v in values if v is not None]
            ok = values and all(isinstance(v, (int, float)) for v in values)
            means[k] = float(np.mean(values)) if ok else math.nan
        out.append({"method": m, "group": g[0].get("group", m), "pairs": len(g), **means})
    return out


def method_label(method: str, ours_args: str | None = None) -> str:
    """The README's name of a method row."""
    if method in PEER_LABELS:
        return PEER_LABELS[method]
    name = method.removeprefix("ours:")
    if name == "default":
        return "EOIR, default settings"
    if name == "refine0":
        return "EOIR, network only (`--refine 0`)"
    return f"EOIR `{name}` (`{ours_args}`)" if ours_args else f"EOIR `{name}`"


def plot(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>pP*hX"
    points = [x for x in summary if x["method"] != "identity"
              and not math.isnan(x["seconds"]) and not math.isnan(x["dice"])]
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
    ax.set_ylabel("mean Dice (GM/WM where both volumes have them)")
    ax.set_title("Real-on-real brain pairs, mean over pairs" + (
        f" (no registration: Dice {ident['dice']:.3f})" if ident is not None else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def result_rows(summary, ours_args: dict) -> list[dict]:
    """``results.record`` rows of the mean table."""
    keys = ("dice", "mask_dice", "hd95", "folding_percent", "sdlogj", "seconds", "peak_gb")
    rows = []
    for r in summary:
        row = {"label": method_label(r["method"], ours_args.get(r["method"]))}
        if r["method"] == "identity":
            row["baseline"] = True
        for k in keys:
            v = r.get(k)
            row[k] = None if not isinstance(v, (int, float)) or math.isnan(v) or (
                r["method"] == "identity" and k in ("folding_percent", "sdlogj")) else round(v, 3)
        rows.append(row)
    return rows


def save_results(summary, current, ours_args, argv, path=None, section="real_pairs") -> None:
    """The mean table into benchmarks/results.json (``section``: ``real_pairs``, or e.g.
    ``real_pairs_perturbed`` for a run on the perturbed pairs alone)."""
    import results

    dates = sorted({r["date"][:10] for r in current if r.get("date")})
    engines = sorted({r["engine"] for r in current if r.get("engine") and r["group"] == "ours"})
    threads = sorted({r.get("threads") for r in current if r["method"] != "identity"})
    meta = {"source": "python benchmarks/bench_real.py " + shlex.join(argv),
            "measured": (dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}")
            + (f" (engine {', '.join(engines)})" if engines else ""),
            "machine": f"{os.cpu_count()} CPUs visible, no GPU, "
                       f"{'/'.join(map(str, threads))} threads per run, mean over "
                       f"{max((r['pairs'] for r in summary), default=0)} pairs"}
    kwargs = {} if path is None else {"path": path}
    results.record(section, result_rows(summary, ours_args), meta, **kwargs)
    print(f"saved section {section} to {path or results.RESULTS} (the README needs a "
          f"<!-- results:{section} --> block; python benchmarks/results.py --write-readme)")


def _ours_arg(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or any(c in name for c in " /:<~"):
        raise argparse.ArgumentTypeError(f"expected NAME=ARGS (NAME without spaces, '/', ':', "
                                         f"'<', '~'), got {text!r}")
    shlex.split(value)  # unbalanced quotes are an error here, not in the child
    return name, value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data", help="data folder (see MANIFEST.md)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS,
                    help="methods to (re)run; none: only print the tables (and plot) of --results")
    ap.add_argument("--ours-args", action="append", type=_ours_arg, default=[],
                    metavar="NAME=ARGS",
                    help="an extra variant of ours, ours:NAME, run with these extra "
                         "eoir-register arguments (repeatable; built-in variants: "
                         + ", ".join(f"{k}='{v}'" for k, v in OURS_VARIANTS.items()) + ")")
    ap.add_argument("--ours-variants", nargs="+", metavar="NAME",
                    help="run only these variants of ours (default: all)")
    ap.add_argument("--pairs", nargs="+", metavar="FIXED<-MOVING",
                    help="pairs to run (default: all six, and their ~aff variants with "
                         "--perturbed)")
    ap.add_argument("--perturbed", action="store_true",
                    help="add each pair with the moving volume resampled through a known affine "
                         f"({PERTURB_DEGREES:g} degrees, {PERTURB_SHIFT_MM:g} mm, "
                         f"{100 * PERTURB_SCALE:g} %% scale, fixed seeds)")
    ap.add_argument("--results", help="JSON file of per-pair rows: loaded, updated, saved")
    ap.add_argument("--section", default="real_pairs",
                    help="results.json section --save-results writes (e.g. real_pairs_perturbed "
                         "for a run on the perturbed pairs alone)")
    ap.add_argument("--plot", help="PNG: mean Dice vs mean seconds per method (log x)")
    ap.add_argument("--save-results", action="store_true",
                    help="write the mean table into benchmarks/results.json (section real_pairs)")
    ap.add_argument("--downsample", type=float, default=1.0,
                    help="resample the volumes to F mm (development; default 1 = native)")
    ap.add_argument("--work-dir", help="folder for volumes and outputs (default: a temp folder, "
                                       "deleted at the end)")
    ap.add_argument("--mni-skull", action="store_true",
                    help="keep the MNI152 template's skull (default: masked with its brain mask, "
                         "like the skull-stripped subjects)")
    ap.add_argument("--peer-python", default=sys.executable,
                    help="python with antspyx, picsl-greedy, fireants and itk-elastix for "
                         f"{', '.join(PEER_VENV)}")
    return ap


def _jobs(args) -> list[tuple[str, str, dict]]:
    """(group, method name, child options) of every run requested."""
    variants = dict(OURS_VARIANTS)
    variants.update(dict(args.ours_args))
    chosen = args.ours_variants or list(variants)
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        raise SystemExit(f"bench_real: error: unknown --ours-variants {unknown} (known: "
                         f"{sorted(variants)}; add one with --ours-args NAME=ARGS)")
    jobs = []
    for method in args.methods:
        if method == "ours":
            jobs += [("ours", f"ours:{v}", {"args": variants[v]}) for v in chosen]
        else:
            jobs.append((method, method, {}))
    return jobs


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    data = Path(args.data)
    missing = [p for p in FILES.values() if not (data / p).exists()]
    if missing:
        print(f"bench_real: error: data folder {data} is missing or incomplete (no "
              f"{', '.join(missing)}); pass --data (see /work/shared/data/MANIFEST.md)",
              file=sys.stderr)
        return 2
    pairs = args.pairs or pair_names(args.perturbed)
    try:
        for p in pairs:
            split_pair(p)
    except ValueError as exc:
        print(f"bench_real: error: {exc}", file=sys.stderr)
        return 2
    jobs = _jobs(args)
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ENGINE))

    import SimpleITK as sitk
    import torch
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)

    rows = []
    if args.results and Path(args.results).exists():
        rows = json.loads(Path(args.results).read_text())["rows"]

    def put(row):
        rows[:] = [r for r in rows if row_key(r) != row_key(row)] + [row]
        if args.results:
            Path(args.results).write_text(json.dumps({"rows": rows}, indent=1))

    temp = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="bench_real_")) if temp else Path(args.work_dir).resolve()
    ds = float(args.downsample)
    try:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs visible, {args.threads} "
              f"threads per run, downsample {ds:g} mm, work folder {work}")
        names = sorted({v for p in pairs for v in split_pair(p)})
        base = sorted({v.removesuffix(PERTURBED_SUFFIX) for v in names})
        vols = make_volumes(data, work / f"volumes-{ds:g}mm{'-skull' if args.mni_skull else ''}",
                            base, perturbed=any(v.endswith(PERTURBED_SUFFIX) for v in names),
                            downsample=ds, mni_skull=args.mni_skull)
        common = {"downsample": ds, "threads": args.threads,
                  "date": time.strftime("%Y-%m-%d %H:%M"), "mni_skull": args.mni_skull}
        engine = bench_brain._engine_version()
        for pair in pairs:
            f_name, m_name = split_pair(pair)
            fixed, moving = vols[f_name], vols[m_name]
            put({"method": "identity", "group": "identity", "pair": pair, **common,
                 "seconds": math.nan, "peak_gb": math.nan, **score(fixed, moving)})
            for group, method, opts in jobs:
                out = work / "runs" / f"{f_name}_from_{m_name}-{ds:g}mm" / method.replace(":", "_")
                python = args.peer_python if group in PEER_VENV else sys.executable
                print(f"  {pair}: {method} ...", end=" ", flush=True)
                try:
                    res = bench_brain.run_child(python, group, fixed["image"], moving["image"],
                                                out, args.threads, opts, script=__file__)
                except RuntimeError as exc:
                    print(f"FAILED\n{exc}")
                    continue
                row = {"method": method, "group": group, "pair": pair, **common,
                       "seconds": res.pop("seconds"), "peak_gb": res.pop("peak_gb"),
                       "process_seconds": res.pop("process_seconds"), "extra": res,
                       **score(fixed, moving, out / "displacement.nii")}
                if group == "ours":
                    row.update(engine=engine, ours_args=opts["args"])
                put(row)
                print(f"{row['seconds']:.1f} s, Dice {row['dice']:.3f}, mask Dice "
                      f"{row['mask_dice']:.3f}, check r {_fmt(row.get('check_r'), '.4f')}")
                if row.get("check_r", 1.0) < CHECK_MIN_R:
                    print(f"  warning: {method}'s field and its own warped image disagree "
                          f"(r = {row['check_r']:.4f} < {CHECK_MIN_R}): field convention?")

        current = [r for r in rows if float(r.get("downsample", 1.0)) == ds and r["pair"] in pairs
                   and bool(r.get("mni_skull", False)) == args.mni_skull]
        for pair in pairs:
            print_table([r for r in current if r["pair"] == pair],
                        f"pair {pair} ({ds:g} mm; Dice over "
                        f"{'/'.join(TISSUE_NAMES[v] for v in score_values(vols, pair))})")
        current.sort(key=method_rank)
        summary = summarise(current)
        complete = [s for s in summary if s["pairs"] == len(pairs)]
        print_table(summary, f"mean over the {len(pairs)} pairs ({args.threads} threads; n = "
                             "pairs a method has rows for: means over fewer pairs are not "
                             "comparable)")
        ours_args = {r["method"]: r.get("ours_args") for r in current if r["group"] == "ours"}
        for m, a in ours_args.items():
            print(f"  {m}: extra arguments '{a}'")
        if args.plot and complete:
            plot(complete, args.plot)
            print(f"plot: {args.plot}")
        if args.save_results:
            left = [s["method"] for s in summary if s["pairs"] != len(pairs)]
            if left:
                print(f"not saved (rows for only some pairs): {', '.join(left)}")
            save_results(complete, [r for r in current if r["method"] in
                                    {s["method"] for s in complete}], ours_args, argv,
                         section=args.section)
        return 0
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)


def method_rank(row) -> tuple:
    """Table order: no registration, ours (variants by name), the peers in ``PEERS`` order."""
    m = row["method"]
    if m == "identity":
        return (0, "")
    if m.startswith("ours:"):
        return (1, m)
    return (2 + (PEERS.index(m) if m in PEERS else len(PEERS)), m)


def score_values(vols: dict, pair: str) -> list[int]:
    f_name, m_name = split_pair(pair)
    return sorted(set(vols[f_name]["values"]) & set(vols[m_name]["values"]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        sys.exit(child_main(sys.argv[2:]))
    sys.exit(main())
