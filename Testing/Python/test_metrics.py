"""Tests of EOIRRegistrationLib.core.metrics and core.qa against closed-form expectations."""
import math

import numpy as np
import pytest
import torch

from EOIRRegistrationLib.core import geometry, metrics, qa


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = (math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay),
                              math.cos(az), math.sin(az))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _oblique_grid():
    """Anisotropic, oblique, non-cubic grid (ITK size 7 x 6 x 9 -> array shape (9, 6, 7))."""
    return geometry.Grid(size=(7, 6, 9), spacing=(1.5, 0.8, 2.2), origin=(-10.0, 20.0, 5.0),
                         direction=tuple(_rotation(0.3, -0.5, 0.8).ravel()))


def _physical_positions(grid):
    """LPS position of every voxel, (3, k, j, i) float64, channels x, y, z."""
    m = grid.array_to_physical()
    axes = [np.arange(s, dtype=np.float64) for s in grid.shape]
    p = np.stack(np.meshgrid(*axes, indexing="ij"))
    return np.einsum("ab,b...->a...", m[:3, :3], p) + m[:3, 3].reshape(3, 1, 1, 1)


AFFINE = np.array([[1.1, 0.2, -0.1], [0.05, 0.9, 0.3], [-0.2, 0.1, 1.2]])


def test_jacobian_of_affine_on_oblique_grid_is_det_A():
    grid = _oblique_grid()
    x = _physical_positions(grid)
    t = np.array([3.0, -2.0, 1.0]).reshape(3, 1, 1, 1)
    d = np.einsum("ab,b...->a...", AFFINE - np.eye(3), x) + t
    det = metrics.jacobian_determinant(torch.from_numpy(d), grid)
    assert det.shape == grid.shape and det.dtype == torch.float64
    # Linear fields: central and one-sided differences are exact, so every voxel, borders included.
    np.testing.assert_allclose(det.numpy(), np.linalg.det(AFFINE), rtol=0, atol=1e-5)


def test_jacobian_of_polynomial_field_closed_form():
    grid = _oblique_grid()
    x, y, z = _physical_positions(grid)
    a, b, c = 0.04, -0.05, 0.03
    d = np.stack([a * y ** 2, b * x * z, c * x * y])
    det = metrics.jacobian_determinant(torch.from_numpy(d), grid).numpy()
    jac = np.zeros(x.shape + (3, 3))
    jac[..., 0, 1] = 2 * a * y
    jac[..., 1, 0], jac[..., 1, 2] = b * z, b * x
    jac[..., 2, 0], jac[..., 2, 1] = c * y, c * x
    expected = np.linalg.det(np.eye(3) + jac)
    # The field is quadratic in the voxel index too, so central differences are exact on the
    # interior: only float64 rounding remains (tolerance 1e-9 absolute).
    assert np.ptp(expected) > 0.5  # the field really varies
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(det[inner], expected[inner], rtol=0, atol=1e-9)


def test_jacobian_zero_displacement_is_exactly_one_and_float32_kept():
    grid = _oblique_grid()
    det = metrics.jacobian_determinant(torch.zeros(3, *grid.shape), grid)
    assert det.dtype == torch.float32
    assert torch.equal(det, torch.ones(grid.shape))


def test_jacobian_slabs_match_single_pass(monkeypatch):
    grid = _oblique_grid()
    x, y, z = _physical_positions(grid)
    d = torch.from_numpy(np.stack([np.sin(0.2 * y), 0.1 * np.cos(0.3 * x * z), 0.05 * x * y]))
    whole = metrics.jacobian_determinant(d, grid)
    monkeypatch.setattr(metrics, "_SLAB_VOXELS", 1)  # one array slice per slab
    sliced = metrics.jacobian_determinant(d, grid)
    torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-12)
    assert whole.std() > 0.01


