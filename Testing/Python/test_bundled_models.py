"""The bundled models and the demo: listed with cards, loadable, better than identity."""
import json

import pytest

from EOIRRegistrationLib.cli import demo as demo_cli
from EOIRRegistrationLib.cli import models as models_cli
from EOIRRegistrationLib.engine import modelfile
from EOIRRegistrationLib.engine.options import DEFAULT_MODEL


def test_the_default_model_is_bundled_with_a_complete_card():
    infos = modelfile.list_bundled_models()
    assert infos and infos[0].name == DEFAULT_MODEL
    for info in infos:
        card = info.card
        for key in ("description", "training_data", "working_spacing_mm",
                    "intensity_normalization", "validation"):
            assert card.get(key), (info.name, key)
        sidecar = json.loads(open(info.path[:-3] + ".json").read())
        assert sidecar["name"] == info.name == card["name"]
        loaded = modelfile.resolve_model(info.name)
        assert loaded.architecture == card["architecture"]


def test_models_command_lists_the_default(capsys):
    assert models_cli.main([]) == 0
    out = capsys.readouterr().out
    assert f"{DEFAULT_MODEL} (default)" in out and "working spacing" in out


def test_demo_recovers_the_known_deformation_better_than_identity(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo_cli.main(["--output-dir", str(out), "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    rec = report["demo_recovery"]
    assert rec["mean_error_mm"] < 0.85 * rec["identity_mean_error_mm"], rec
    assert report["dice"]["mean_after"] > report["dice"]["mean_before"] + 0.05, report["dice"]
    assert report["quality"]["folding_percent"] < 0.05
    assert (out / "overview.png").stat().st_size > 50_000
    assert (out / "sample" / "true_displacement.nii.gz").exists()


# Named here, not listed from the folder: a missing model fails its test instead of leaving an
# empty parameter list that pytest skips.
BUNDLED = ("eoir-synth-ns8", "georeg-synth")


def test_the_bundled_models_are_all_installed():
    assert sorted(i.name for i in modelfile.list_bundled_models()) == sorted(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_model_registers_a_phantom_better_than_identity(name):
    import numpy as np
    import SimpleITK as sitk

    from EOIRRegistrationLib.core import qa
    from EOIRRegistrationLib.engine.pipeline import register
    from EOIRRegistrationLib.training.phantom import make_phantom_pair

    pair = make_phantom_pair(seed=5, shape=(48, 48, 48), spacing=(2.0, 2.0, 2.0),
                             rotation=(0, 0, 0), velocity=3.0)
    result = register(pair.fixed, pair.moving, model=name, moving_labels=pair.moving_labels,
                      initial_alignment="none", device="cpu")
    fl = sitk.GetArrayFromImage(pair.fixed_labels)
    values = [int(v) for v in np.unique(fl) if v != 0]
    mean = lambda d: float(np.nanmean(list(d.values())))  # noqa: E731
    before = mean(qa.dice(fl, sitk.GetArrayFromImage(pair.moving_labels), values))
    after = mean(qa.dice(fl, sitk.GetArrayFromImage(result.warped_labels), values))
    assert after > before + 0.05, (name, before, after)
    assert result.qa["folding_percent"] < 0.5
