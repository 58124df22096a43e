"""Pair sources for training: synthetic (no data) or image files (a folder or a Learn2Reg JSON).

Every source yields dicts with ``fixed``, ``moving`` (1, 1, *shape) float in [0, 1] and, when
known, ``fixed_labels`` / ``moving_labels`` (1, 1, *shape) int64. File pairs are resampled into a
grid of the card's working spacing centred on the fixed image (fixed image's frame, physical
identity between the two images: inputs are assumed affinely pre-aligned), cropped or padded to
``shape`` (array order).
"""
from __future__ import annotations

import json
from pathlib import Path

import SimpleITK as sitk
import torch

from EOIRRegistrationLib.core import geometry
from EOIRRegistrationLib.core.errors import InputError
from EOIRRegistrationLib.core.intensity import DEFAULT_NORMALIZATION, normalize, window_of
from EOIRRegistrationLib.core.nifti_data import data_problem
from EOIRRegistrationLib.training.synthetic import SyntheticConfig, synthetic_pair

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class SyntheticSource:
    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg

    def sample(self, gen: torch.Generator) -> dict:
        return synthetic_pair(self.cfg, gen)

    def describe(self) -> str:
        return f"synthetic smooth-label pairs {tuple(self.cfg.shape)} ({self.cfg.num_labels} labels)"


def _is_image(p: Path) -> bool:
    return any(p.name.endswith(s) for s in IMAGE_SUFFIXES)


def entries_from(path: str | Path) -> tuple[list[dict], list[tuple[int, int]]]:
    """(entries [{"image", "label"?}], explicit pairs [(fixed_idx, moving_idx)]) from a folder or a
    Learn2Reg-style JSON ("training": [{"image", "label"}], optional "training_paired_images":
    [{"fixed", "moving"}]). In a folder, ``*_seg*`` / ``*label*`` files are the label maps of the
    image with the same name stem before that tag."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _is_image(p))
        labels = {p.name: p for p in files if "_seg" in p.name or "label" in p.name}
        images = [p for p in files if p.name not in labels]
        entries = []
        for img in images:
            stem = img.name.split(".")[0]
            match = [label for n, label in labels.items() if n.startswith(stem)]
            entries.append({"image": str(img), **({"label": str(match[0])} if match else {})})
        return entries, []
    if path.suffix == ".json":
        return _learn2reg_entries(path)
    raise InputError(f"training data must be a folder of images or a Learn2Reg JSON file: {path}")


def _learn2reg_entries(path: Path) -> tuple[list[dict], list[tuple[int, int]]]:
    """``entries_from`` for a Learn2Reg-style JSON; refuses what training would trip over later
    (a missing file, an entry without its image, a pair of images not listed for training)."""
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable JSON file: {exc}") from exc
    layout = ('a Learn2Reg JSON lists "training": [{"image": ..., "label": ...}, ...] and, '
              'optionally, "training_paired_images": [{"fixed": ..., "moving": ...}, ...]')
    if not isinstance(spec, dict) or not isinstance(spec.get("training", []), list) \
            or not isinstance(spec.get("training_paired_images", []), list):
        raise InputError(f"{path}: {layout}")
    root = path.parent
    entries = []
    for n, e in enumerate(spec.get("training", []), 1):
        if not isinstance(e, dict) or not isinstance(e.get("image"), str):
            raise InputError(f'{path}: training entry {n} has no "image"; {layout}')
        if not isinstance(e.get("label", ""), str):
            raise InputError(f'{path}: training entry {n} has a "label" that is not a file name')
        entries.append({k: str((root / v).resolve()) for k, v in e.items() if k in ("image", "label")})
    missing = [f for e in entries for f in e.values() if not Path(f).is_file()]
    if missing:
        raise InputError(f"{path}: {len(missing)} of the files it lists do not exist, e.g. {missing[0]}")
    index = {e["image"]: i for i, e in enumerate(entries)}
    pairs = []
    for n, p in enumerate(spec.get("training_paired_images", []), 1):
        if not isinstance(p, dict) or not all(isinstance(p.get(k), str) for k in ("fixed", "moving")):
            raise InputError(f'{path}: training pair {n} needs "fixed" and "moving"; {layout}')
        f, m = str((root / p["fixed"]).resolve()), str((root / p["moving"]).resolve())
        for image in (f, m):
            if image not in index:
                raise InputError(f'{path}: training pair {n} names {image}, which is not among '
                                 'its "training" images')
        pairs.append((index[f], index[m]))
    return entries, pairs


def check_header(path: str, role: str, source: str = "training data") -> None:
    """Refuse, from its header alone, a file ITK cannot read or that is not a 3D scalar volume
    (``source``: the data source the message names)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{source}: {path} is not an image file ITK can read") from exc
    if reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1:
        raise InputError(f"{source}: {path} ({role}) is {reader.GetDimension()}D with "
                         f"{reader.GetNumberOfComponents()} components per voxel; training needs 3D "
                         "scalar volumes")


