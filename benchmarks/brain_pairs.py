"""Deterministic brain registration pairs for ``bench_brain.py`` (real fixed, T1-like moving).

* **Fixed**: the real skull-stripped T1 ``real_t1_freesurfer/subject_t1_norm.nii.gz`` (FreeSurfer
  "norm", 1 mm, native space) cropped to the bounding box of its non-zero voxels plus a 10 mm
  margin (149 x 155 x 198 voxels in ITK order for this subject), cast to float32, with its
  aparc.a2009s+aseg segmentation mapped to aseg numbers (``aseg_of_subject``).
* **Moving**: a held-out SynthSeg label map (``synthseg_labelmaps/training_seg_NN.nii.gz``,
  NN in 14-16; maps 01-13 are training data) rendered as a T1-like image (``render_t1_like``):
  each label gets the mean intensity of the real T1 inside that label (``label_intensities``),
  extra-cerebral labels (>= 500) become background (skull-stripped, like the fixed image), then a
  Gaussian blur (sigma 0.5 mm) and Gaussian noise (fixed seed) inside the brain. Cropped like the
  fixed image; its label map (labels >= 500 set to 0) is written next to it.
* **Misaligned** variant: the same voxels with a 20 degree rotation about an oblique axis through
  the image centre and a 15 mm shift written into the header (origin and direction only).
* **T2-like** variant ("segNN-t2", optional): the same label map rendered with another contrast
  (``render_t2_like``: white matter dark, grey matter brighter, CSF bright, each label jittered
  by up to 10 %, fixed seed, same blur), so fixed and moving differ in contrast as T1 and T2 do.

* **Template** pair ("mni152", optional): the moving image is the real MNI152 2009a T1 template
  (an average of real T1 scans, brain-masked; the files nilearn ships, see ``TEMPLATE_FILES``)
  cropped to its brain + 10 mm. It has no structure labels, only grey- and white-matter
  probability maps, so it is scored on two tissue classes (``TISSUE_GM``/``TISSUE_WM``): template
  voxels whose larger probability exceeds 0.5, against the subject's segmentation grouped into
  the same classes (``tissue_of_aseg``). Coarse, but real intensities on both sides.

Everything is a pure function of the data folder and the arguments (fixed seeds), so re-running
gives identical files. Data never leaves the work folder given to ``make_pairs``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

T1_PATH = "real_t1_freesurfer/subject_t1_norm.nii.gz"
SEG_PATH = "real_t1_freesurfer/subject_aparc_a2009s_aseg.nii.gz"
SYNTHSEG_PATH = "synthseg_labelmaps/training_seg_{:02d}.nii.gz"
HELD_OUT_MAPS = (14, 15, 16)  # 01-13 are used for training: never evaluate on them
EXTRA_CEREBRAL_FIRST_LABEL = 500
MARGIN_MM = 10.0
BLUR_SIGMA_MM = 0.5
NOISE_STD = 2.0  # intensity units of the real T1 (uint8 "norm": white matter ~ 97)
MISALIGN_DEGREES = 20.0
MISALIGN_AXIS = (1.0, 1.0, 1.0)  # LPS, normalised
MISALIGN_SHIFT_MM = (10.0, -10.0, 5.0)  # |shift| = 15 mm

# FreeSurfer tissue classes for labels the subject's segmentation lacks (the value is the mean
# intensity of the class's labels that it has). Labels in none of these get the value of their
# most frequent face neighbour in the map being rendered (e.g. SynthSeg's 136/163 next to the
# lateral ventricles, 25/57 inside the white matter).
CLASS_WM = (2, 41, 7, 46, 16, 28, 60, 77, 85, 251, 252, 253, 254, 255)
CLASS_GM = (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58, 80)
CLASS_CSF = (4, 43, 5, 44, 14, 15, 31, 63, 72)
# SynthSeg's 24 is the whole extra-cerebral CSF shell; FreeSurfer's 24 is a few sulcal voxels.
# The skull strip of the real T1 kept a CSF/dura rim that is unlabelled (0) in its segmentation,
# so label 24 is rendered with the mean of the real T1 over (label 24 or unlabelled) & (T1 > 0).
EXTRA_CEREBRAL_CSF = 24


# Tissue classes of the template pair (label values of the tissue maps).
TISSUE_GM, TISSUE_WM = 1, 2
TISSUE_NAMES = {TISSUE_GM: "grey matter", TISSUE_WM: "white matter"}
# aseg labels per tissue class as the template's probability maps draw them: cortex, cerebellar
# cortex and the deep grey nuclei are grey; cerebral and cerebellar white matter, brain stem,
# ventral DC and pallidum (bright in T1) are white. Ventricles and CSF are neither.
ASEG_GM = (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 17, 53, 18, 54, 26, 58)
ASEG_WM = (2, 41, 7, 46, 16, 28, 60, 13, 52)
TEMPLATE_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                  "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                  "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}


def tissue_of_aseg(aseg: np.ndarray) -> np.ndarray:
    """aseg numbers -> TISSUE_GM / TISSUE_WM / 0 (``ASEG_GM``, ``ASEG_WM``), int16."""
    out = np.zeros(np.shape(aseg), np.int16)
    out[np.isin(aseg, ASEG_GM)] = TISSUE_GM
    out[np.isin(aseg, ASEG_WM)] = TISSUE_WM
    return out


def tissue_of_probabilities(gm: np.ndarray, wm: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Tissue map of probability maps (in [0, 1]): the likelier class where it exceeds
    ``threshold`` (grey on ties), 0 elsewhere; int16."""
    gm, wm = np.asarray(gm, float), np.asarray(wm, float)
    out = np.zeros(gm.shape, np.int16)
    out[(gm >= wm) & (gm > threshold)] = TISSUE_GM
    out[(wm > gm) & (wm > threshold)] = TISSUE_WM
    return out


