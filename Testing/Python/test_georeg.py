"""GeoReg model: contract, neighbourhood gathering, masking, direction, persistence, training path.

Tiny volumes (<= 16^3) so the whole file runs in seconds on a busy CPU."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from EOIRRegistrationLib.core import spatial
from EOIRRegistrationLib.engine.modelfile import load_model, save_model
from EOIRRegistrationLib.models import ARCHITECTURES, build_model
from EOIRRegistrationLib.models.georeg import (
    GeoReg,
    GeoRegConfig,
    InterpolationStep,
    RefineStep,
    fourier_angles,
    gather_neighbours,
    masked_softmax,
    neighbour_offsets,
    neighbourhood,
)
from EOIRRegistrationLib.training.objectives import OBJECTIVES, ObjectiveConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared busy CPU an oversubscribed OpenMP
    pool makes these tests ~15x slower; restore the setting for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = dict(channels=[4, 8, 8], neighbourhood=[2, 3, 3], iterations=[1, 1, 2],
            fourier_features=8, encoder_blocks=1)


def tiny_model(**over) -> GeoReg:
    torch.manual_seed(0)
    return build_model("georeg", {**TINY, **over})


def smooth_volume(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = spatial.gaussian_blur(torch.rand(1, 1, *shape, generator=gen), 1.5)
    return (x - x.min()) / (x.max() - x.min())


def pair(shape=(16, 16, 16)):
    return smooth_volume(shape, 1), smooth_volume(shape, 2)


def randomise_heads(model):
    """Replace the near-identity init (tiny output layer; constant tau keys, hence uniform
    attention and a zero attention shift) so that steps produce visible, testable displacements."""
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, (RefineStep, InterpolationStep)):
            last = m.head[-1]
            last.weight.data = 0.3 * torch.randn(last.weight.shape, generator=gen)
            last.bias.data = 0.1 * torch.randn(last.bias.shape, generator=gen)
        if isinstance(m, RefineStep):
            c = m.channels
            m.kv_proj.weight.data[:c] = 0.3 * torch.randn(m.kv_proj.weight[:c].shape, generator=gen)
            m.pe_k.weight.data = 0.3 * torch.randn(m.pe_k.weight.shape, generator=gen)
    return model


# -- contract ---------------------------------------------------------------------------------

def test_registered_with_objective():
    assert ARCHITECTURES["georeg"] == (GeoReg, GeoRegConfig)
    assert GeoReg.architecture == "georeg"
    assert "georeg" in OBJECTIVES


def test_config_round_trip_and_validation():
    cfg = GeoRegConfig(**TINY)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert GeoRegConfig(**d) == cfg
    assert tiny_model().config() == cfg.to_dict()
    with pytest.raises(ValueError, match="one entry per level"):
        GeoRegConfig(channels=[4, 8], neighbourhood=[2, 3, 3], iterations=[1, 1])
    with pytest.raises(ValueError, match="coarsest"):
        GeoRegConfig(channels=[4, 8], neighbourhood=[2, 3], iterations=[1, 0])
    with pytest.raises(TypeError):
        build_model("georeg", {"no_such_option": 1})


def test_forward_shape_identity_start_and_size_check():
    model = tiny_model()
    assert model.size_multiple == 4
    fixed, moving = pair()
    with torch.no_grad():
        u = model(torch.cat([fixed, moving]), torch.cat([moving, fixed]))
    assert u.shape == (2, 3, 16, 16, 16) and u.dtype == torch.float32 and u.is_contiguous()
    assert u.abs().max() < 1e-2  # tiny output init: starts near the identity
    with pytest.raises(ValueError, match="multiple of 4"):
        model(torch.zeros(1, 1, 16, 18, 16), torch.zeros(1, 1, 16, 18, 16))
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        model(torch.zeros(1, 2, 16, 16, 16), torch.zeros(1, 2, 16, 16, 16))


def test_state_dict_has_fourier_matrix_and_no_grids():
    model = tiny_model()
    buffers = dict(model.named_buffers())
    assert list(buffers) == ["fourier_matrix"]
    assert "fourier_matrix" in model.state_dict()
    assert model.fourier_matrix.shape == (8, 3)
    params = {name for name, _ in model.named_parameters()}
    assert set(model.state_dict()) == params | {"fourier_matrix"}
    # Deterministic from the stored seed, and different for another seed.
    assert torch.equal(tiny_model().fourier_matrix, model.fourier_matrix)
    assert not torch.equal(tiny_model(fourier_seed=1).fourier_matrix, model.fourier_matrix)


def test_save_load_round_trip_identical(tmp_path):
    model = randomise_heads(tiny_model())
    # Change the matrix after construction: the file must carry it, not regenerate it.
    model.fourier_matrix.mul_(1.5)
    fixed, moving = pair()
    model.eval()
    with torch.no_grad():
        before = model(fixed, moving)
    path = tmp_path / "georeg.pt"
    save_model(path, model, {"name": "tiny-georeg"})
    loaded = load_model(path)
    assert loaded.architecture == "georeg"
    assert torch.equal(loaded.model.fourier_matrix, model.fourier_matrix)
    with torch.no_grad():
        after = loaded.model(fixed, moving)
    assert torch.equal(before, after)
    assert before.abs().max() > 0.1  # the comparison is not between two zero fields


# -- neighbourhoods and gathering ------------------------------------------------------------

def test_neighbour_offsets():
    assert sorted(set(neighbour_offsets(3)[:, 0].tolist())) == [-1, 0, 1]
    assert sorted(set(neighbour_offsets(2)[:, 2].tolist())) == [0, 1]
    assert sorted(set(neighbour_offsets(4)[:, 1].tolist())) == [-1, 0, 1, 2]
    assert neighbour_offsets(5).shape == (125, 3)


def test_gather_equals_unfold_reference_at_grid_points():
    torch.manual_seed(0)
    grid = torch.randn(2, 3, 4, 5, 6)
    shape = grid.shape[2:]
    pos = spatial.identity_grid(shape).reshape(3, -1).t().unsqueeze(0).expand(2, -1, -1)
    index, valid, _ = neighbourhood(pos + 0.2, 3, shape)  # rounds back to the grid points
    flat = grid.movedim(1, -1).reshape(2, -1, 3)
    got = gather_neighbours(flat, index) * valid.unsqueeze(-1)
    # Reference: zero-padded unfold, 3x3x3 patch around every point, C-order over offsets.
    padded = F.pad(grid, (1, 1, 1, 1, 1, 1))
    patches = padded.unfold(2, 3, 1).unfold(3, 3, 1).unfold(4, 3, 1)  # (B, C, D, H, W, 3, 3, 3)
    ref = patches.reshape(2, 3, -1, 27).permute(0, 2, 3, 1)
    ref_valid = F.pad(torch.ones(1, 1, *shape), (1, 1, 1, 1, 1, 1)).unfold(2, 3, 1).unfold(
        3, 3, 1).unfold(4, 3, 1).reshape(1, -1, 27) > 0
    assert torch.equal(valid, ref_valid.expand(2, -1, -1))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_gather_equals_loop_reference_at_continuous_positions(k):
    torch.manual_seed(k)
    shape = (3, 4, 5)
    grid = torch.randn(1, 2, *shape)
    pos = torch.rand(1, 60, 3) * torch.tensor([9.0, 10.0, 11.0]) - 3.0  # many points outside
    index, valid, base = neighbourhood(pos, k, shape)
    got = gather_neighbours(grid.movedim(1, -1).reshape(1, -1, 2), index)
    offs = neighbour_offsets(k).tolist()
    lo, hi = min(o[0] for o in offs), max(o[0] for o in offs)
    for i in range(pos.shape[1]):
        p = pos[0, i].tolist()
        # Round / floor; clamped only where the neighbourhood would miss the grid entirely.
        b = [min(max(math.floor(c + 0.5) if k % 2 else math.floor(c), -hi), s - 1 - lo)
             for c, s in zip(p, shape)]
        assert base[0, i].tolist() == b
        for j, o in enumerate(offs):
            y = [bi + oi for bi, oi in zip(b, o)]
            inside = all(0 <= yi < s for yi, s in zip(y, shape))
            assert bool(valid[0, i, j]) == inside
            if inside:
                assert torch.equal(got[0, i, j], grid[0, :, y[0], y[1], y[2]])
        assert valid[0, i].any()  # every point keeps at least one neighbour


def test_gather_batched_index_offsets():
    flat = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)
    index = torch.tensor([[[0, 4]], [[1, 3]]])
    assert gather_neighbours(flat, index).flatten().tolist() == [0, 4, 6, 8]
    # A batch-1 index (static neighbourhoods) is shared by every batch item.
    assert gather_neighbours(flat, index[:1]).flatten().tolist() == [0, 4, 5, 9]


# -- masking ----------------------------------------------------------------------------------

def test_padded_neighbours_get_exactly_zero_weight():
    logits = torch.tensor([[[0.5, 3.0, -1.0, 8.0]]])
    valid = torch.tensor([[[True, False, True, False]]])
    a = masked_softmax(logits, valid)
    assert a[0, 0, 1] == 0 and a[0, 0, 3] == 0
    ref = torch.softmax(torch.tensor([0.5, -1.0]), 0)
    assert torch.allclose(a[0, 0, [0, 2]], ref)
    # The public code's additive float mask would fail this very check.
    float_mask = torch.softmax(logits + (~valid).float(), dim=-1)
    assert float_mask[0, 0, 3] > 0.5
    with pytest.raises(TypeError):
        masked_softmax(logits, valid.float())


def _naive_attention(step, f, kv_feats, rel, matrix):
    """Reference tau/delta for one point: explicit valid neighbour list, keys/values built with
    their Fourier encoding materialised, softmax over the valid neighbours only."""
    kproj, vproj = step.project_grid(kv_feats).chunk(2, dim=-1)
    k = kproj + step.pe_k(_gamma(rel, matrix))
    v = vproj + step.pe_v(_gamma(rel, matrix))
    q = step.query(f)
    a = torch.softmax((k @ q) * step.scale, dim=0)
    # pe_v has no bias, so a zero encoding aggregate adds nothing: all PE is in v.
    return step.finish(f, a @ v, torch.zeros(2 * matrix.shape[0])), a, v


def _gamma(r, matrix):
    t = fourier_angles(r, matrix)
    return torch.cat([torch.sin(t), torch.cos(t)], dim=-1)


def test_refine_step_equals_naive_reference_near_borders():
    torch.manual_seed(0)
    shape, c, nf = (4, 5, 6), 4, 3
    matrix = torch.randn(nf, 3) * 0.4
    step = RefineStep(c, 3, nf, 2)
    randomise_heads(step)
    feats = torch.randn(1, 4 * 5 * 6, c)
    kv = step.project_grid(feats)
    x = torch.rand(1, 25, 3) * torch.tensor([6.0, 7.0, 8.0]) - 1.0  # borders and outside
    f = torch.randn(1, 25, c)
    with torch.no_grad():
        got = step(f, x, kv, shape, matrix)
        grid = spatial.identity_grid(shape).reshape(3, -1).t()
        for i in range(x.shape[1]):
            b = [min(max(math.floor(v + 0.5), -1), s) for v, s in zip(x[0, i].tolist(), shape)]
            ys = [y for y in (torch.tensor(b) + neighbour_offsets(3)).tolist()
                  if all(0 <= yi < s for yi, s in zip(y, shape))]
            flat_idx = [(y[0] * shape[1] + y[1]) * shape[2] + y[2] for y in ys]
            rel = x[0, i] - grid[flat_idx]
            ref, a, _ = _naive_attention(step, f[0, i], feats[0, flat_idx], rel, matrix)
            # Attention shift: the attention-weighted neighbour offset minus the uniform one.
            offs = torch.tensor(ys, dtype=torch.float32) - torch.tensor(b, dtype=torch.float32)
            ref = ref + ((a - 1.0 / len(ys)).unsqueeze(-1) * offs).sum(0)
            assert torch.allclose(got[0, i], ref, atol=1e-5), (i, got[0, i], ref)


def test_interpolation_step_equals_naive_reference():
    torch.manual_seed(1)
    pshape, cshape, c, cp, nf = (2, 3, 2), (4, 6, 4), 4, 6, 3
    matrix = torch.randn(nf, 3) * 0.4
    step = InterpolationStep(c, cp, 2, nf, 2)
    randomise_heads(step)
    pfeats = torch.randn(1, 12, cp)
    # Far from the origin: the factored encoding must keep float32-accurate differences there.
    ppos = 150.0 + torch.randn(1, 12, 3)
    grid = spatial.identity_grid(cshape).reshape(3, -1).t().unsqueeze(0)
    x_hat = grid + 150.0 + 0.3 * torch.randn(1, grid.shape[1], 3)
    f = torch.randn(1, grid.shape[1], c)
    kv = step.project_grid(pfeats)
    with torch.no_grad():
        got = step(f, x_hat, grid, kv, ppos, pshape, matrix)
        for i in range(grid.shape[1]):
            # Parents: floor((g - 1) / 2) + {0, 1} per axis, the trilinear support.
            lo = [(int(g) - 1) // 2 for g in grid[0, i].tolist()]
            ps = [[lo[0] + a, lo[1] + b, lo[2] + d] for a in (0, 1) for b in (0, 1) for d in (0, 1)]
            ps = [p for p in ps if all(0 <= pi < s for pi, s in zip(p, pshape))]
            idx = [(p[0] * pshape[1] + p[1]) * pshape[2] + p[2] for p in ps]
            rel = x_hat[0, i] - ppos[0, idx]
            ref, _, _ = _naive_attention(step, f[0, i], pfeats[0, idx], rel, matrix)
            assert torch.allclose(got[0, i], ref, atol=1e-5), i


# -- behaviour --------------------------------------------------------------------------------

def test_translation_gives_displacement_of_the_right_sign():
    """moving(x) = fixed(x - s) with s = +2 voxels along array axis 0; warped(p) = moving(p + u)
    equals fixed(p) for u = +s, so training must drive the mean of channel 0 towards +2."""
    big = smooth_volume((20, 16, 16), seed=5)
    fixed, moving = big[:, :, 2:18], big[:, :, 0:16]
    assert torch.equal(moving[:, :, 2:], fixed[:, :, :-2])
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    obj = ObjectiveConfig(windows=(5, 3, 3))
    for _ in range(30):
        terms = OBJECTIVES["georeg"](model, fixed, moving, obj)
        opt.zero_grad()
        terms.total.backward()
        opt.step()
    with torch.no_grad():
        u = model(fixed, moving)[:, :, 3:-3, 3:-3, 3:-3].mean(dim=(0, 2, 3, 4))
    assert u[0] > 1.0, u
    assert u[1].abs() < 0.5 and u[2].abs() < 0.5, u


def test_encoder_features_tell_points_apart():
    """The root cause of the run that did not learn: without normalisation, the encoder features
    of the random initial network were dominated by a spatially constant part (LayerNormed
    features of two random points had cosine similarity 0.7 to 0.93), so the attention could not
    tell the moving-grid neighbours apart. Instance normalisation removes that part."""
    model = tiny_model()
    fixed, _ = pair()
    with torch.no_grad():
        feats = model._encode(fixed)
    gen = torch.Generator().manual_seed(0)
    for f in feats:
        z = F.layer_norm(f.movedim(1, -1), (f.shape[1],)).reshape(-1, f.shape[1])
        cos = F.cosine_similarity(z, z[torch.randperm(z.shape[0], generator=gen)], dim=-1)
        assert cos.mean() < 0.5, (f.shape, cos.mean())


def test_tau_attention_shift_moves_points_to_the_matching_neighbour():
    """The tau displacement contains sum_j (a_j - 1/K) o_j: one key that matches the query
    strongly pulls the point by that neighbour's offset; uniform attention gives exactly 0."""
    torch.manual_seed(0)
    c, shape = 4, (5, 5, 5)
    step = RefineStep(c, 3, 2, 2)
    nn_head = step.head[-1]
    nn_head.weight.data.zero_()
    nn_head.bias.data.zero_()  # only the attention shift remains
    x = torch.tensor([[[2.0, 2.0, 2.0]]])
    f = torch.randn(1, 1, c)
    feats = torch.randn(1, 125, c)
    with torch.no_grad():
        kv = step.project_grid(feats)
        assert step(f, x, kv, shape, torch.zeros(2, 3)).abs().max() == 0  # constant keys
        # Keys that single out grid point (3, 2, 1) = offset (+1, 0, -1) for this query.
        step.kv_proj.weight.data[:c] = 0
        step.kv_proj.bias.data[:c] = 0
        kv = step.project_grid(feats)
        target = (3 * 5 + 2) * 5 + 1
        kv[0, target, :c] = 50.0 * step.query(f)[0, 0] / step.query(f).norm()
        dx = step(f, x, kv, shape, torch.zeros(2, 3))
    assert torch.allclose(dx[0, 0], torch.tensor([1.0, 0.0, -1.0]), atol=0.05), dx