#: files whose NIfTI data block was checked (``nifti_data``), each once per process
_CHECKED: set[str] = set()


def _read(path: str) -> sitk.Image:
    """A listed file, read whole during training (its header was checked before). A NIfTI file's
    data block is checked the first time it is drawn: ITK's reader fills a truncated one with
    zeros and reads NaN as 0, which training would learn from without an error."""
    if path not in _CHECKED and path.lower().endswith((".nii", ".nii.gz", ".hdr", ".img")):
        problem = data_problem(path)
        if problem:
            raise InputError(f"training data: {path} {problem}; mend or remove it, then --resume")
        _CHECKED.add(path)
    try:
        return sitk.ReadImage(path)
    except RuntimeError as exc:
        raise InputError(f"training data: cannot read {path} ({str(exc).strip().splitlines()[-1]}); "
                         "mend or remove it, then --resume") from exc


class FileSource:
    def __init__(self, path, shape=(96, 96, 96), spacing=(2.0, 2.0, 2.0),
                 normalization=DEFAULT_NORMALIZATION):
        self.entries, self.pairs = entries_from(path)
        if len(self.entries) < 2 and not self.pairs:
            raise InputError(f"{path}: need at least two images to make training pairs")
        for entry in self.entries:  # headers only: a file that cannot train fails here, not mid-run
            for role, file in entry.items():
                check_header(file, role)
        self.shape, self.spacing, self.normalization = tuple(shape), tuple(spacing), normalization
        self.path = str(path)

    def describe(self) -> str:
        return f"{len(self.entries)} images from {self.path}"

    def _grid(self, image: sitk.Image) -> geometry.Grid:
        ref = geometry.Grid.from_image(image)
        size = tuple(reversed(self.shape))
        m = ref.direction_matrix * self.spacing
        origin = ref.center() - m @ ((torch.tensor(size, dtype=torch.float64).numpy() - 1) / 2)
        return geometry.Grid(size, self.spacing, tuple(origin), ref.direction)

    def _load(self, entry: dict, grid: geometry.Grid):
        image = _read(entry["image"])
        raw = geometry.image_to_tensor(image)
        img = geometry.sample_through_like_itk(raw, geometry.Grid.from_image(image), grid)
        img = normalize(img, window_of(raw, self.normalization))
        labels = None
        if "label" in entry:
            lab = _read(entry["label"])
            labels = geometry.sample_through_like_itk(
                geometry.image_to_tensor(lab), geometry.Grid.from_image(lab), grid,
                mode="nearest").round().long()
        return img, labels

    def sample(self, gen: torch.Generator) -> dict:
        if self.pairs:
            fi, mi = self.pairs[int(torch.randint(len(self.pairs), (1,), generator=gen))]
        else:
            fi, mi = torch.randperm(len(self.entries), generator=gen)[:2].tolist()
        grid = self._grid(_read(self.entries[fi]["image"]))
        fixed, fixed_labels = self._load(self.entries[fi], grid)
        moving, moving_labels = self._load(self.entries[mi], grid)
        pair = {"fixed": fixed, "moving": moving}
        if fixed_labels is not None and moving_labels is not None:
            pair.update(fixed_labels=fixed_labels, moving_labels=moving_labels)
        return pair
