"""The multi-scale optimisation as a distillation teacher (eoir-train --distill-from optimisation)."""
import torch

from EOIRRegistrationLib.cli import train as train_cli
from EOIRRegistrationLib.core import spatial
from EOIRRegistrationLib.engine import modelfile
from EOIRRegistrationLib.training.optimiser_teacher import OptimisationTeacher


def _blobs(shape, centre_shift=(0.0, 0.0, 0.0)):
    """Smooth blobs (array order), the whole pattern moved by ``centre_shift`` voxels."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    out = torch.zeros(shape)
    for centre, width in (((0.35, 0.4, 0.45), 3.0), ((0.65, 0.55, 0.4), 4.0),
                          ((0.5, 0.3, 0.7), 2.5), ((0.45, 0.7, 0.6), 3.5)):
        r2 = sum((g - c * s - d) ** 2 for g, c, s, d in zip(grids, centre, shape, centre_shift))
        out += torch.exp(-r2 / (2 * width ** 2))
    return out[None, None]


def test_the_teacher_recovers_a_known_shift_in_voxels_of_array_order():
    # anisotropic working spacing (x 1.5, y 2, z 3 mm): voxels, not mm, come back, in array
    # order (channel 0 along array axis 0, which is z)
    shape = (24, 32, 28)
    shift = (1.5, -1.0, 0.0)  # voxels along array axes 0, 1, 2
    fixed = _blobs(shape)
    moving = _blobs(shape, shift)  # moving(p + shift) = fixed(p)
    u = OptimisationTeacher((1.5, 2.0, 3.0))(torch.cat([fixed, fixed]), torch.cat([moving, moving]))
    assert u.shape == (2, 3, *shape)
    inside = fixed[0, 0] > 0.3
    for axis, expected in enumerate(shift):
        assert abs(u[0, axis][inside].mean().item() - expected) < 0.25, (axis, expected)
    torch.testing.assert_close(u[0], u[1])  # each pair of the batch on its own, alike
    before = (moving - fixed).abs().mean()
    after = (spatial.warp(moving, u[:1]) - fixed).abs().mean()
    assert after < 0.3 * before


class _OnePair:
    """A data source that always gives the same blob pair (shifted by 1.5 voxels along array axis
    0): whether training pulls the student towards the teacher's field, without the question
    of how well it generalises from a few pairs."""

    def __init__(self):
        self.pair = {"fixed": _blobs((16, 16, 16)), "moving": _blobs((16, 16, 16), (1.5, 0.0, 0.0))}

    def describe(self):
        return "one blob pair"

    def sample(self, gen):
        return dict(self.pair)


def test_training_pulls_the_student_towards_the_optimisations_field(tmp_path, monkeypatch):
    from EOIRRegistrationLib.training import trainer
    monkeypatch.setattr(trainer, "make_source", lambda cfg: _OnePair())
    common = ["--channels", "4", "--levels", "3", "--shape", "16", "16", "16",
              "--similarity", "none", "--reg-weight", "0", "--lr", "3e-3",
              "--validate-every", "1000", "--validation-pairs", "1", "--threads", "1", "--seed", "3",
              "--distill-from", "optimisation"]
    before, after = tmp_path / "before", tmp_path / "after"
    assert train_cli.main(["--output-dir", str(before), *common, "--iterations", "0"]) == 0
    assert train_cli.main(["--output-dir", str(after), *common, "--iterations", "30"]) == 0
    probe = _OnePair().pair
    target = OptimisationTeacher((2.0, 2.0, 2.0))(probe["fixed"], probe["moving"])

    def gap(path):
        student = modelfile.load_model(path).model
        with torch.no_grad():
            return ((student(probe["fixed"], probe["moving"]) - target) ** 2).sum(1).mean().item()

    assert gap(after / "model.pt") < 0.3 * gap(before / "model.pt")
    card = modelfile.load_model(after / "model.pt").card
    assert card["training_config"]["distill_from"] == "optimisation"


def test_the_optimisation_teacher_is_for_eoir_training_only(tmp_path, capsys):
    assert train_cli.main(["--output-dir", str(tmp_path / "g"), "--model", "georeg",
                           "--iterations", "0", "--distill-from", "optimisation"]) == 2
    assert "implemented for EOIR training" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
