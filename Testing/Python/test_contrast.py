"""Same or different contrasts: the correlation test and the pipeline's choices from it."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import write_tiny_model

from EOIRRegistrationLib.core.errors import InputError
from EOIRRegistrationLib.engine import contrast, modelfile, optimise
from EOIRRegistrationLib.engine.options import RegistrationOptions
from EOIRRegistrationLib.engine.pipeline import register
from EOIRRegistrationLib.engine.refine import config_from_options
from EOIRRegistrationLib.training.phantom import make_phantom_pair


def _smooth(seed, shape=(24, 20, 16)):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *shape, generator=g), 5, 1, 2)
    return (x - x.min()) / (x.max() - x.min())


def test_correlation_matches_numpy_over_voxels_where_both_have_signal():
    f, m = _smooth(1), _smooth(2)
    m[..., :4] = 0.0  # background in one image only: left out
    both = ((f > contrast.SIGNAL_FLOOR) & (m > contrast.SIGNAL_FLOOR)).numpy()
    expected = np.corrcoef(f.numpy()[both], m.numpy()[both])[0, 1]
    assert contrast.intensity_correlation(f, m) == pytest.approx(expected, abs=1e-9)
    assert np.isnan(contrast.intensity_correlation(f, torch.zeros_like(f)))  # no overlap
    assert np.isnan(contrast.intensity_correlation(f, torch.full_like(f, 0.5)))  # constant


def test_auto_tells_a_rescaled_copy_from_an_inverted_one():
    f = _smooth(3)
    noisy = (0.7 * f + 0.2 + 0.05 * _smooth(4)).clamp(0, 1)
    assert contrast.decide("auto", f, noisy)[0] == "same"
    assert contrast.decide("auto", f, 1.0 - f)[0] == "different"
    assert contrast.decide("auto", f, torch.zeros_like(f)) == ("same", pytest.approx(np.nan,
                                                                                       nan_ok=True))
    # explicit choices are kept, with the figure
    kept, r = contrast.decide("same", f, 1.0 - f)
    assert kept == "same" and r < -0.99
    with pytest.raises(ValueError, match="unknown contrast"):
        contrast.decide("T2", f, f)


@pytest.fixture(scope="module")
def phantom_pairs(tmp_path_factory):
    pair = make_phantom_pair(seed=6, shape=(32, 32, 32), spacing=(2.0, 2.0, 2.0))
    inverted = sitk.InvertIntensity(sitk.Cast(pair.moving, sitk.sitkFloat32), 1000.0)
    inverted = inverted * sitk.Cast(pair.moving_labels > 0, sitk.sitkFloat32)
    model = modelfile.load_model(write_tiny_model(tmp_path_factory.mktemp("m") / "tiny.pt", 0.05))
    return pair, inverted, model


def test_the_pipeline_follows_the_detected_contrast(phantom_pairs):
    pair, inverted, model = phantom_pairs
    same = register(pair.fixed, pair.moving, loaded_model=model, initial_alignment="none",
                    refine_iterations=2)
    assert same.contrast == "same" and not same.network  # the optimisation alone
    assert same.contrast_correlation > contrast.SAME_CONTRAST_MIN_CORRELATION
    assert same.refinement == {"similarity": "lncc", "preset": "default",
                               "scales_mm": list(optimise.PRESETS["default"].scales_mm),
                               "iterations": [*optimise.PRESETS["default"].iterations[:-1], 2]}
    assert "registering" not in same.timings
    other = register(pair.fixed, inverted, loaded_model=model, initial_alignment="none",
                     refine_iterations=2)
    assert other.contrast == "different" and not other.network
    assert other.contrast_correlation < 0
    assert other.refinement["similarity"] == "mind" and "registering" not in other.timings
    assert other.method.startswith("different contrasts (intensity correlation -")
    assert "MIND-SSC optimisation alone at 2/1 mm, 40/2 steps (default)" in other.method


def test_default_schedules_follow_the_path_and_explicit_choices_win(phantom_pairs, monkeypatch):
    pair, inverted, model = phantom_pairs
    schedules = []
    real_optimise = optimise.optimise
    monkeypatch.setattr(optimise, "optimise", lambda *a, **kw: schedules.append(a[3])
                        or real_optimise(*a, **kw))
    same = register(pair.fixed, pair.moving, loaded_model=model, initial_alignment="none")
    other = register(pair.fixed, inverted, loaded_model=model, initial_alignment="none")
    # one contrast: the default preset's LNCC schedule; two: its MIND-SSC schedule
    assert schedules == [optimise.PRESETS["default"], optimise.MIND_PRESETS["default"]]
    assert same.refinement["preset"] == other.refinement["preset"] == "default"
    # the network forced on for the inverted pair: its field starts the MIND-SSC schedule
    r = register(pair.fixed, inverted, loaded_model=model, initial_alignment="none", network=True,
                 preset="fast", refine_iterations=1)
    assert r.network and r.contrast == "different"
    assert schedules[-1] == optimise.schedule_of("fast", 1, "mind")
    # refinement off: "auto" cannot skip the network, whatever it finds
    r = register(pair.fixed, inverted, loaded_model=model, initial_alignment="none",
                 refine_iterations=0)
    assert r.network and r.contrast == "different" and r.refinement is None
    with pytest.raises(InputError, match="the optimisation is the whole registration"):
        register(pair.fixed, pair.moving, loaded_model=model, contrast="different",
                 refine_iterations=0)
    with pytest.raises(InputError, match="unknown contrast"):
        register(pair.fixed, pair.moving, loaded_model=model, contrast="T1")


def test_a_contrast_agnostic_model_keeps_the_network_on_two_contrasts(phantom_pairs, tmp_path):
    """A model whose encoder sees MIND-SSC descriptors registers two contrasts itself: "auto"
    keeps it on the inverted pair, its field the MIND-SSC optimisation's start; --refine 0 is then
    the network alone, not an error."""
    from EOIRRegistrationLib.models import build_model

    pair, inverted, _ = phantom_pairs
    net = build_model("eoir", {"channels": 4, "levels": 3, "input_features": "mind"})
    for est in net.estimators:
        torch.nn.init.normal_(est.out.weight, std=0.05)
    path = tmp_path / "mind.pt"
    modelfile.save_model(path, net, {"name": "mind", "working_spacing_mm": [2.0, 2.0, 2.0]})
    model = modelfile.load_model(path)
    assert model.model.contrast_agnostic
    r = register(pair.fixed, inverted, loaded_model=model, initial_alignment="none",
                 refine_iterations=2)
    assert r.contrast == "different" and r.network and "registering" in r.timings
    assert r.refinement["similarity"] == "mind"
    assert "network + MIND-SSC optimisation at 2/1 mm, 40/2 steps" in r.method
    only = register(pair.fixed, inverted, loaded_model=model, initial_alignment="none",
                    refine_iterations=0, contrast="different")
    assert only.network and only.refinement is None
    assert np.abs(sitk.GetArrayFromImage(only.displacement)).max() > 0.05


@pytest.mark.parametrize("similarity, iterations, contrast_used, agnostic, expected", [
    (None, 0, "same", False, True),          # no optimisation: the network is the registration
    (None, None, "same", False, False),      # one contrast: the multi-scale optimisation alone
    (None, None, "same", True, False),
    ("mind", None, "same", False, False),
    (None, None, "different", False, False),  # a one-contrast network misleads on two
    (None, None, "different", True, True),   # a contrast-agnostic one does not
])
def test_where_the_network_runs_by_default(similarity, iterations, contrast_used, agnostic,
                                            expected):
    options = RegistrationOptions(refine_iterations=iterations, refine_similarity=similarity)
    assert contrast.network_by_default(config_from_options(options), contrast_used,
                                       agnostic) is expected