def template_dir_of_nilearn():
    """Folder of nilearn's bundled MNI152 files, or None when nilearn is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return folder if all((folder / f).exists() for f in TEMPLATE_FILES.values()) else None


def make_template_pair(data_dir, template_dir, out_dir, downsample: float = 1.0) -> dict:
    """Write the template pair (see the module docstring) to ``out_dir``; returns ``{"moving",
    "moving_labels", "fixed_labels", "label_values", "scoring": "tissue"}`` (paths)."""
    data_dir, template_dir, out_dir = Path(data_dir), Path(template_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t1_img = sitk.ReadImage(str(data_dir / T1_PATH), sitk.sitkFloat32)
    seg_img = sitk.ReadImage(str(data_dir / SEG_PATH))
    start, size = crop_to_mask(t1_img, sitk.GetArrayFromImage(t1_img) > 0)  # as make_pairs
    tissue = sitk.GetImageFromArray(tissue_of_aseg(aseg_of_subject(sitk.GetArrayFromImage(seg_img))))
    tissue.CopyInformation(seg_img)
    tissue = sitk.RegionOfInterest(tissue, size, start)
    images = {k: sitk.ReadImage(str(template_dir / f), sitk.sitkFloat32)
              for k, f in TEMPLATE_FILES.items()}
    probs = {k: sitk.GetArrayFromImage(images[k]) / 255.0 for k in ("gm", "wm")}  # uint8 maps
    labels = sitk.GetImageFromArray(tissue_of_probabilities(probs["gm"], probs["wm"]))
    labels.CopyInformation(images["t1"])
    start_m, size_m = crop_to_mask(images["t1"], sitk.GetArrayFromImage(images["t1"]) > 0)
    return {"moving": _write(sitk.RegionOfInterest(images["t1"], size_m, start_m),
                             out_dir / "mni152_moving.nii.gz", downsample, False),
            "moving_labels": _write(sitk.RegionOfInterest(labels, size_m, start_m),
                                    out_dir / "mni152_moving_labels.nii.gz", downsample, True),
            "fixed_labels": _write(tissue, out_dir / "fixed_tissue.nii.gz", downsample, True),
            "label_values": [TISSUE_GM, TISSUE_WM], "scoring": "tissue"}


def aseg_of_subject(seg: np.ndarray) -> np.ndarray:
    """aparc(.a2009s)+aseg -> aseg numbers: cortical parcels (1000-1999 / 11100-11199 left,
    2000-2999 / 12100-12199 right) -> 3 / 42; corpus callosum (251-255) -> the nearest cerebral
    white matter label (2 or 41), as in the SynthSeg maps, which have no callosum labels."""
    out = seg.astype(np.int32, copy=True)
    out[((seg >= 1000) & (seg < 2000)) | ((seg >= 11100) & (seg < 11200))] = 3
    out[((seg >= 2000) & (seg < 3000)) | ((seg >= 12100) & (seg < 12200))] = 42
    cc = (out >= 251) & (out <= 255)
    if cc.any():
        wm = np.isin(out, (2, 41))
        if wm.any():
            _, idx = ndimage.distance_transform_edt(~wm, return_indices=True)
            out[cc] = out[tuple(i[cc] for i in idx)]
    return out


def label_intensities(t1: np.ndarray, aseg: np.ndarray) -> tuple[dict[int, float], dict[str, float]]:
    """Mean intensity of ``t1`` per nonzero label of ``aseg`` and per tissue class (WM/GM/CSF),
    plus the extra-cerebral CSF value (see ``EXTRA_CEREBRAL_CSF``) under key 24."""
    t1 = np.asarray(t1, dtype=np.float64)
    aseg = np.asarray(aseg)
    values, inverse = np.unique(aseg.reshape(-1), return_inverse=True)
    sums = np.bincount(inverse, weights=t1.reshape(-1))
    counts = np.bincount(inverse)
    means = {int(v): float(s / c) for v, s, c in zip(values, sums, counts) if v != 0}
    classes = {}
    for name, labels in (("wm", CLASS_WM), ("gm", CLASS_GM), ("csf", CLASS_CSF)):
        sel = np.isin(values, labels)
        classes[name] = float(sums[sel].sum() / counts[sel].sum()) if counts[sel].sum() else 0.0
    rim = ((aseg == 0) | (aseg == EXTRA_CEREBRAL_CSF)) & (t1 > 0)
    if rim.any():
        means[EXTRA_CEREBRAL_CSF] = float(t1[rim].mean())
    elif EXTRA_CEREBRAL_CSF not in means:
        means[EXTRA_CEREBRAL_CSF] = classes["csf"]
    return means, classes


def intensity_table(labels: np.ndarray, means: dict[int, float],
                    classes: dict[str, float]) -> dict[int, float]:
    """Intensity of every label value in ``labels`` (see the module docstring for the rules)."""
    table = {0: 0.0}
    pending = []
    for v in (int(v) for v in np.unique(labels)):
        if v == 0:
            continue
        if v >= EXTRA_CEREBRAL_FIRST_LABEL:
            table[v] = 0.0
        elif v in means:
            table[v] = means[v]
        elif v in CLASS_WM:
            table[v] = classes["wm"]
        elif v in CLASS_GM:
            table[v] = classes["gm"]
        elif v in CLASS_CSF:
            table[v] = classes["csf"]
        else:
            pending.append(v)
    st = ndimage.generate_binary_structure(3, 1)
    for _ in range(3):  # neighbours may themselves be pending; a few rounds settle chains
        still = []
        for v in pending:
            m = labels == v
            box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in ndimage.find_objects(m.astype(np.int8))[0])
            mb, lb = m[box], labels[box]
            ring = ndimage.binary_dilation(mb, structure=st) & ~mb
            vals, counts = np.unique(lb[ring], return_counts=True)
            known = [(c, int(n)) for n, c in zip(vals, counts) if int(n) in table and n != 0
                     and int(n) < EXTRA_CEREBRAL_FIRST_LABEL]
            if known:
                table[v] = table[max(known)[1]]
            else:
                still.append(v)
        pending = still
    for v in pending:
        table[v] = classes["gm"]
    return table


def render_t1_like(labels: np.ndarray, table: dict[int, float], spacing=(1.0, 1.0, 1.0),
                   blur_sigma_mm: float = BLUR_SIGMA_MM, noise_std: float = NOISE_STD,
                   seed: int = 0) -> np.ndarray:
    """T1-like float32 image of an integer label array (array order, ``spacing`` in array order):
    intensity per label from ``table`` (labels missing from it are an error), Gaussian blur of
    ``blur_sigma_mm``, then Gaussian noise of ``noise_std`` (generator seeded with ``seed``) on
    the voxels that are non-zero after the blur (the background stays exactly 0, like the
    skull-stripped real T1), clipped at 0."""
    labels = np.asarray(labels)
    values = np.unique(labels)
    missing = [int(v) for v in values if int(v) not in table]
    if missing:
        raise ValueError(f"render_t1_like: no intensity for labels {missing}")
    lut_index = np.searchsorted(values, labels)
    img = np.asarray([table[int(v)] for v in values], dtype=np.float32)[lut_index]
    if blur_sigma_mm > 0:
        img = ndimage.gaussian_filter(img, [blur_sigma_mm / s for s in spacing], mode="nearest")
    if noise_std > 0:
        rng = np.random.default_rng(seed)
        inside = img > 1e-3
        img[inside] += rng.normal(0.0, noise_std, int(inside.sum())).astype(np.float32)
    return np.clip(img, 0, None).astype(np.float32)


def crop_to_mask(image: sitk.Image, mask: np.ndarray, margin_mm: float = MARGIN_MM) -> tuple:
    """Index region (start, size) in ITK order of the bounding box of ``mask`` (array order) plus
    ``margin_mm``, clipped to the image."""
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0)  # array order (k, j, i)
    sp = np.asarray(image.GetSpacing())[::-1]
    m = np.ceil(margin_mm / sp).astype(int)
    shape = np.asarray(mask.shape)
    lo = np.maximum(lo - m, 0)
    hi = np.minimum(hi + m, shape - 1)
    start = [int(v) for v in lo[::-1]]
    size = [int(v) for v in (hi - lo + 1)[::-1]]
    return start, size


def misaligned(image: sitk.Image, degrees: float = MISALIGN_DEGREES, axis=MISALIGN_AXIS,
               shift_mm=MISALIGN_SHIFT_MM) -> sitk.Image:
    """Same voxels, header moved: every physical point p becomes R (p - c) + c + t, with R a
    rotation of ``degrees`` about ``axis`` (LPS) through the image centre c and t ``shift_mm``."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    r = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    size = np.asarray(image.GetSize(), float)
    c = np.asarray(image.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2)))
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    out = sitk.Image(image)
    out.SetDirection(tuple((r @ d).ravel()))
    out.SetOrigin(tuple(r @ (np.asarray(image.GetOrigin()) - c) + c + np.asarray(shift_mm)))
    return out


