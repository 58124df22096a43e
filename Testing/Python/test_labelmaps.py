"""SynthMorph-style label-map pairs: centroid alignment, augmentation, Dice-only training."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from EOIRRegistrationLib.cli import train as train_cli
from EOIRRegistrationLib.core import qa
from EOIRRegistrationLib.engine import modelfile
from EOIRRegistrationLib.training.labelmaps import LabelMapSource, centroid_affine


def phantom_labels(shape=(40, 44, 36)):
    """Blocks with aseg numbers inside a 'skin' shell (label 502)."""
    lab = np.zeros(shape, np.int16)
    lab[4:-4, 4:-4, 4:-4] = 502
    lab[8:-8, 8:-8, 8:-8] = 2
    lab[10:18, 12:22, 10:17] = 4
    lab[10:18, 22:32, 19:26] = 43
    lab[20:30, 12:20, 10:26] = 17
    lab[22:30, 24:34, 12:20] = 53
    lab[12:16, 14:30, 18:20] = 10
    return lab


def write(lab, path, affine_shift=(0, 0, 0), spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(lab.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(tuple(float(s) for s in affine_shift))
    sitk.WriteImage(img, str(path))


def test_centroid_affine_recovers_a_known_shift_and_scale():
    a = phantom_labels()
    b = np.zeros_like(a)
    b[2:, 1:, :-3] = a[:-2, :-1, 3:]  # b(p) = a(p + (-2, -1, 3))
    m = centroid_affine(a, b)  # maps b voxels to a voxels
    assert np.allclose(m[:3, :3], np.eye(3), atol=0.05)
    assert np.allclose(m[:3, 3], [-2, -1, 3], atol=0.3)


def test_centroid_affine_ignores_extra_cerebral_labels_cut_by_the_field_of_view():
    """A map whose head (label 502) is cut off on one side, as the neck is in some SynthSeg maps:
    the brain structures alone fix the affine, so the cut moves nothing."""
    a = phantom_labels()
    b = np.zeros_like(a)
    b[2:, 1:, :-3] = a[:-2, :-1, 3:]
    b[:, 30:, :][b[:, 30:, :] == 502] = 0  # the skin shell beyond row 30 is out of view
    m = centroid_affine(a, b)
    assert np.allclose(m[:3, :3], np.eye(3), atol=0.05)
    assert np.allclose(m[:3, 3], [-2, -1, 3], atol=0.3)


@pytest.fixture
def folder(tmp_path):
    lab = phantom_labels()
    write(lab, tmp_path / "a.nii.gz")
    shifted = np.roll(lab, (3, -2, 4), axis=(0, 1, 2))
    write(shifted, tmp_path / "b.nii.gz", spacing=(1.0, 1.0, 1.0))
    return tmp_path


def test_maps_are_aligned_at_load_and_pairs_are_augmented(folder):
    src = LabelMapSource(folder, shape=(16, 16, 16), spacing=2.0, skull_strip_probability=1.0)
    values = [2, 4, 10, 17, 43, 53]
    aligned = qa.dice(src.maps[0].numpy(), src.maps[1].numpy(), values)
    assert np.nanmean(list(aligned.values())) > 0.9  # the roll is undone by the centroid affine
    pair = src.sample(torch.Generator().manual_seed(3))
    assert pair["fixed"].shape == (1, 1, 16, 16, 16) and pair["fixed"].max() <= 1
    assert (pair["fixed_labels"] < 500).all()  # skull stripped
    again = src.sample(torch.Generator().manual_seed(3))
    assert all(torch.equal(pair[k], again[k]) for k in pair)
    # Independent contrasts: the same label gets different intensities in the two images.
    both = (pair["fixed_labels"] == 2) & (pair["moving_labels"] == 2)
    assert both.sum() > 10
    assert abs(pair["fixed"][both].mean() - pair["moving"][both].mean()) > 1e-3


def test_moving_similarity_is_the_moving_anatomy_in_the_fixed_contrast(folder):
    src = LabelMapSource(folder, shape=(16, 16, 16), spacing=2.0, skull_strip_probability=1.0)
    pair = src.sample(torch.Generator().manual_seed(3))
    target, fl, ml = pair["moving_similarity"], pair["fixed_labels"], pair["moving_labels"]
    assert target.shape == pair["moving"].shape
    # Where both label maps hold the same structure, the target matches the fixed image's
    # contrast (up to blur, bias and noise) far better than the moving image does.
    for value in (2, 17):
        both = (fl == value) & (ml == value)
        assert both.sum() > 5
        err_target = (target[both].mean() - pair["fixed"][both].mean()).abs()
        err_moving = (pair["moving"][both].mean() - pair["fixed"][both].mean()).abs()
        assert err_target < 0.1 and err_target < err_moving
    # ... and it follows the moving anatomy: constant inside each moving structure (no noise).
    inside = ml == 17
    core = torch.nn.functional.max_pool3d((~inside).float(), 3, 1, 1) == 0  # away from edges
    assert core.sum() > 3 and target[core].std() < 0.05


def test_same_contrast_probability_one_gives_both_images_one_contrast(folder):
    src = LabelMapSource(folder, shape=(16, 16, 16), spacing=2.0, skull_strip_probability=1.0,
                         same_contrast_probability=1.0)
    pair = src.sample(torch.Generator().manual_seed(4))
    both = (pair["fixed_labels"] == 2) & (pair["moving_labels"] == 2)
    assert (pair["fixed"][both].mean() - pair["moving"][both].mean()).abs() < 0.1


def test_lncc_training_with_a_contrast_target_and_fine_tuning(folder, tmp_path):
    args = ["--data", f"labelmaps:{folder}", "--channels", "4", "--levels", "3",
            "--shape", "16", "16", "16", "--working-spacing", "2", "2", "2",
            "--dice-weight", "1", "--dice-labels", "standard30", "--iterations", "2",
            "--validate-every", "2", "--validation-pairs", "1", "--threads", "1"]
    first = tmp_path / "first"
    assert train_cli.main(["--output-dir", str(first), *args]) == 0
    tuned = tmp_path / "tuned"
    assert train_cli.main(["--output-dir", str(tuned), *args, "--init-from",
                           str(first / "model.pt"), "--iterations", "0",
                           "--data-options", '{"same_contrast_probability": 0.5}']) == 0
    a = modelfile.load_model(first / "model.pt")
    b = modelfile.load_model(tuned / "model.pt")
    # Zero iterations from the first model: the second starts exactly from its weights.
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    assert b.card["training_config"]["init_from"] == str(first / "model.pt")
    assert b.card["objective"]["label_values"] == list(qa.STANDARD_30_LABELS)


def test_fine_tuning_refuses_another_configuration(folder, tmp_path, capsys):
    first = tmp_path / "first"
    base = ["--data", f"labelmaps:{folder}", "--shape", "16", "16", "16", "--working-spacing",
            "2", "2", "2", "--iterations", "0", "--validation-pairs", "1", "--threads", "1"]
    assert train_cli.main(["--output-dir", str(first), "--channels", "4", "--levels", "3",
                           *base]) == 0
    assert train_cli.main(["--output-dir", str(tmp_path / "b"), "--channels", "6", "--levels",
                           "3", "--init-from", str(first / "model.pt"), *base]) == 2
    assert "that model is eoir" in capsys.readouterr().err


def test_data_options_are_refused_for_other_sources(tmp_path, capsys):
    assert train_cli.main(["--output-dir", str(tmp_path / "r"), "--channels", "4", "--levels",
                           "3", "--shape", "16", "16", "16", "--iterations", "0",
                           "--data-options", '{"same_contrast_probability": 1}']) == 2
    assert "labelmaps: data only" in capsys.readouterr().err


def test_dice_only_training_on_label_maps_runs(folder, tmp_path):
    out = tmp_path / "run"
    assert train_cli.main(["--output-dir", str(out), "--data", f"labelmaps:{folder}",
                           "--channels", "4", "--levels", "3", "--shape", "16", "16", "16",
                           "--working-spacing", "2", "2", "2", "--similarity", "none",
                           "--dice-weight", "1", "--iterations", "2", "--validate-every", "2",
                           "--validation-pairs", "1", "--threads", "1"]) == 0
    assert (out / "model.pt").exists()


def _teacher_file(path, spacing=2.0, seed=0):
    """A small EOIR whose output layers are scaled up so that it predicts a clearly nonzero
    displacement: a teacher worth imitating."""
    from EOIRRegistrationLib.models import build_model
    torch.manual_seed(seed)
    teacher = build_model("eoir", {"channels": 4, "levels": 3})
    with torch.no_grad():
        for est in teacher.estimators:
            torch.nn.init.normal_(est.out.weight, std=0.05)
    modelfile.save_model(path, teacher, {"name": "teacher", "working_spacing_mm": [spacing] * 3})
    return path


def test_distillation_term_is_the_mean_squared_gap_to_the_teacher(folder):
    from EOIRRegistrationLib.models import build_model
    from EOIRRegistrationLib.training.objectives import ObjectiveConfig, eoir_objective
    src = LabelMapSource(folder, shape=(16, 16, 16), spacing=2.0)
    pair = src.sample(torch.Generator().manual_seed(5))
    model = build_model("eoir", {"channels": 4, "levels": 3})
    target = torch.randn(1, 3, 16, 16, 16)
    cfg = ObjectiveConfig(similarity="none", regularization_weight=0.0, distill_weight=2.0)
    terms = eoir_objective(model, pair["fixed"], pair["moving"], cfg, teacher_displacement=target)
    u = model(pair["fixed"], pair["moving"])
    expected = 2.0 * ((u - target) ** 2).sum(dim=1).mean()
    assert torch.allclose(terms.total, expected, rtol=1e-5)
    off = eoir_objective(model, pair["fixed"], pair["moving"],
                         ObjectiveConfig(similarity="none", regularization_weight=0.0),
                         teacher_displacement=target)
    assert off.total.item() == 0.0  # weight 0: no distillation


def test_distillation_pulls_the_student_towards_the_teacher_on_two_contrasts(folder, tmp_path):
    teacher = modelfile.load_model(_teacher_file(tmp_path / "teacher.pt"))
    src = LabelMapSource(folder, shape=(16, 16, 16), spacing=2.0)
    probe = src.sample(torch.Generator().manual_seed(11))  # two independent contrasts
    with torch.no_grad():
        target = teacher.model(probe["fixed"], probe["moving_similarity"])

    def gap(path):
        student = modelfile.load_model(path).model
        with torch.no_grad():
            return ((student(probe["fixed"], probe["moving"]) - target) ** 2).sum(1).mean().item()

    common = ["--data", f"labelmaps:{folder}", "--channels", "4", "--levels", "3",
              "--shape", "16", "16", "16", "--working-spacing", "2", "2", "2",
              "--similarity", "none", "--reg-weight", "0", "--lr", "3e-3",
              "--validate-every", "1000", "--validation-pairs", "1", "--threads", "1",
              "--distill-from", str(tmp_path / "teacher.pt")]
    before, after = tmp_path / "before", tmp_path / "after"
    assert train_cli.main(["--output-dir", str(before), *common, "--iterations", "0"]) == 0
    assert train_cli.main(["--output-dir", str(after), *common, "--iterations", "40"]) == 0
    assert gap(after / "model.pt") < 0.6 * gap(before / "model.pt")
    card = modelfile.load_model(after / "model.pt").card
    assert card["training_config"]["distill_from"] == str(tmp_path / "teacher.pt")
    assert card["objective"]["distill_weight"] == 1.0


def test_distillation_refuses_sources_and_teachers_it_cannot_use(folder, tmp_path, capsys):
    teacher = str(_teacher_file(tmp_path / "teacher.pt"))
    base = ["--channels", "4", "--levels", "3", "--shape", "16", "16", "16", "--iterations", "0",
            "--validation-pairs", "1", "--threads", "1", "--distill-from"]
    assert train_cli.main(["--output-dir", str(tmp_path / "a"), *base, teacher]) == 2
    assert "needs labelmaps: data" in capsys.readouterr().err
    coarse = str(_teacher_file(tmp_path / "coarse.pt", spacing=3.0))
    assert train_cli.main(["--output-dir", str(tmp_path / "b"), "--data", f"labelmaps:{folder}",
                           "--working-spacing", "2", "2", "2", *base, coarse]) == 2
    assert "teacher works at [3.0, 3.0, 3.0] mm" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # refused before anything is written
    assert train_cli.main(["--output-dir", str(tmp_path / "c"), "--data", f"labelmaps:{folder}",
                           *base[:-1], "--distill-weight", "2"]) == 2
    assert "--distill-weight needs --distill-from" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before anything is written


def test_python_api_refuses_a_distillation_weight_without_a_teacher(folder, tmp_path):
    from EOIRRegistrationLib.core.errors import InputError
    from EOIRRegistrationLib.training.trainer import TrainConfig, train
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), data=f"labelmaps:{folder}",
                      model_config={"channels": 4, "levels": 3}, shape=(16, 16, 16),
                      objective={"distill_weight": 1.0}, iterations=0, threads=1)
    with pytest.raises(InputError, match="needs a teacher"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_zero_background_makes_the_unlabelled_voxels_exactly_zero(folder):
    plain = LabelMapSource(folder, shape=(16, 16, 16), spacing=2.0)
    masked = LabelMapSource(folder, shape=(16, 16, 16), spacing=2.0,
                            zero_background_probability=1.0)
    a = plain.sample(torch.Generator().manual_seed(4))
    b = masked.sample(torch.Generator().manual_seed(4))
    background = b["fixed_labels"] == 0
    assert background.any() and (a["fixed"][background] > 0).any()
    assert (b["fixed"][background] == 0).all() and (b["moving"][b["moving_labels"] == 0] == 0).all()
    # the same draw otherwise: the fixed image's labelled voxels are untouched
    assert torch.equal(b["fixed"][~background], a["fixed"][~background])
