"""Tests of EOIRRegistrationLib.core.losses against closed-form / brute-force expectations."""
import itertools

import numpy as np
import pytest
import torch

from EOIRRegistrationLib.core import losses


def _smooth_random(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64)


def _lncc_bruteforce(f, w, window, eps):
    """Explicit-window NCC (centred sums, zero padding outside), numpy, one channel."""
    r = window // 2
    fp, wp = np.pad(f, r), np.pad(w, r)
    cc = np.empty(f.shape)
    for p in itertools.product(*(range(s) for s in f.shape)):
        sl = tuple(slice(q, q + window) for q in p)
        a, b = fp[sl].ravel(), wp[sl].ravel()
        a, b = a - a.mean(), b - b.mean()
        cc[p] = (a @ b) ** 2 / ((a @ a) * (b @ b) + eps)
    return -cc.mean()


@pytest.mark.parametrize("shape, window", [((7, 9), 3), ((5, 6, 7), 3), ((6, 6, 6), 5)])
def test_lncc_matches_bruteforce(shape, window):
    f = _smooth_random(shape, 1).numpy()
    w = (0.5 * f + _smooth_random(shape, 2).numpy())
    got = losses.lncc_loss(torch.from_numpy(f)[None, None], torch.from_numpy(w)[None, None],
                           window=window, eps=1e-5)
    assert got.dim() == 0
    assert float(got) == pytest.approx(_lncc_bruteforce(f, w, window, 1e-5), abs=1e-10)


@pytest.mark.parametrize("shape", [(1, 1, 16, 16), (2, 1, 12, 12, 12)])
def test_lncc_identical_is_minus_one_and_shift_is_worse(shape):
    f = _smooth_random(shape).float()
    same = losses.lncc_loss(f, f, window=5)
    assert float(same) == pytest.approx(-1.0, abs=1e-4)
    # Scaled and negated copies are locally linearly related: still -1 (cc is squared).
    assert float(losses.lncc_loss(f, 3.0 * f, window=5)) == pytest.approx(-1.0, abs=1e-4)
    assert float(losses.lncc_loss(f, -f, window=5)) == pytest.approx(-1.0, abs=1e-4)
    shifted = torch.roll(f, shifts=2, dims=-1)
    worse = losses.lncc_loss(f, shifted, window=5)
    assert -1.0 <= float(worse) <= 0.0
    assert float(worse) > float(same) + 0.5


def test_lncc_constant_image_gives_zero():
    # Zero is constant in every window, padding included: no correlation, loss exactly 0.
    g = _smooth_random((1, 1, 9, 9)).float()
    assert float(losses.lncc_loss(torch.zeros(1, 1, 9, 9), g, window=3)) == 0.0


def test_lncc_gradient_flows_and_is_correct():
    f = _smooth_random((1, 1, 5, 6), 3)
    w = _smooth_random((1, 1, 5, 6), 4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: losses.lncc_loss(f, x, window=3), (w,))
    loss = losses.lncc_loss(f, w, window=3)
    loss.backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    # A small step against the gradient lowers the loss.
    with torch.no_grad():
        stepped = losses.lncc_loss(f, w - 1e-2 * w.grad / w.grad.norm(), window=3)
    assert float(stepped) < float(loss.detach())


def test_lncc_multichannel_is_mean_of_channels():
    f = _smooth_random((1, 2, 8, 8), 5)
    w = _smooth_random((1, 2, 8, 8), 6)
    both = losses.lncc_loss(f, w, window=3)
    each = [losses.lncc_loss(f[:, c:c + 1], w[:, c:c + 1], window=3) for c in range(2)]
    assert float(both) == pytest.approx(float(sum(each)) / 2, abs=1e-12)


def test_lncc_bad_inputs():
    a = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="lncc_loss.*same shape"):
        losses.lncc_loss(a, torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="lncc_loss"):
        losses.lncc_loss(torch.zeros(8, 8), torch.zeros(8, 8))
    with pytest.raises(ValueError, match="lncc_loss.*odd"):
        losses.lncc_loss(a, a, window=4)


