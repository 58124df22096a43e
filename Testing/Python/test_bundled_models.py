"""The bundled models and the demo: listed with cards, loadable, better than identity."""
import json

import pytest

from EOIRRegistrationLib import cli, modelfile


def test_the_default_model_is_bundled_with_a_complete_card():
    infos = modelfile.list_bundled_models()
    assert infos and infos[0].name == modelfile.DEFAULT_MODEL
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
    assert cli.models_main([]) == 0
    out = capsys.readouterr().out
    assert f"{modelfile.DEFAULT_MODEL} (default)" in out and "working spacing" in out


def test_demo_recovers_the_known_deformation_better_than_identity(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.demo_main(["--output-dir", str(out), "--threads", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    rec = report["demo_recovery"]
    assert rec["mean_error_mm"] < 0.85 * rec["identity_mean_error_mm"], rec
    assert report["dice"]["mean_after"] > report["dice"]["mean_before"] + 0.05, report["dice"]
    assert report["quality"]["folding_percent"] < 0.05
    assert (out / "overview.png").stat().st_size > 50_000
    assert (out / "sample" / "true_displacement.nii.gz").exists()