def _resample_to(image: sitk.Image, spacing_mm: float, labels: bool) -> sitk.Image:
    """Same frame and extent, isotropic ``spacing_mm`` (development only: --downsample)."""
    size = [max(8, int(round(n * s / spacing_mm))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    first = np.asarray(image.TransformContinuousIndexToPhysicalPoint((-0.5,) * 3))
    origin = first + d @ (np.full(3, spacing_mm / 2))
    src = image
    if not labels:
        src = sitk.SmoothingRecursiveGaussian(image, max(1e-3, (spacing_mm - 1.0) / 2))
    return sitk.Resample(src, size, sitk.Transform(), sitk.sitkNearestNeighbor if labels
                         else sitk.sitkLinear, tuple(origin), (spacing_mm,) * 3,
                         image.GetDirection(), 0, image.GetPixelID())


def _write(image: sitk.Image, path: Path, downsample: float, labels: bool) -> str:
    if downsample and downsample != 1:
        image = _resample_to(image, downsample, labels)
    sitk.WriteImage(image, str(path))
    return str(path)


T2_LIKE = {"wm": 50.0, "gm": 80.0, "csf": 180.0}  # relative intensities (T1: WM > GM > CSF)


def render_t2_like(labels: np.ndarray, seed: int, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """T2-like image of a label map: class intensities (``T2_LIKE``; labels in no class get the
    grey-matter value), each label jittered by up to 10 %, background 0, Gaussian blur of
    ``BLUR_SIGMA_MM`` (spacing in array order, mm)."""
    rng = np.random.default_rng(seed)
    lut = np.full(max(256, int(labels.max()) + 1), T2_LIKE["gm"])
    lut[list(CLASS_WM)] = T2_LIKE["wm"]
    lut[list(CLASS_CSF) + [EXTRA_CEREBRAL_CSF]] = T2_LIKE["csf"]
    lut *= rng.uniform(0.9, 1.1, lut.size)
    lut[0] = 0.0
    img = lut[labels].astype(np.float32)
    return ndimage.gaussian_filter(img, [BLUR_SIGMA_MM / s for s in spacing]).astype(np.float32)


def make_pairs(data_dir, out_dir, maps=HELD_OUT_MAPS, misaligned_maps=(14,), t2_maps=(),
               downsample: float = 1.0, log=print) -> dict:
    """Write the fixed image, its labels and every moving image / label map to ``out_dir``.

    Returns ``{"fixed": path, "fixed_labels": path, "pairs": {name: {"moving": path,
    "moving_labels": path}}, "fixed_size": (x, y, z)}``; pair names are ``segNN`` and
    ``segNN-misaligned`` and ``segNN-t2``. Existing files in ``out_dir`` written by an identical call are reused
    (``pairs.json`` records the call).
    """
    import json

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for m in list(maps) + list(misaligned_maps) + list(t2_maps):
        if int(m) not in HELD_OUT_MAPS:
            raise ValueError(f"label map {m} is not held out (use {HELD_OUT_MAPS}; 01-13 train)")
    misaligned_maps = [int(m) for m in misaligned_maps]
    t2_maps = [int(m) for m in t2_maps]
    needed = sorted(set(int(m) for m in maps) | set(misaligned_maps) | set(t2_maps))
    call = {"maps": sorted(int(m) for m in maps), "misaligned": misaligned_maps,
            "downsample": float(downsample), "version": 1}
    if t2_maps:  # absent otherwise, so that earlier records stay valid
        call["t2"] = t2_maps
    record = out_dir / "pairs.json"
    if record.exists():
        old = json.loads(record.read_text())
        if old.get("call") == call and all(Path(p).exists() for p in _paths(old)):
            return old["result"]

    t1_img = sitk.ReadImage(str(data_dir / T1_PATH), sitk.sitkFloat32)
    seg_img = sitk.ReadImage(str(data_dir / SEG_PATH))
    t1 = sitk.GetArrayFromImage(t1_img)
    aseg = aseg_of_subject(sitk.GetArrayFromImage(seg_img))
    means, classes = label_intensities(t1, aseg)
    start, size = crop_to_mask(t1_img, t1 > 0)
    fixed = sitk.RegionOfInterest(t1_img, size, start)
    aseg_img = sitk.GetImageFromArray(aseg)
    aseg_img.CopyInformation(seg_img)
    fixed_labels = sitk.Cast(sitk.RegionOfInterest(aseg_img, size, start), sitk.sitkInt16)
    result = {"fixed": _write(fixed, out_dir / "fixed.nii.gz", downsample, False),
              "fixed_labels": _write(fixed_labels, out_dir / "fixed_labels.nii.gz", downsample, True),
              "fixed_size": list(sitk.ReadImage(str(out_dir / "fixed.nii.gz")).GetSize()),
              "fixed_size_1mm": size, "pairs": {}}
    for m in needed:
        lab_img = sitk.ReadImage(str(data_dir / SYNTHSEG_PATH.format(m)))
        lab = np.rint(sitk.GetArrayFromImage(lab_img)).astype(np.int32)
        table = intensity_table(lab, means, classes)
        lab[lab >= EXTRA_CEREBRAL_FIRST_LABEL] = 0  # skull-stripped
        spacing = tuple(reversed(lab_img.GetSpacing()))
        img = render_t1_like(lab, table, spacing=spacing, seed=1000 + m)
        img_s = sitk.GetImageFromArray(img)
        img_s.CopyInformation(lab_img)
        lab_s = sitk.GetImageFromArray(lab.astype(np.int16))
        lab_s.CopyInformation(lab_img)
        start_m, size_m = crop_to_mask(lab_img, lab > 0)
        img_s = sitk.RegionOfInterest(img_s, size_m, start_m)
        lab_s = sitk.RegionOfInterest(lab_s, size_m, start_m)
        variants = []
        if m in maps:
            variants.append((f"seg{m:02d}", img_s, lab_s))
        if m in misaligned_maps:
            variants.append((f"seg{m:02d}-misaligned", misaligned(img_s), misaligned(lab_s)))
        if m in t2_maps:
            t2 = sitk.GetImageFromArray(render_t2_like(lab, 2000 + m, spacing))
            t2.CopyInformation(lab_img)
            variants.append((f"seg{m:02d}-t2", sitk.RegionOfInterest(t2, size_m, start_m), lab_s))
        for name, im, lb in variants:
            result["pairs"][name] = {
                "moving": _write(im, out_dir / f"{name}_moving.nii.gz", downsample, False),
                "moving_labels": _write(lb, out_dir / f"{name}_moving_labels.nii.gz", downsample,
                                        True)}
        log(f"  pair images for map {m:02d}: {', '.join(v[0] for v in variants)} "
            f"(moving {size_m[0]}x{size_m[1]}x{size_m[2]} at 1 mm)")
    record.write_text(json.dumps({"call": call, "result": result}, indent=1))
    return result


def _paths(record: dict):
    res = record["result"]
    yield res["fixed"]
    yield res["fixed_labels"]
    for p in res["pairs"].values():
        yield p["moving"]
        yield p["moving_labels"]