def test_a_few_steps_on_one_pair_register_it():
    """15 Adam steps on one 24^3 synthetic pair must raise the label Dice clearly. The model
    that did not learn (no encoder normalisation, displacement only from the MLP head) went
    0.437 -> 0.442 here; the current one 0.437 -> 0.513."""
    from EOIRRegistrationLib.core import qa
    from EOIRRegistrationLib.training.synthetic import SyntheticConfig, synthetic_pair
    p = synthetic_pair(SyntheticConfig(shape=(24, 24, 24), deformation_scale=4, max_velocity=3.0),
                       torch.Generator().manual_seed(0))
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    obj = ObjectiveConfig(windows=(5, 3, 3))
    values = [int(v) for v in torch.unique(p["fixed_labels"]) if v != 0]

    def dice():
        with torch.no_grad():
            u = model(p["fixed"], p["moving"])
        warped = spatial.warp(p["moving_labels"].float(), u, mode="nearest").long()
        d = qa.dice(p["fixed_labels"][0, 0].numpy(), warped[0, 0].numpy(), values)
        d = [v for v in d.values() if not math.isnan(v)]
        return sum(d) / len(d)

    before = dice()
    for _ in range(15):
        terms = OBJECTIVES["georeg"](model, p["fixed"], p["moving"], obj)
        opt.zero_grad()
        terms.total.backward()
        opt.step()
    assert dice() > before + 0.04, (before, dice())


