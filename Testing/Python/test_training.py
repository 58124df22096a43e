"""eoir-train: synthetic and file data, checkpoints, resume, determinism, logs, model card."""
import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from EOIRRegistrationLib.cli import train as train_cli
from EOIRRegistrationLib.engine import modelfile
from EOIRRegistrationLib.training.data import FileSource, entries_from
from EOIRRegistrationLib.training.synthetic import SyntheticConfig, synthetic_pair

TINY = ["--channels", "4", "--levels", "3", "--shape", "32", "32", "32", "--threads", "1",
        "--validation-pairs", "1", "--device", "cpu"]


def train(out, *extra):
    return train_cli.main(["--output-dir", str(out), *TINY, *map(str, extra)])


def test_synthetic_pairs_are_deterministic_and_labelled():
    cfg = SyntheticConfig(shape=(32, 32, 32))
    a = synthetic_pair(cfg, torch.Generator().manual_seed(5))
    b = synthetic_pair(cfg, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["fixed"].min() >= 0 and a["fixed"].max() <= 1
    assert set(torch.unique(a["fixed_labels"]).tolist()) <= set(range(13))
    assert not torch.equal(a["fixed_labels"], a["moving_labels"])  # really deformed


def test_training_writes_log_checkpoint_and_model_card(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--iterations", 4, "--log-every", 2, "--validate-every", 4,
                 "--checkpoint-every", 2, "--name", "tiny-run") == 0
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == [2, 4]
    assert rows[-1]["val_dice_after"] != ""
    loaded = modelfile.load_model(out / "model.pt")
    assert loaded.card["name"] == "tiny-run"
    assert loaded.card["working_spacing_mm"] == [2.0, 2.0, 2.0]
    assert "val_dice_after" in loaded.card["validation"]
    assert loaded.card["intensity_normalization"]["method"] == "percentile"
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 4


def test_resume_continues_exactly_where_a_run_stopped(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ["--log-every", 1, "--validate-every", 100, "--checkpoint-every", 2]
    assert train(straight, "--iterations", 4, *args) == 0
    assert train(split, "--iterations", 2, *args) == 0
    assert train(split, "--iterations", 4, "--resume", *args) == 0
    a = modelfile.load_model(straight / "model.pt").model.state_dict()
    b = modelfile.load_model(split / "model.pt").model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    its = [int(r["iteration"]) for r in csv.DictReader(open(split / "log.csv"))]
    assert its == [1, 2, 3, 4]


def test_a_batch_objective_is_the_mean_of_its_pairs_objectives():
    """What --batch relies on: every term (LNCC, Dice, diffusion) averages over the batch."""
    from EOIRRegistrationLib.models import build_model
    from EOIRRegistrationLib.training.objectives import ObjectiveConfig, eoir_objective
    from EOIRRegistrationLib.training.trainer import _stack

    torch.manual_seed(0)
    model = build_model("eoir", {"channels": 4, "levels": 3})
    for est in model.estimators:
        torch.nn.init.normal_(est.out.weight, std=0.05)
    gen = torch.Generator().manual_seed(1)
    pairs = [synthetic_pair(SyntheticConfig(shape=(32, 32, 32)), gen) for _ in range(2)]
    cfg = ObjectiveConfig(dice_weight=1.0, label_values=tuple(range(1, 13)))

    def total(p):
        return eoir_objective(model, p["fixed"], p["moving"], cfg, p["fixed_labels"],
                              p["moving_labels"]).total.item()

    singles = [total(p) for p in pairs]
    assert abs(singles[0] - singles[1]) > 1e-3  # two different pairs
    assert total(_stack(pairs)) == pytest.approx(np.mean(singles), rel=1e-4)


def test_batch_draws_that_many_pairs_per_step(tmp_path, capsys):
    args = ["--validate-every", 100, "--checkpoint-every", 1]
    assert train(tmp_path / "b2", "--iterations", 1, "--batch", 2, *args) == 0
    assert train(tmp_path / "b1", "--iterations", 2, *args) == 0
    state = {name: torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
             for name in ("b1", "b2")}
    assert torch.equal(state["b1"]["generator_state"], state["b2"]["generator_state"])
    card = modelfile.load_model(tmp_path / "b2" / "model.pt").card
    assert card["training_config"]["batch_size"] == 2
    assert train(tmp_path / "b0", "--iterations", 1, "--batch", 0) == 2
    assert "batch size must be a whole number of at least 1" in capsys.readouterr().err
    assert not (tmp_path / "b0").exists()


@pytest.mark.parametrize("args, message", [
    (["--iterations", -1], "iterations must be a whole number, 0 or more, got -1"),
    (["--validate-every", 0], "validation interval must be a whole number of at least 1"),
    (["--checkpoint-every", 0], "checkpoint interval must be a whole number of at least 1"),
    (["--log-every", 0], "log interval must be a whole number of at least 1"),
    (["--validation-pairs", 0], "validation pairs must be a whole number of at least 1"),
    (["--shape", 30, 32, 32], "training crop [30, 32, 32] (--shape) does not suit the network: "
                              "EOIR: array axis 0 has size 30, not a multiple of 4"),
    (["--working-spacing", 0, 2, 2], "working spacing must be three positive sizes"),
    (["--lr", 0], "learning rate must be positive, got 0.0"),
    (["--reg-weight", -1], "regularization weight must be zero or more, got -1.0"),
    (["--similarity", "none"], "only the Dice and distillation terms train the network"),
])
def test_settings_that_would_fail_part_way_are_refused_before_anything_is_written(
        tmp_path, capsys, args, message):
    # Each of these used to fail after log.csv was written (a zero interval: ZeroDivisionError,
    # the crop: at the first step), or to train nothing and exit 0 (no term but the regularity).
    assert train(tmp_path / "run", "--iterations", 1, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_georeg_refuses_the_dice_only_objective_before_anything_is_written(tmp_path, capsys):
    assert train_cli.main(["--output-dir", str(tmp_path / "run"), "--model", "georeg",
                           "--similarity", "none", "--dice-weight", "1", "--shape", "32", "32", "32",
                           "--iterations", "1", "--device", "cpu"]) == 2
    assert "georeg trains with the similarity lncc or mse, not 'none'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_command_line_defaults_are_the_configurations_defaults():
    from EOIRRegistrationLib.training.objectives import ObjectiveConfig
    from EOIRRegistrationLib.training.trainer import TrainConfig
    args = train_cli.parser().parse_args(["--output-dir", "x"])
    cfg, objective = TrainConfig(output_dir="x"), ObjectiveConfig()
    assert (args.data, args.model, tuple(args.shape), tuple(args.working_spacing)) == (
        cfg.data, cfg.architecture, cfg.shape, cfg.working_spacing_mm)
    assert (args.iterations, args.batch, args.lr, args.seed, args.device, args.name) == (
        cfg.iterations, cfg.batch_size, cfg.learning_rate, cfg.seed, cfg.device, cfg.name)
    assert (args.checkpoint_every, args.validate_every, args.validation_pairs, args.log_every) == (
        cfg.checkpoint_every, cfg.validate_every, cfg.validation_pairs, cfg.log_every)
    assert (args.similarity, args.reg_weight, args.dice_weight) == (
        objective.similarity, objective.regularization_weight, objective.dice_weight)


@pytest.mark.parametrize("spec, message", [
    ("{not json", "is not a readable JSON file"),
    ("[1, 2]", 'a Learn2Reg JSON lists "training"'),
    ({"training": [{"fixed": "imgs/case0.nii.gz"}]}, 'training entry 1 has no "image"'),
    ({"training": [{"image": "imgs/case0.nii.gz", "label": None}]}, 'has a "label" that is not a file'),
    ({"training": [{"image": "imgs/case0.nii.gz"}, {"image": "imgs/gone.nii.gz"}]},
     "1 of the files it lists do not exist, e.g. "),
    ({"training": [{"image": f"imgs/case{i}.nii.gz"} for i in range(2)],
      "training_paired_images": [{"fixed": "imgs/case0.nii.gz"}]}, 'training pair 1 needs "fixed"'),
    ({"training": [{"image": f"imgs/case{i}.nii.gz"} for i in range(2)],
      "training_paired_images": [{"fixed": "imgs/case0.nii.gz", "moving": "imgs/case2.nii.gz"}]},
     'which is not among its "training" images'),  # was dropped silently: random pairs instead
])
def test_a_learn2reg_json_training_would_trip_over_is_refused_before_anything_is_written(
        tmp_path, capsys, spec, message):
    # These raised KeyError or JSONDecodeError, or failed at the first step that read a listed file.
    _write_images(tmp_path / "imgs")
    (tmp_path / "dataset.json").write_text(spec if isinstance(spec, str) else json.dumps(spec))
    assert train(tmp_path / "run", "--data", tmp_path / "dataset.json", "--iterations", 1) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, write, message", [
    ("case9.nii.gz", lambda path: path.write_text("not an image"), "is not an image file ITK can read"),
    ("case9.nii.gz", lambda path: sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(path)),
     "(image) is 2D with 1 components per voxel; training needs 3D scalar volumes"),
    ("case0_seg.nii.gz", lambda path: path.write_bytes(b"\x1f\x8b broken"), "is not an image file"),
])
def test_a_file_in_the_training_folder_that_cannot_train_is_refused_before_anything_is_written(
        tmp_path, capsys, name, write, message):
    # Files were read only when a step drew them: a traceback after log.csv was written.
    _write_images(tmp_path / "imgs")
    write(tmp_path / "imgs" / name)
    assert train(tmp_path / "run", "--data", tmp_path / "imgs", "--iterations", 1) == 2
    err = capsys.readouterr().err
    assert f"training data: {tmp_path / 'imgs' / name}" in err and message in err
    assert not (tmp_path / "run").exists()


