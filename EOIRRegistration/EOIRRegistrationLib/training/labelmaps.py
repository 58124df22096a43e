"""SynthMorph-style training pairs from real anatomical label maps (contrast-agnostic training).

At load time every label map is resampled (nearest) to the working spacing and affinely aligned
to the first one: a least-squares affine between the centroids of the brain structures both maps
share (exact for label maps, no image registration needed). Each pair then draws two maps (or
one map twice), and for each image independently: a small random affine (about the residual the
pipeline's initial alignment leaves: with 6 degrees and 3 voxels per image the pairs started at
label Dice 0.25 instead of 0.46, a misalignment the model never meets after that alignment) and a
random smooth diffeomorphic deformation (one nearest-neighbour warp of the labels), optional
skull stripping (labels >= 500 are extra-cerebral tissue in the SynthSeg maps), a random crop,
and a random contrast (one random intensity per label, blur, bias field, noise, gamma; with
``zero_background_probability`` a background of exact zeros, as in skull-stripped scans); with
``same_contrast_probability`` both images share one contrast. Each pair also carries
``moving_similarity``, the moving anatomy in the fixed image's contrast (clean): the objective
compares it with the fixed image, so LNCC is a valid dense training signal even when the network
sees two different contrasts (SynthMorph trains on the Dice term alone, ``--similarity none
--dice-weight 1``, which also works here).
Tensors follow spatial.py (array order, (1, 1, D, H, W)).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from EOIRRegistrationLib.core import geometry, spatial
from EOIRRegistrationLib.core.errors import InputError
from EOIRRegistrationLib.core.intensity import normalize, window_of
from EOIRRegistrationLib.core.nifti_data import data_problem
from EOIRRegistrationLib.training.data import check_header
from EOIRRegistrationLib.training.synthetic import SyntheticConfig, _uniform, smooth_noise

EXTRA_CEREBRAL_FIRST_LABEL = 500


def _centroids(labels: np.ndarray, values) -> dict[int, np.ndarray]:
    out = {}
    for v in values:
        idx = np.argwhere(labels == v)
        if len(idx) > 20:
            out[int(v)] = idx.mean(axis=0)
    return out


def centroid_affine(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """4x4 array-coordinate affine mapping ``target`` voxels to ``source`` voxels that best maps
    the centroids of the brain structures both maps share (least squares). Used to resample
    ``source`` onto ``target``'s grid. Extra-cerebral labels (skin, skull, fat...) are left out:
    their extent depends on the field of view (a neck cut off moves the skin's centroid by
    centimetres), and with them five of the sixteen SynthSeg maps were stretched by up to 1.5x."""
    values = sorted(v for v in set(np.unique(source)) & set(np.unique(target))
                    if 0 < v < EXTRA_CEREBRAL_FIRST_LABEL)
    cs, ct = _centroids(source, values), _centroids(target, values)
    shared = sorted(set(cs) & set(ct))
    if len(shared) < 4:
        raise InputError("label maps share fewer than 4 brain structures: cannot align them")
    t = np.array([ct[v] for v in shared])
    s = np.array([cs[v] for v in shared])
    design = np.hstack([t, np.ones((len(t), 1))])
    coef, *_ = np.linalg.lstsq(design, s, rcond=None)  # s ~ [t 1] @ coef
    a = np.eye(4)
    a[:3, :] = coef.T
    return a


class LabelMapSource:
    renders_moving_in_fixed_contrast = True  # pairs carry ``moving_similarity`` (see sample)

    def __init__(self, folder, shape=(80, 96, 80), spacing=2.0, skull_strip_probability=0.5,
                 max_rotation_deg=2.0, max_scaling=0.02, max_shift_vox=1.0,
                 synthetic: SyntheticConfig | None = None, max_maps: int | None = None,
                 same_contrast_probability: float = 0.0,
                 zero_background_probability: float = 0.0):
        if not Path(folder).is_dir():
            raise InputError(f"labelmaps: {folder} is not a folder (of label maps, *.nii.gz)")
        files = sorted(p for p in Path(folder).iterdir() if p.name.endswith((".nii.gz", ".nii")))
        if max_maps:
            files = files[:max_maps]
        if not files:
            raise InputError(f"no label maps (*.nii.gz) in {folder}")
        self.shape, self.spacing = tuple(shape), float(spacing)
        self.skull_strip_probability = skull_strip_probability
        self.max_rotation = math.radians(max_rotation_deg)
        self.max_scaling, self.max_shift = max_scaling, max_shift_vox
        self.style = synthetic or SyntheticConfig(shape=self.shape, max_velocity=1.5)
        self.same_contrast_probability = float(same_contrast_probability)
        self.zero_background_probability = float(zero_background_probability)
        self.maps = self._load_aligned(files)
        self.max_label = max(int(m.max()) for m in self.maps)
        self.folder = str(folder)

    def describe(self) -> str:
        return (f"{len(self.maps)} label maps from {Path(self.folder).name} (SynthMorph-style, "
                f"{self.spacing:g} mm, crops {self.shape})")

    def _load_aligned(self, files) -> list[torch.Tensor]:
        maps = []
        for path in files:
            check_header(str(path), "label map", source="labelmaps")
            problem = data_problem(str(path))  # ITK would read a truncated map's rest as label 0
            if problem:
                raise InputError(f"labelmaps: {path} {problem}")
            image = sitk.ReadImage(str(path))
            grid = geometry.Grid.from_image(image)
            # Resample to the working spacing in the map's own frame (nearest neighbour).
            size = [int(round(n * s / self.spacing)) for n, s in zip(grid.size, grid.spacing)]
            target = geometry.Grid(tuple(size), (self.spacing,) * 3,
                                   tuple(grid.center() - grid.direction_matrix
                                         @ (self.spacing * (np.asarray(size) - 1) / 2)),
                                   grid.direction)
            lab = geometry.sample_through_like_itk(geometry.image_to_tensor(image), grid, target,
                                                   mode="nearest")
            maps.append(lab[0, 0].round().to(torch.int16))
        reference = maps[0].numpy()
        aligned = [maps[0]]
        for lab in maps[1:]:
            a = centroid_affine(lab.numpy(), reference)
            p = spatial.identity_grid(reference.shape, dtype=torch.float64)
            coords = torch.einsum("ab,b...->a...", torch.as_tensor(a[:3, :3]), p) \
                + torch.as_tensor(a[:3, 3]).view(3, 1, 1, 1)
            warped = spatial.sample(lab[None, None].double(), coords[None], mode="nearest")
            aligned.append(warped[0, 0].to(torch.int16))
        return aligned

    def _random_affine(self, gen, shape) -> torch.Tensor:
        """Voxel displacement of a random affine about the volume centre, (1, 3, *shape)."""
        angles = [_uniform(gen, -self.max_rotation, self.max_rotation) for _ in range(3)]
        rot = sitk.Euler3DTransform((0, 0, 0), *angles).GetMatrix()
        m = np.reshape(rot, (3, 3)) * (1 + np.array([_uniform(gen, -self.max_scaling,
                                                               self.max_scaling) for _ in range(3)]))
        centre = (np.asarray(shape) - 1) / 2
        shift = np.array([_uniform(gen, -self.max_shift, self.max_shift) for _ in range(3)])
        p = spatial.identity_grid(shape, dtype=torch.float32)
        lin = torch.as_tensor(m - np.eye(3), dtype=torch.float32)
        off = torch.as_tensor(-(m - np.eye(3)) @ centre + shift, dtype=torch.float32)
        return (torch.einsum("ab,b...->a...", lin, p) + off.view(3, 1, 1, 1))[None]

    def _crop_origin(self, gen) -> torch.Tensor:
        """Array origin of a crop centred on the brain (of the aligned maps) plus a jitter shared
        by both images of a pair, so that their fields of view match up to the random affine."""
        brain = np.argwhere((self.maps[0].numpy() > 0) &
                            (self.maps[0].numpy() < EXTRA_CEREBRAL_FIRST_LABEL))
        centre = (brain.min(0) + brain.max(0)) / 2
        jitter = [_uniform(gen, -6, 6) for _ in range(3)]
        start = centre - (np.asarray(self.shape) - 1) / 2 + jitter
        return torch.tensor(np.round(start), dtype=torch.float32).view(3, 1, 1, 1)

    def _deformed_labels(self, base: torch.Tensor, origin: torch.Tensor, gen) -> torch.Tensor:
        """The crop of ``base`` at ``origin`` after a random affine and a random smooth
        diffeomorphic deformation, optionally skull-stripped; (1, 1, D, H, W) int64."""
        crop = spatial.identity_grid(self.shape) + origin  # beyond the map: background
        amp = _uniform(gen, 0.3, 1.0) * self.style.max_velocity
        v = smooth_noise(3, self.shape, self.style.deformation_scale, gen) * amp
        u = spatial.compose(self._random_affine(gen, self.shape), spatial.integrate_velocity(v, 7))
        labels = spatial.sample(base[None, None].float(), crop[None] + u, mode="nearest").long()
        if torch.rand((), generator=gen).item() < self.skull_strip_probability:
            labels = labels * (labels < EXTRA_CEREBRAL_FIRST_LABEL)
        return labels

    def _contrast(self, gen) -> dict:
        """A random contrast: one intensity per label value (background darkish), a blur and a
        gamma; applied by _render."""
        lut = torch.rand(self.max_label + 1, generator=gen)
        lut[0] = _uniform(gen, 0.0, 0.15)
        return {"lut": lut, "sigma": _uniform(gen, 0.0, self.style.max_blur),
                "gamma": math.exp(_uniform(gen, -0.3, 0.3))}

    def _render(self, labels: torch.Tensor, contrast: dict, gen=None) -> torch.Tensor:
        """Image of ``labels`` in ``contrast``; with ``gen``, plus a random bias field and noise
        (without: the clean image, used as the similarity target)."""
        image = contrast["lut"][labels].float()
        if contrast["sigma"] > 0.1:
            image = spatial.gaussian_blur(image, contrast["sigma"])
        if gen is not None:
            bias = torch.exp(smooth_noise(1, self.shape, 16, gen)
                             * _uniform(gen, 0, self.style.max_bias))
            image = image * bias + torch.randn(image.shape, generator=gen) * _uniform(
                gen, 0, self.style.max_noise)
        image = normalize(image, window_of(image))
        return image ** contrast["gamma"]

    def _foreground(self, labels: torch.Tensor, gen) -> torch.Tensor | float:
        """With ``zero_background_probability``, the mask of the labelled voxels: the image's
        background becomes exactly 0, as in skull-stripped scans (FreeSurfer's, for one), whose
        flat background the rendered noise otherwise never shows the network. Else 1."""
        if self.zero_background_probability <= 0:  # no draw: earlier runs resume identically
            return 1.0
        if torch.rand((), generator=gen).item() < self.zero_background_probability:
            return (labels > 0).float()
        return 1.0

    def sample(self, gen: torch.Generator) -> dict:
        """A pair with labels, plus ``moving_similarity``: the moving anatomy rendered, without
        bias or noise, in the fixed image's contrast, so that an intensity similarity stays
        meaningful whatever the two input contrasts are."""
        i, j = (int(k) for k in torch.randint(len(self.maps), (2,), generator=gen))
        origin = self._crop_origin(gen)
        fixed_labels = self._deformed_labels(self.maps[i], origin, gen)
        moving_labels = self._deformed_labels(self.maps[j], origin, gen)
        fixed_contrast = self._contrast(gen)
        same = torch.rand((), generator=gen).item() < self.same_contrast_probability
        moving_contrast = fixed_contrast if same else self._contrast(gen)
        fixed = self._render(fixed_labels, fixed_contrast, gen)
        fixed = fixed * self._foreground(fixed_labels, gen)
        moving = self._render(moving_labels, moving_contrast, gen)
        moving = moving * self._foreground(moving_labels, gen)
        return {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels,
                "moving_labels": moving_labels,
                "moving_similarity": self._render(moving_labels, fixed_contrast)}