def test_moving_similarity_replaces_moving_in_the_similarity_only():
    model = tiny_model()
    fixed, moving = pair()
    obj = ObjectiveConfig(windows=(5, 3, 3))
    plain = OBJECTIVES["georeg"](model, fixed, moving, obj)
    same = OBJECTIVES["georeg"](model, fixed, moving, obj, moving_similarity=moving.clone())
    assert torch.equal(plain.total, same.total)
    # The network still sees `moving` (same displacement, same regularity); the similarity
    # compares `fixed` with the given image: with fixed itself it is near perfect.
    other = OBJECTIVES["georeg"](model, fixed, moving, obj, moving_similarity=fixed)
    assert torch.equal(other.regularity, plain.regularity)
    assert other.similarity < plain.similarity - 0.3
    with pytest.raises(ValueError, match="moving_similarity"):
        OBJECTIVES["georeg"](model, fixed, moving, obj, moving_similarity=fixed[:, :, :8])


def test_gradients_reach_every_parameter():
    model = tiny_model()
    fixed, moving = pair()
    terms = OBJECTIVES["georeg"](model, fixed, moving, ObjectiveConfig(windows=(5, 3, 3)))
    assert set(terms._fields) == {"similarity", "regularity", "total"}
    terms.total.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_objective_dice_term_and_tiny_levels():
    model = tiny_model()
    fixed, moving = pair()
    labels_f = (fixed > 0.5).long() + (fixed > 0.7).long()
    labels_m = (moving > 0.5).long() + (moving > 0.7).long()
    plain = OBJECTIVES["georeg"](model, fixed, moving, ObjectiveConfig())  # windows > 4^3 level
    dice = OBJECTIVES["georeg"](model, fixed, moving, ObjectiveConfig(dice_weight=1.0),
                                labels_f, labels_m)
    assert torch.isfinite(plain.total) and torch.isfinite(dice.total)
    assert dice.similarity > plain.similarity  # the (positive) Dice loss was added
    assert torch.equal(dice.regularity, plain.regularity)