def test_a_truncated_nifti_training_image_is_named_when_first_drawn_not_trained_on_as_zeros(
        tmp_path, capsys):
    # ITK's NIfTI reader fills the missing half with zeros, without an error.
    _write_images(tmp_path / "imgs", n=2)  # two images: every pair draws both
    path = tmp_path / "imgs" / "case1.nii"
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "imgs" / "case1.nii.gz")), str(path))
    (tmp_path / "imgs" / "case1.nii.gz").unlink()
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).shape == (24, 28, 20)  # ITK: no error
    assert train(tmp_path / "run", "--data", tmp_path / "imgs", "--iterations", 1) == 2
    err = capsys.readouterr().err
    assert f"training data: {path} is truncated" in err and "then --resume" in err


def test_a_labelmaps_folder_that_is_not_there_or_holds_a_broken_file_is_refused(tmp_path, capsys):
    assert train(tmp_path / "run", "--data", f"labelmaps:{tmp_path / 'nothere'}", "--iterations", 1) == 2
    assert "is not a folder (of label maps" in capsys.readouterr().err  # was FileNotFoundError
    _write_images(tmp_path / "maps")
    (tmp_path / "maps" / "zz.nii.gz").write_text("not an image")  # was ITK's RuntimeError
    assert train(tmp_path / "run", "--data", f"labelmaps:{tmp_path / 'maps'}", "--iterations", 1) == 2
    assert f"labelmaps: {tmp_path / 'maps' / 'zz.nii.gz'} is not an image file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    (tmp_path / "maps" / "zz.nii.gz").unlink()
    cut = tmp_path / "maps" / "zz.nii"  # ITK reads its missing half as label 0, without an error
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "maps" / "case0_seg.nii.gz")), str(cut))
    cut.write_bytes(cut.read_bytes()[:len(cut.read_bytes()) // 2])
    assert train(tmp_path / "run", "--data", f"labelmaps:{tmp_path / 'maps'}", "--iterations", 1) == 2
    assert f"labelmaps: {cut} is truncated" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_batch_keeps_only_the_entries_all_its_pairs_have():
    from EOIRRegistrationLib.training.trainer import _stack

    gen = torch.Generator().manual_seed(2)
    labelled = synthetic_pair(SyntheticConfig(shape=(16, 16, 16)), gen)
    plain = {k: labelled[k] for k in ("fixed", "moving")}
    batch = _stack([labelled, plain])
    assert set(batch) == {"fixed", "moving"} and batch["fixed"].shape == (2, 1, 16, 16, 16)
    assert set(_stack([labelled, labelled])) == set(labelled)


def test_used_folder_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--iterations", 1, "--validate-every", 1) == 0
    assert train(out, "--iterations", 1) == 2
    assert "--resume" in capsys.readouterr().err


def _write_images(folder, n=3):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        lab = np.zeros((24, 28, 20), np.uint8)
        lab[6 + i:16, 8:20 - i, 5:15] = 1
        lab[10:14, 10:14, 8:12] = 2
        img = sitk.GetImageFromArray((lab * 40 + rng.random(lab.shape) * 5).astype(np.float32))
        img.SetSpacing((1.5, 1.5, 1.5))
        seg = sitk.GetImageFromArray(lab)
        seg.CopyInformation(img)
        sitk.WriteImage(img, str(folder / f"case{i}.nii.gz"))
        sitk.WriteImage(seg, str(folder / f"case{i}_seg.nii.gz"))


def test_training_from_a_folder_and_a_learn2reg_json(tmp_path):
    _write_images(tmp_path / "imgs")
    entries, pairs = entries_from(tmp_path / "imgs")
    assert len(entries) == 3 and all("label" in e for e in entries) and pairs == []
    spec = {"training": [{"image": f"imgs/case{i}.nii.gz", "label": f"imgs/case{i}_seg.nii.gz"}
                         for i in range(3)],
            "training_paired_images": [{"fixed": "imgs/case0.nii.gz", "moving": "imgs/case2.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    entries, pairs = entries_from(tmp_path / "dataset.json")
    assert pairs == [(0, 2)]
    src = FileSource(tmp_path / "dataset.json", shape=(16, 16, 16), spacing=(2.0, 2.0, 2.0))
    pair = src.sample(torch.Generator().manual_seed(0))
    assert pair["fixed"].shape == (1, 1, 16, 16, 16)
    assert set(torch.unique(pair["fixed_labels"]).tolist()) == {0, 1, 2}
    out = tmp_path / "run"
    assert train_cli.main(["--output-dir", str(out), "--data", str(tmp_path / "imgs"),
                           "--channels", "4", "--levels", "3", "--shape", "16", "16", "16",
                           "--iterations", "2", "--validate-every", "2", "--validation-pairs", "1",
                           "--dice-weight", "1.0", "--threads", "1"]) == 0
    card = modelfile.load_model(out / "model.pt").card
    assert "3 images" in card["training_data"]