def test_jacobian_physical_matches_voxel_on_unit_grid():
    shape = (5, 6, 7)
    grid = geometry.Grid(size=tuple(reversed(shape)), spacing=(1.0, 1.0, 1.0),
                         origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    u = torch.randn(1, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # Physical channels are (x, y, z) = array axes reversed.
    phys = metrics.jacobian_determinant(u[0].flip(0), grid)
    vox = metrics.jacobian_determinant_voxel(u)[0]
    torch.testing.assert_close(phys, vox, rtol=0, atol=1e-12)


def test_jacobian_bad_shape():
    grid = _oblique_grid()
    with pytest.raises(ValueError, match="jacobian_determinant"):
        metrics.jacobian_determinant(torch.zeros(3, 9, 6, 8), grid)
    with pytest.raises(ValueError, match="jacobian_determinant"):
        metrics.jacobian_determinant(torch.zeros(2, *grid.shape), grid)


def _voxel_coords(shape):
    axes = [torch.arange(s, dtype=torch.float64) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


@pytest.mark.parametrize("shape", [(6, 7), (5, 6, 7)])
def test_jacobian_voxel_affine_zero_and_folding(shape):
    n = len(shape)
    p = _voxel_coords(shape)
    mats = [AFFINE[:n, :n], 2.0 * np.eye(n) + 0.1]
    u = torch.stack([torch.einsum("ab,b...->a...", torch.from_numpy(m - np.eye(n)), p)
                     for m in mats])
    det = metrics.jacobian_determinant_voxel(u)
    assert det.shape == (2, *shape)
    for b, m in enumerate(mats):
        torch.testing.assert_close(det[b], torch.full(shape, float(np.linalg.det(m)),
                                                      dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(metrics.jacobian_determinant_voxel(torch.zeros(1, n, *shape)),
                       torch.ones(1, *shape))
    flip = torch.zeros(1, n, *shape, dtype=torch.float64)
    flip[0, 0] = -2.0 * p[0]  # k -> -k: det -1 everywhere
    det = metrics.jacobian_determinant_voxel(flip)
    assert torch.equal(det, -torch.ones(1, *shape, dtype=torch.float64))
    assert qa.folding_fraction(det) == 1.0


def test_jacobian_voxel_bad_shape():
    with pytest.raises(ValueError, match="jacobian_determinant_voxel"):
        metrics.jacobian_determinant_voxel(torch.zeros(1, 2, 4, 4, 4))


def test_folding_fraction_and_mask():
    det = torch.tensor([[-1.0, 0.0], [0.5, 2.0]])
    assert qa.folding_fraction(det) == 0.5
    assert qa.folding_fraction(det.numpy()) == 0.5
    mask = np.array([[True, False], [True, True]])
    assert qa.folding_fraction(det, mask) == pytest.approx(1 / 3)
    assert math.isnan(qa.folding_fraction(det, np.zeros((2, 2), bool)))
    with pytest.raises(ValueError, match="folding_fraction.*mask"):
        qa.folding_fraction(det, np.ones((3, 2), bool))


def test_sdlogj_values_clip_and_mask():
    det = np.exp(np.array([-1.0, 1.0, -1.0, 1.0]))
    assert qa.sdlogj(det) == pytest.approx(1.0, abs=1e-12)
    # Non-positive det clipped to 1e-9: std of (log 1e-9, 0) = -log(1e-9) / 2.
    assert qa.sdlogj(torch.tensor([-5.0, 1.0])) == pytest.approx(-math.log(1e-9) / 2,
                                                                      rel=1e-9)
    assert qa.sdlogj(np.array([0.0, 1.0])) == pytest.approx(-math.log(1e-9) / 2, rel=1e-9)
    det2 = np.array([math.e, 1 / math.e, 100.0])
    assert qa.sdlogj(det2, np.array([True, True, False])) == pytest.approx(1.0, abs=1e-12)
    assert qa.sdlogj(np.ones((3, 3))) == 0.0


def test_jacobian_summary():
    det = torch.tensor([-0.5, 0.5, 1.0, 2.0])
    s = qa.jacobian_summary(det)
    assert set(s) == {"folding_percent", "sdlogj", "jacobian_min", "jacobian_max"}
    assert all(type(v) is float for v in s.values())
    assert s["folding_percent"] == 25.0
    assert s["jacobian_min"] == -0.5 and s["jacobian_max"] == 2.0
    assert s["sdlogj"] == pytest.approx(qa.sdlogj(det))
    m = qa.jacobian_summary(det, np.array([False, True, True, False]))
    assert m["folding_percent"] == 0.0 and m["jacobian_min"] == 0.5 and m["jacobian_max"] == 1.0
    assert m["sdlogj"] == pytest.approx(math.log(2) / 2, abs=1e-12)


def _dice_pair():
    a = np.zeros((2, 3, 4), np.int16)
    b = np.zeros((2, 3, 4), np.int16)
    a[0, 0, :] = 1        # label 1: 4 voxels
    b[0, 0, 2:] = 1       # 2 shared ...
    b[1, 0, :2] = 1       # ... + 2 others -> Dice 0.5
    a[0, 2, :2] = 2       # label 2 only in a -> 0
    b[1, 2, 3] = 3        # label 3 only in b -> 0
    a[1, 1, 1:] = 4
    b[1, 1, 1:] = 4       # identical -> 1
    return a, b


def test_dice_known_overlaps():
    a, b = _dice_pair()
    d = qa.dice(a, b)
    assert d == {1: 0.5, 2: 0.0, 3: 0.0, 4: 1.0}
    assert all(type(v) is float for v in d.values())
    sel = qa.dice(a, b, values=(4, 1, 9))
    assert list(sel) == [4, 1, 9]
    assert sel[4] == 1.0 and sel[1] == 0.5 and math.isnan(sel[9])
    assert qa.dice(a, a) == {1: 1.0, 2: 1.0, 4: 1.0}
    # Large and negative label values take the np.unique path: same answer.
    big = qa.dice(a.astype(np.int64) + 70000, b.astype(np.int64) + 70000,
                       values=(70001, 70004, 70000))
    assert big[70001] == 0.5 and big[70004] == 1.0
    neg = qa.dice(-a.astype(np.int32), -b.astype(np.int32), values=(-1, -2))
    assert neg == {-1: 0.5, -2: 0.0}


def test_dice_bad_inputs():
    a, b = _dice_pair()
    with pytest.raises(ValueError, match="dice.*integer"):
        qa.dice(a.astype(float), b)
    with pytest.raises(ValueError, match="dice.*same shape"):
        qa.dice(a, b[:1])


def _box(shape, lo, hi, value=5):
    out = np.zeros(shape, np.int32)
    out[tuple(slice(low, high) for low, high in zip(lo, hi))] = value
    return out


SPACING = (2.5, 1.0, 0.7)  # array order (k, j, i), all different


@pytest.mark.parametrize("axis, s", [(0, 3), (1, 2), (2, 4)])
def test_hd95_of_shifted_boxes(axis, s):
    shape = (20, 22, 24)
    lo, hi = [5, 4, 6], [11, 14, 16]
    a = _box(shape, lo, hi)
    lo2, hi2 = list(lo), list(hi)
    lo2[axis] += s
    hi2[axis] += s
    b = _box(shape, lo2, hi2)
    # The whole face perpendicular to the shift (>= 5 % of the surface) sits exactly s voxels from
    # the other box's face and nothing is farther: HD95 = s * spacing[axis] (to 1e-9 mm).
    expected = s * SPACING[axis]
    assert metrics.hd95(a, b, 5, SPACING) == pytest.approx(expected, abs=1e-9)
    assert metrics.hd95(b, a, 5, SPACING) == pytest.approx(expected, abs=1e-9)
    grid = geometry.Grid(size=tuple(reversed(shape)), spacing=tuple(reversed(SPACING)),
                         origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    assert metrics.hd95(a, b, 5, grid) == pytest.approx(expected, abs=1e-9)


def test_hd95_is_symmetric_max_of_directed():
    shape = (20, 22, 24)
    inner = _box(shape, (5, 4, 6), (11, 14, 16))
    outer = _box(shape, (5, 4, 6), (14, 14, 16))  # inner extended by 3 slices along k
    # outer -> inner: outer's top face is exactly 3 * 2.5 mm from inner's, nothing farther;
    # inner -> outer is at most 4 * 0.7 mm (to outer's side faces): the max is 7.5 either way.
    assert metrics.hd95(inner, outer, 5, SPACING) == pytest.approx(7.5, abs=1e-9)
    assert metrics.hd95(outer, inner, 5, SPACING) == pytest.approx(7.5, abs=1e-9)


def test_hd95_identical_empty_border_and_bad_spacing():
    shape = (10, 12, 14)
    a = _box(shape, (2, 3, 4), (7, 9, 10))
    assert metrics.hd95(a, a, 5, SPACING) == 0.0
    assert math.isnan(metrics.hd95(a, np.zeros_like(a), 5, SPACING))
    assert math.isnan(metrics.hd95(a, a, 7, SPACING))
    # Slabs touching the array border on k and j, shifted by 2 along i.
    slab_a = _box(shape, (0, 0, 2), (10, 12, 8))
    slab_b = _box(shape, (0, 0, 4), (10, 12, 10))
    assert metrics.hd95(slab_a, slab_b, 5, SPACING) == pytest.approx(2 * 0.7, abs=1e-9)
    # The array border counts as outside: a structure filling k has its k = 19 face as surface,
    # 3 slices (7.5 mm) above the other's top face (without that face P95 would be smaller).
    full = _box((20, 12, 14), (0, 3, 4), (20, 9, 10))
    short = _box((20, 12, 14), (0, 3, 4), (17, 9, 10))
    assert metrics.hd95(full, short, 5, SPACING) == pytest.approx(7.5, abs=1e-9)
    with pytest.raises(ValueError, match="hd95.*spacing"):
        metrics.hd95(a, a, 5, (1.0, 1.0))
    with pytest.raises(ValueError, match="hd95.*same shape"):
        metrics.hd95(a, a[:5], 5, SPACING)


def test_standard_30_labels():
    labels = qa.STANDARD_30_LABELS
    assert len(labels) == 30 and len(set(labels)) == 30
    assert list(labels) == sorted(labels)
    assert labels[0] == 2 and labels[-1] == 63 and 0 not in labels