def test_layout_chunking_and_checkpointing_do_not_change_results():
    model = randomise_heads(tiny_model())
    fixed, moving = pair()
    with torch.no_grad():
        ref = model(fixed, moving)
        model.cfg.chunk_size = 100  # inference in chunks of 100 points
        assert torch.allclose(model(fixed, moving), ref, atol=1e-5)
        model.cfg.chunk_size = 65536
        cl = model.to(memory_format=torch.channels_last_3d)  # what the trainer does on CPU
        assert torch.allclose(cl(fixed, moving), ref, atol=1e-4)
    obj = ObjectiveConfig(windows=(5, 3, 3))
    grads = []
    for ckpt, recompute, chunk in ((False, False, 65536), (True, False, 1000), (False, True, 1000)):
        model.zero_grad()
        model.cfg.checkpointing, model.cfg.chunk_size = ckpt, chunk
        model.cfg.recompute_neighbours = recompute
        OBJECTIVES["georeg"](model, fixed, moving, obj).total.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for other in grads[1:]:
        for g0, g1 in zip(grads[0], other):
            assert torch.allclose(g0, g1, atol=1e-5, rtol=1e-4)


def test_bf16_path_runs_and_positions_stay_float32():
    """bf16 autocast is enabled on CUDA only; CPU autocast exercises the same code path here."""
    model = randomise_heads(tiny_model(mixed_precision=True))
    fixed, moving = pair()
    with torch.no_grad():
        ref = model(fixed, moving)  # CPU input: mixed_precision has no effect
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(fixed, moving)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    # Mean error small; the max is looser: bf16 rounding can flip the neighbourhood choice
    # (round/floor) of a point near a cell boundary, a local jump of the attention shift.
    assert (low - ref).abs().mean() < 0.01 * ref.abs().max()
    assert (low - ref).abs().max() < 0.2 * ref.abs().max()


