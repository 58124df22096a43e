"""A CT-sized trunk phantom pair with a known smooth deformation (``bench_ct.py``'s data).

Anatomy, analytic in LPS mm (x = patient left, y = posterior, z = superior; centre at 0):
an elliptic trunk in air (-1000 HU) with a fat layer under the skin (-100 HU), soft tissue
(40 HU), lungs (-850 HU) above z = 40 mm, liver, spleen, contrast-filled kidneys and aorta,
a vertebral column (700 HU) with discs, ribs (700 HU) in the upper half. Soft tissue carries a
smooth texture (+-15 HU, a function of position, so it moves with the anatomy) and each image
gets its own acquisition noise (12 HU), then a 0.5-voxel blur (partial volume). Stored as
int16 HU, labels as uint8 (``LABELS``).

The moving image is the same anatomy seen through a smooth map ``psi`` (moving point y ->
fixed point ``psi(y) = R y + s + sum_k a_k exp(-|y - c_k|^2 / (2 sigma^2))``: a 2 degree
rotation, a few mm of shift and ten Gaussian bumps of 45 mm, |displacement| up to ~10 mm), so
moving(y) = fixed anatomy at psi(y). The registration's field d (fixed point x -> moving point
x + d(x)) is then exact where psi(x + d(x)) = x: ``true_moving_points`` solves it for the
landmarks (fixed-point iteration, psi being a small perturbation of a rotation).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LABELS = {1: "soft tissue", 2: "fat", 3: "left lung", 4: "right lung", 5: "liver",
          6: "left kidney", 7: "right kidney", 8: "spleen", 9: "vertebrae", 10: "aorta",
          11: "ribs", 12: "discs"}
HU = {0: -1000, 1: 40, 2: -100, 3: -850, 4: -850, 5: 60, 6: 150, 7: 150, 8: 50, 9: 700,
      10: 180, 11: 700, 12: 90}
#: the labels scored by Dice (organs and bone; not the trunk's soft tissue and fat)
SCORED = (3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
CT_SIZE = (512, 512, 320)        # x, y, z voxels
CT_SPACING = (0.7, 0.7, 1.0)     # mm


def _ellipsoid(p, centre, axes):
    return (((p - np.asarray(centre)) / np.asarray(axes)) ** 2).sum(axis=1) <= 1.0


def labels_at(p: np.ndarray) -> np.ndarray:
    """Label of each LPS point ``p (N, 3)`` in mm."""
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    a = 150.0 + 8.0 * np.sin(z / 60.0)
    b = 105.0 + 5.0 * np.cos(z / 45.0)
    r = (x / a) ** 2 + (y / b) ** 2
    lab = np.zeros(len(p), np.uint8)
    lab[r <= 1.0] = 2
    lab[r <= 0.9 ** 2] = 1
    lab[_ellipsoid(p, (-60, -10, 10), (70, 70, 60))] = 5
    lab[_ellipsoid(p, (80, 30, 20), (30, 40, 40))] = 8
    lab[_ellipsoid(p, (60, 55, -50), (25, 25, 50))] = 6
    lab[_ellipsoid(p, (-60, 55, -50), (25, 25, 50))] = 7
    lab[_ellipsoid(p, (75, 10, 110), (55, 65, 90))] = 3
    lab[_ellipsoid(p, (-75, 10, 110), (55, 65, 90))] = 4
    lab[(x - 15) ** 2 + (y - 35) ** 2 <= 11.0 ** 2] = 10
    spine = x ** 2 + (y - 65) ** 2 <= 17.0 ** 2
    lab[spine] = 9
    lab[spine & (np.mod(z + 160.0, 32.0) < 6.0)] = 12
    lab[(x ** 2 + (y - 90) ** 2 <= 8.0 ** 2)] = 1  # spinal canal
    ribs = (r >= 0.84 ** 2) & (r <= 0.88 ** 2) & (z > 0) & (np.mod(z + 160.0, 24.0) < 9.0)
    lab[ribs] = 11
    return lab


def _texture(p: np.ndarray) -> np.ndarray:
    """Smooth tissue texture (HU), a fixed function of anatomical position."""
    rng = np.random.default_rng(7)
    out = np.zeros(len(p))
    for _ in range(6):
        k = rng.normal(size=3)
        k *= 2 * np.pi / rng.uniform(12.0, 30.0) / np.linalg.norm(k)
        out += 6.0 * np.sin(p @ k + rng.uniform(0, 2 * np.pi))
    return out


class Deformation:
    """``psi``: moving point -> fixed point (LPS mm), see the module docstring."""

    def __init__(self, seed: int = 3):
        rng = np.random.default_rng(seed)
        angle = np.deg2rad(2.0)
        self.rotation = np.array([[np.cos(angle), -np.sin(angle), 0],
                                  [np.sin(angle), np.cos(angle), 0], [0, 0, 1.0]])
        self.shift = np.array([2.0, -3.0, 4.0])
        self.centres = rng.uniform((-130, -90, -150), (130, 90, 150), size=(10, 3))
        self.amplitudes = rng.normal(0.0, 3.5, size=(10, 3))
        self.sigma = 45.0

    def bumps(self, p: np.ndarray) -> np.ndarray:
        out = np.zeros_like(p)
        for c, a in zip(self.centres, self.amplitudes):
            out += np.exp(-((p - c) ** 2).sum(axis=1) / (2 * self.sigma ** 2))[:, None] * a
        return out

    def psi(self, y: np.ndarray) -> np.ndarray:
        return y @ self.rotation.T + self.shift + self.bumps(y)

    def inverse(self, x: np.ndarray, iterations: int = 50) -> np.ndarray:
        """Points y with psi(y) = x: y = R^T (x - s - bumps(y)), iterated (a contraction)."""
        y = (x - self.shift) @ self.rotation
        for _ in range(iterations):
            y = (x - self.shift - self.bumps(y)) @ self.rotation
        return y


def _grid(size, spacing):
    """Geometry of both images: identity direction, centred at the origin (LPS mm)."""
    origin = -0.5 * (np.asarray(size) - 1) * np.asarray(spacing)
    return np.asarray(size), np.asarray(spacing, dtype=float), origin


def _render(size, spacing, to_anatomy, seed: int):
    """(HU int16, labels uint8) arrays (k, j, i), slice by slice: each voxel centre y is looked
    up in the anatomy at ``to_anatomy(y)``."""
    from scipy import ndimage
    size, spacing, origin = _grid(size, spacing)
    rng = np.random.default_rng(seed)
    ii, jj = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="xy")
    hu = np.empty(tuple(size[::-1]), np.float32)
    lab = np.empty(tuple(size[::-1]), np.uint8)
    for k in range(size[2]):
        y = np.stack([origin[0] + ii.ravel() * spacing[0], origin[1] + jj.ravel() * spacing[1],
                      np.full(ii.size, origin[2] + k * spacing[2])], axis=1)
        p = to_anatomy(y)
        labels = labels_at(p)
        values = np.asarray([HU[v] for v in range(13)], np.float32)[labels]
        soft = np.isin(labels, (1, 5, 6, 7, 8))
        values[soft] += _texture(p[soft]).astype(np.float32)
        values += rng.normal(0.0, 12.0, size=values.shape).astype(np.float32)
        hu[k] = values.reshape(size[1], size[0])
        lab[k] = labels.reshape(size[1], size[0])
    hu = ndimage.gaussian_filter(hu, 0.5, output=hu)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), lab


def landmarks(labels: np.ndarray, size, spacing, count: int = 2000, seed: int = 5) -> np.ndarray:
    """``count`` LPS points (mm) on the surfaces of the scored structures of the fixed labels
    (voxels with a face neighbour of another label), where the deformation is observable."""
    surface = np.zeros(labels.shape, bool)
    for axis in range(3):
        diff = np.diff(labels, axis=axis) != 0
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        surface[tuple(lo)] |= diff
        surface[tuple(hi)] |= diff
    surface &= np.isin(labels, SCORED)
    kji = np.argwhere(surface)
    pick = np.random.default_rng(seed).choice(len(kji), size=min(count, len(kji)), replace=False)
    _, sp, origin = _grid(size, spacing)
    return origin + kji[pick][:, ::-1] * sp


def make_ct_pair(folder: Path, size=CT_SIZE, spacing=CT_SPACING, seed: int = 3) -> dict:
    """Write fixed/moving images and labels (.nii.gz) and landmarks.json into ``folder`` (kept:
    an existing complete pair is reused); returns the paths."""
    import SimpleITK as sitk
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = ("fixed", "moving", "fixed_labels", "moving_labels")
    paths = {n: folder / f"{n}.nii.gz" for n in names}
    paths["landmarks"] = folder / "landmarks.json"
    key = {"size": list(size), "spacing": list(spacing), "seed": seed, "version": 1}
    if paths["landmarks"].exists() and all(p.exists() for p in paths.values()):
        if json.loads(paths["landmarks"].read_text()).get("pair") == key:
            return paths
    _, sp, origin = _grid(size, spacing)
    psi = Deformation(seed)

    def write(array, path):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(v) for v in sp))
        image.SetOrigin(tuple(float(v) for v in origin))
        sitk.WriteImage(image, str(path))

    hu, lab = _render(size, spacing, lambda y: y, seed=11)
    write(hu, paths["fixed"])
    write(lab, paths["fixed_labels"])
    points = landmarks(lab, size, spacing)
    del hu, lab
    hu, lab = _render(size, spacing, psi.psi, seed=12)
    write(hu, paths["moving"])
    write(lab, paths["moving_labels"])
    truth = psi.inverse(points)
    paths["landmarks"].write_text(json.dumps({"pair": key, "fixed_points_lps": points.tolist(),
                                              "moving_points_lps": truth.tolist()}))
    return paths