def test_mse():
    f = _smooth_random((2, 1, 6, 6, 6))
    assert float(losses.mse_loss(f, f)) == 0.0
    assert float(losses.mse_loss(f, f + 0.25)) == pytest.approx(0.0625, abs=1e-12)
    with pytest.raises(ValueError, match="mse_loss"):
        losses.mse_loss(f, f[:, :, :5])


def _axis_coord(shape, axis, dtype=torch.float64):
    idx = torch.arange(shape[axis], dtype=dtype)
    view = [1] * len(shape)
    view[axis] = -1
    return idx.view(view).expand(*shape)


def test_diffusion_of_linear_fields():
    s = (6, 7, 8)
    a, b = 0.5, -2.0
    field = torch.zeros(1, 3, *s, dtype=torch.float64)
    field[0, 0] = a * _axis_coord(s, 0)
    # Only axis 0 differences are non-zero: channel 0 = a -> per-axis mean a^2/3, mean of 3 axes.
    assert float(losses.diffusion_loss(field)) == pytest.approx(a * a / 9, rel=1e-12)
    assert float(losses.diffusion_loss(field, "l1")) == pytest.approx(abs(a) / 9, rel=1e-12)
    field[0, 2] = b * _axis_coord(s, 2)
    assert float(losses.diffusion_loss(field)) == pytest.approx((a * a + b * b) / 9, rel=1e-12)
    # 2D: two channels, two axes.
    f2 = torch.zeros(1, 2, 5, 6, dtype=torch.float64)
    f2[0, 1] = a * _axis_coord((5, 6), 1)
    assert float(losses.diffusion_loss(f2)) == pytest.approx(a * a / 4, rel=1e-12)
    # A constant (translation) field costs nothing.
    assert float(losses.diffusion_loss(torch.full((1, 3, 4, 4, 4), 3.0))) == 0.0


def test_diffusion_bad_inputs():
    with pytest.raises(ValueError, match="diffusion_loss.*penalty"):
        losses.diffusion_loss(torch.zeros(1, 2, 4, 4), penalty="l3")
    with pytest.raises(ValueError, match="diffusion_loss"):
        losses.diffusion_loss(torch.zeros(4, 4))


@pytest.mark.parametrize("shape", [(7, 8), (5, 6, 7)])
def test_bending_energy_of_quadratics(shape):
    for axis in range(len(shape)):
        x = _axis_coord(shape, axis)
        field = (x ** 2)[None, None]
        # MONAI's golden value: f = x^2 has bending energy 4 on the interior.
        assert float(losses.bending_energy(field)) == pytest.approx(4.0, rel=1e-12)
        # Linear fields are not bent.
        assert float(losses.bending_energy((3 * x + 1)[None, None])) == pytest.approx(0.0, abs=1e-12)
    # Multi-channel (MONAI's 3-channel test): every channel x^2 -> still 4 (mean over channels).
    n = len(shape)
    field = (_axis_coord(shape, n - 1) ** 2)[None, None].repeat(1, n, *([1] * n))
    assert float(losses.bending_energy(field)) == pytest.approx(4.0, rel=1e-12)


def test_bending_energy_cross_term_counted_twice():
    s = (6, 7)
    xy = (_axis_coord(s, 0) * _axis_coord(s, 1))[None, None]
    assert float(losses.bending_energy(xy)) == pytest.approx(2.0, rel=1e-12)
    s3 = (5, 6, 7)
    xz = (_axis_coord(s3, 0) * _axis_coord(s3, 2))[None, None]
    assert float(losses.bending_energy(xz)) == pytest.approx(2.0, rel=1e-12)


def test_bending_energy_gradient_and_bad_inputs():
    f = _smooth_random((1, 3, 6, 6, 6)).requires_grad_(True)
    losses.bending_energy(f).backward()
    assert f.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="bending_energy.*5 voxels"):
        losses.bending_energy(torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match="bending_energy"):
        losses.bending_energy(torch.zeros(1, 8, 8))