def test_interpolation_only_finest_and_linear_interpolation():
    fixed, moving = pair()
    for over in ({"iterations": [0, 1, 2]}, {"learned_interpolation": False}):
        model = tiny_model(**over)
        outs = model.pyramid_outputs(fixed, moving)
        assert outs[-1].level == 0 and outs[-1].displacement.shape == (1, 3, 16, 16, 16)
    # Interpolation-only finest: the last state is the delta result (step -1).
    assert tiny_model(iterations=[0, 1, 2]).pyramid_outputs(fixed, moving)[-1].step == -1
    linear = tiny_model(learned_interpolation=False)
    assert not any(isinstance(m, InterpolationStep) for m in linear.modules())


def test_eoir_train_cli_smoke(tmp_path):
    from EOIRRegistrationLib.cli.train import main as train_main
    out = tmp_path / "run"
    rc = train_main(["--model", "georeg", "--model-config", json.dumps(TINY), "--shape", "16",
                     "16", "16", "--iterations", "2", "--validate-every", "2",
                     "--validation-pairs", "1", "--checkpoint-every", "2", "--output-dir",
                     str(out), "--name", "georeg-smoke"])
    assert rc == 0
    loaded = load_model(out / "model.pt")
    assert loaded.architecture == "georeg" and loaded.card["name"] == "georeg-smoke"
    assert loaded.model.config() == GeoRegConfig(**TINY).to_dict()
