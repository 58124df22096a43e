"""EOIR faithfulness (parameter and multiply-add counts from the paper) and model files."""
import os
import pickle

import pytest
import torch

from EOIRRegistrationLib.core.errors import ModelFileError
from EOIRRegistrationLib.engine import modelfile
from EOIRRegistrationLib.models import build_model
from EOIRRegistrationLib.models.complexity import count_multiply_adds, count_parameters


@pytest.mark.parametrize("ns,expected", [(32, 909_232), (16, 294_272), (8, 111_208)])
def test_parameter_counts_match_the_paper(ns, expected):
    assert count_parameters(build_model("eoir", {"channels": ns})) == expected


@pytest.mark.parametrize("ns,giga", [(32, 114.21), (8, 11.02)])
def test_multiply_adds_at_128x128x16_match_the_paper(ns, giga):
    # The paper's ACDC configuration: in-plane-only pyramid on 128x128x16 cine MRI.
    model = build_model("eoir", {"channels": ns, "pyramid_axes": [1, 2]})
    x = torch.zeros(1, 1, 16, 128, 128)
    assert round(count_multiply_adds(model, x, x) / 1e9, 2) == giga


def test_untrained_model_starts_near_identity_with_the_right_shape():
    model = build_model("eoir", {"channels": 4}).eval()
    x = torch.rand(1, 1, 32, 32, 48)
    with torch.no_grad():
        u = model(x, torch.rand_like(x))
    assert u.shape == (1, 3, 32, 32, 48)
    assert u.abs().max() < 0.05


@pytest.mark.parametrize("cfg", [{"composition": "add"}, {"large_kernel": True},
                                 {"finest_level": 1}, {"integration_steps": 0},
                                 {"levels": 3, "pyramid_axes": [1, 2]}])
def test_variants_return_a_full_resolution_field(cfg):
    model = build_model("eoir", {"channels": 4, **cfg}).eval()
    shape = (8, 32, 32) if cfg.get("pyramid_axes") else (32, 32, 32)
    x = torch.rand(1, 1, *shape)
    with torch.no_grad():
        assert model(x, x).shape == (1, 3, *shape)
    levels = model.pyramid_outputs(x, x)
    assert levels[-1].displacement.shape == (1, 3, *shape)


def test_sizes_not_divisible_by_the_pyramid_are_refused():
    model = build_model("eoir", {"channels": 4})
    x = torch.rand(1, 1, 24, 32, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        model(x, x)


def test_unknown_config_is_refused():
    with pytest.raises(ValueError, match="composition"):
        build_model("eoir", {"composition": "multiply"})
    with pytest.raises(KeyError, match="unknown model architecture"):
        build_model("voxelmorph", {})
    with pytest.raises(ValueError, match="input_features"):
        build_model("eoir", {"input_features": "gradient"})


def _with_nonzero_flow(model):
    for est in model.estimators:
        torch.nn.init.normal_(est.out.weight, std=0.05)
    return model.eval()


def test_a_mind_input_model_ignores_affine_intensity_changes_an_intensity_model_does_not():
    """MIND-SSC descriptors are ratios of patch distances: scaling, offsetting or inverting an
    image's intensities leaves them unchanged, so the model's output too (e.g. T1 vs T2-like
    inversions); the paper's intensity input changes."""
    torch.manual_seed(0)
    x = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 32, 32, 32), 3, 1, 1)
    y = torch.roll(x, 2, dims=2)
    inverted = 2.0 - 3.0 * y
    mind = _with_nonzero_flow(build_model("eoir", {"channels": 4, "levels": 3,
                                                   "input_features": "mind"}))
    plain = _with_nonzero_flow(build_model("eoir", {"channels": 4, "levels": 3}))
    with torch.no_grad():
        u, u_inv = mind(x, y), mind(x, inverted)
        assert u.abs().max() > 0.05
        assert torch.allclose(u, u_inv, atol=1e-4 * float(u.abs().max()) + 1e-6)
        p, p_inv = plain(x, y), plain(x, inverted)
        assert (p - p_inv).abs().max() > 0.1 * p.abs().max()


@pytest.fixture
def saved_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("eoir", {"channels": 4, "levels": 3}).eval()
    for est in model.estimators:
        torch.nn.init.normal_(est.out.weight, std=0.02)
    path = tmp_path / "m.pt"
    modelfile.save_model(path, model, {"name": "tiny", "working_spacing_mm": [3.0, 3.0, 3.0]})
    return model, path


def test_model_file_round_trip_gives_identical_outputs(saved_model):
    model, path = saved_model
    loaded = modelfile.load_model(path)
    x, y = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, y), loaded.model(x, y))
    assert loaded.working_spacing == (3.0, 3.0, 3.0)
    payload = torch.load(path, weights_only=True)
    assert not any("grid" in k for k in payload["state_dict"])  # no identity grids stored


def test_corrupt_truncated_and_foreign_files_give_clear_errors(saved_model, tmp_path):
    _, path = saved_model
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ModelFileError, match="not a readable"):
        modelfile.load_model(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ModelFileError, match="not an EOIRRegistration model"):
        modelfile.load_model(foreign)
    with pytest.raises(ModelFileError, match="not found"):
        modelfile.load_model(tmp_path / "missing.pt")
    with pytest.raises(ModelFileError, match="is a folder, not a model file"):
        modelfile.load_model(tmp_path)


def test_mismatched_weights_are_reported(saved_model, tmp_path):
    _, path = saved_model
    payload = torch.load(path, weights_only=True)
    payload["config"]["channels"] = 8
    bad = tmp_path / "mismatch.pt"
    torch.save(payload, bad)
    with pytest.raises(ModelFileError, match="do not match"):
        modelfile.load_model(bad)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_model_files_never_execute_code(tmp_path):
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "code-ran"
    torch.save({"format": modelfile.FORMAT, "payload": _Exploit(str(marker))}, evil,
               pickle_module=pickle)
    with pytest.raises(ModelFileError, match="refused: it holds a reference to posix.mkdir") as err:
        modelfile.load_model(evil)
    assert "weights_only" not in str(err.value) and err.value.__cause__ is None
    assert not marker.exists()