def test_soft_dice_known_overlaps():
    a = torch.zeros(1, 2, 4, 4)
    b = torch.zeros(1, 2, 4, 4)
    a[0, 0, 0, :] = 1  # 4 voxels
    b[0, 0, 0, 2:] = 1  # 2 of them ...
    b[0, 0, 1, :2] = 1  # ... plus 2 others: Dice 2*2/8 = 0.5
    a[0, 1, 3, :] = 1
    b[0, 1, 3, :] = 1  # identical channel: Dice 1
    assert float(losses.soft_dice_loss(a, b)) == pytest.approx(1 - (0.5 + 1.0) / 2, abs=1e-5)
    assert float(losses.soft_dice_loss(a, a)) == pytest.approx(0.0, abs=1e-7)
    disjoint = torch.zeros(1, 1, 4, 4)
    other = torch.zeros(1, 1, 4, 4)
    disjoint[..., 0, 0] = 1
    other[..., 3, 3] = 1
    assert float(losses.soft_dice_loss(disjoint, other)) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="soft_dice_loss"):
        losses.soft_dice_loss(a, b[:, :1])


def test_one_hot():
    labels = torch.tensor([[0, 3, 7], [7, 5, 3]]).view(1, 1, 2, 3)
    oh = losses.one_hot(labels, (3, 7))
    assert oh.shape == (1, 2, 2, 3) and oh.dtype == torch.float32
    assert torch.equal(oh[0, 0], torch.tensor([[0., 1, 0], [0, 0, 1]]))
    assert torch.equal(oh[0, 1], torch.tensor([[0., 0, 1], [1, 0, 0]]))
    # 3D, label 5 not listed -> zero in every channel.
    lab3 = torch.randint(0, 4, (2, 1, 3, 4, 5))
    oh3 = losses.one_hot(lab3, [0, 1, 2, 3])
    assert torch.equal(oh3.sum(1), torch.ones(2, 3, 4, 5))
    assert torch.equal(oh3.argmax(1), lab3[:, 0])
    with pytest.raises(ValueError, match="one_hot.*integer"):
        losses.one_hot(labels.float(), (3,))
    with pytest.raises(ValueError, match="one_hot.*\\(B, 1, \\*S\\)"):
        losses.one_hot(labels.repeat(1, 2, 1, 1), (3,))


def test_loss_terms_named_tuple():
    t = losses.LossTerms(similarity=torch.tensor(1.0), regularity=torch.tensor(2.0),
                         total=torch.tensor(3.0))
    assert t._fields == ("similarity", "regularity", "total")
    sim, reg, tot = t
    assert float(sim) == 1.0 and float(reg) == 2.0 and float(tot) == 3.0


def test_mind_ssc_ignores_linear_contrast_changes_but_sees_shifts():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 24, 26, 28, generator=g), 3, 1, 1)
    m = losses.mind_ssc(x)
    assert m.shape == (1, 12, 24, 26, 28)
    assert m.min() > 0 and m.max() <= 1 + 1e-6
    # each voxel's closest neighbour pair has distance 0 after subtracting the minimum
    assert torch.allclose(m.max(dim=1).values, torch.ones(1, 24, 26, 28))
    assert torch.allclose(losses.mind_ssc(5.0 * x + 2.0), m, atol=1e-5)
    assert torch.allclose(losses.mind_ssc(1.0 - x), m, atol=1e-5)  # inverted contrast too
    shifted = torch.roll(x, 2, dims=2)
    assert losses.mse_loss(losses.mind_ssc(shifted), m) > 100 * losses.mse_loss(
        losses.mind_ssc(5.0 * x + 2.0), m)
    # the 12 pairs are the edges of length sqrt(2) between the six face neighbours
    assert len(losses._MIND_PAIRS) == 12 and len(set(losses._MIND_PAIRS)) == 12


def test_mind_ssc_refuses_multichannel_or_2d():
    with pytest.raises(ValueError, match="mind_ssc"):
        losses.mind_ssc(torch.rand(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="mind_ssc"):
        losses.mind_ssc(torch.rand(1, 1, 8, 8))
