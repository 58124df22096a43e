"""engine.options.RegistrationOptions: the defaults, every validation error, the JSON round trip,
and how the command line's flags map onto it."""
import dataclasses
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from EOIRRegistrationLib.cli import register as register_cli
from EOIRRegistrationLib.core.errors import InputError
from EOIRRegistrationLib.engine import options as options_module
from EOIRRegistrationLib.engine.options import RegistrationOptions, options_of

FIELDS = [f.name for f in dataclasses.fields(RegistrationOptions)]


def test_the_defaults():
    options = RegistrationOptions()
    assert dataclasses.asdict(options) == {
        "model": "default", "device": "auto", "threads": None, "working_spacing": None,
        "intensity_window": None, "initial_alignment": "auto", "initial_transform": None,
        "contrast": "auto", "network": None, "preset": "default", "refine_iterations": None,
        "refine_seconds": None, "refine_similarity": None, "inverse": False,
        "foreground_box": True}
    assert options_module.PRESETS == ("fast", "default", "accurate")
    assert options_module.DEFAULT_MODEL == "eoir-synth-ns8"
    assert options.device in options_module.DEVICES
    assert options.initial_alignment in options_module.INITIAL_ALIGNMENTS
    assert options.contrast in options_module.CONTRASTS
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.device = "cpu"
    assert options_of() == options and options_of(None) == options
    assert options_of(options, device="cpu") == RegistrationOptions(device="cpu")
    assert options_of(options) == options


def test_values_are_normalised_to_plain_types():
    matrix = np.eye(4)
    matrix[:3, 3] = (1.0, -2.0, 3.5)
    options = RegistrationOptions(model="  my-model  ", device="CPU", threads=2.0,
                                  working_spacing=2, intensity_window=[[0, 100], [-5, 5]],
                                  initial_alignment="Affine", initial_transform=matrix,
                                  contrast="SAME", refine_iterations=5.0, refine_seconds=3,
                                  refine_similarity="MIND")
    assert options.model == "my-model" and options.device == "cpu" and options.threads == 2
    assert options.working_spacing == (2.0, 2.0, 2.0)
    assert options.intensity_window == ((0.0, 100.0), (-5.0, 5.0))
    assert options.initial_alignment == "affine" and options.contrast == "same"
    assert options.initial_transform == tuple(tuple(row) for row in matrix.tolist())
    assert type(options.initial_transform[0][0]) is float
    assert options.refine_iterations == 5 and type(options.refine_iterations) is int
    assert options.refine_seconds == 3.0 and options.refine_similarity == "mind"
    assert options == RegistrationOptions(model="my-model", device="cpu", threads=2,
                                          working_spacing=(2.0, 2.0, 2.0),
                                          intensity_window=((0.0, 100.0), (-5.0, 5.0)),
                                          initial_alignment="affine",
                                          initial_transform=matrix.tolist(), contrast="same",
                                          refine_iterations=5, refine_seconds=3.0,
                                          refine_similarity="mind")


SINGULAR = np.diag([1.0, 1.0, 0.0, 1.0])
NOT_HOMOGENEOUS = np.eye(4)
NOT_HOMOGENEOUS[3] = (0.0, 0.0, 0.1, 1.0)


@pytest.mark.parametrize("changes, message", [
    ({"device": "gpu"}, r"unknown device 'gpu'; choose one of auto, cpu, cuda"),
    ({"preset": "slow"}, r"unknown preset 'slow'; choose one of fast, default, accurate"),
    ({"device": None}, r"unknown device None"),
    ({"initial_alignment": "bspline"}, r"unknown initial alignment 'bspline'; choose one of "
                                       r"auto, none, com, rigid, affine"),
    ({"contrast": "T1"}, r"unknown contrast 'T1'; choose one of auto, same, different"),
    ({"refine_similarity": "mse"}, r"unknown refinement similarity 'mse'; choose one of lncc, "
                                   r"mind"),
    ({"refine_iterations": -1}, r"refine iterations must be a whole number from 0 to 1000, "
                                r"got -1"),
    ({"refine_iterations": 2.5}, r"refine iterations must be a whole number from 0 to 1000, "
                                 r"got 2\.5"),
    ({"refine_iterations": 1001}, r"refine iterations must be a whole number from 0 to 1000, "
                                  r"got 1001"),
    ({"refine_iterations": "many"}, r"refine iterations must be a number, got 'many'"),
    ({"refine_iterations": True}, r"refine iterations must be a number, got True"),
    ({"refine_seconds": 0}, r"refinement time budget must be a positive number of seconds "
                            r"\(None: no limit\), got 0"),
    ({"refine_seconds": -2.0}, r"refinement time budget must be a positive number of seconds"),
    ({"refine_seconds": math.inf}, r"refinement time budget must be finite"),
    ({"working_spacing": 0}, r"working spacing must be positive \(mm\), got \(0\.0, 0\.0, 0\.0\)"),
    ({"working_spacing": (2.0, -1.0, 2.0)}, r"working spacing must be positive \(mm\), got "
                                            r"\(2\.0, -1\.0, 2\.0\)"),
    ({"working_spacing": math.nan}, r"working spacing must be finite, got nan"),
    ({"working_spacing": (2.0, math.nan, 2.0)}, r"working spacing must be finite, got nan"),
    ({"working_spacing": (2.0, 2.0)}, r"working spacing needs one or three values \(mm, x y z\), "
                                      r"got 2"),
    ({"working_spacing": (1.0, 1.0, 1.0, 1.0)}, r"working spacing needs one or three values"),
    ({"intensity_window": ((0.0, 100.0), (50.0, 50.0))},
     r"the moving intensity window \(50\.0, 50\.0\) is empty: its high bound must exceed its low "
     r"bound"),
    ({"intensity_window": ((100.0, 0.0), (0.0, 1.0))},
     r"the fixed intensity window \(100\.0, 0\.0\) is empty"),
    ({"intensity_window": (0.0, 100.0)}, r"intensity window needs \(\(fixed low, fixed high\), "
                                         r"\(moving low, moving high\)\)"),
    ({"initial_transform": SINGULAR}, r"initial transform is singular \(determinant 0\)"),
    ({"initial_transform": NOT_HOMOGENEOUS}, r"initial transform's last row must be 0 0 0 1, "
                                             r"got \[0\.0, 0\.0, 0\.1, 1\.0\]"),
    ({"initial_transform": np.eye(3)}, r"initial transform must be a 4x4 homogeneous matrix"),
    ({"initial_transform": sitk.AffineTransform(3)}, r"must be a 4x4 homogeneous matrix"),
    ({"network": False, "refine_iterations": 0}, r"without the network the optimisation is the "
                                                 r"whole registration: give it steps"),
    ({"network": "yes"}, r"network must be True, False or None, got 'yes'"),
    ({"inverse": "yes"}, r"inverse must be True or False, got 'yes'"),
    ({"inverse": 1}, r"inverse must be True or False, got 1"),
    ({"foreground_box": "no"}, r"foreground_box must be True or False, got 'no'"),
    ({"threads": 0}, r"threads must be a whole number from 1 to 1024, got 0"),
    ({"model": "  "}, r"the model must be a bundled model name or a model file path"),
])
def test_each_bad_value_is_refused_with_the_reason(changes, message):
    with pytest.raises(InputError, match=message):
        RegistrationOptions(**changes)
    # the same check on a copy and on the keyword convenience
    with pytest.raises(InputError, match=message):
        RegistrationOptions().replace(**changes)
    with pytest.raises(InputError, match=message):
        options_of(None, **changes)


def test_unknown_keys_and_non_mappings_are_refused():
    with pytest.raises(InputError, match=r"unknown registration option\(s\): refine$"):
        RegistrationOptions.from_dict({"refine": 3})
    with pytest.raises(InputError, match=r"unknown registration option\(s\): colour, size"):
        RegistrationOptions.from_dict({**RegistrationOptions().to_dict(), "size": 1,
                                       "colour": "red"})
    with pytest.raises(InputError, match="unknown registration option"):
        RegistrationOptions().replace(refine=3)
    with pytest.raises(InputError, match="unknown registration option"):
        options_of(RegistrationOptions(), iterations=3)
    with pytest.raises(InputError, match="registration options must be a mapping, got list"):
        RegistrationOptions.from_dict([("device", "cpu")])
    with pytest.raises(InputError, match="options must be RegistrationOptions, got dict"):
        options_of({"device": "cpu"})


def _rotation_matrix():
    a = np.eye(4)
    a[:3, :3] = np.reshape(sitk.Euler3DTransform((0, 0, 0), 0.1, -0.2, 0.3).GetMatrix(), (3, 3))
    a[:3, 3] = (12.5, -3.0, 0.1)
    return a


def test_a_fully_non_default_options_object_round_trips_through_json():
    default = RegistrationOptions()
    full = RegistrationOptions(
        model="/models/my model.pt", device="cpu", threads=3, working_spacing=(1.5, 2.0, 2.5),
        intensity_window=((-100.0, 300.0), (0.0, 1200.0)), initial_alignment="rigid",
        initial_transform=_rotation_matrix(), contrast="different", network=True,
        preset="accurate", refine_iterations=25, refine_seconds=12.5, refine_similarity="mind",
        inverse=True, foreground_box=False)
    assert all(getattr(full, name) != getattr(default, name) for name in FIELDS)
    data = full.to_dict()
    assert set(data) == set(FIELDS)
    # plain JSON types: tuples became lists
    assert data["working_spacing"] == [1.5, 2.0, 2.5]
    assert data["intensity_window"] == [[-100.0, 300.0], [0.0, 1200.0]]
    assert data["initial_transform"] == _rotation_matrix().tolist()
    text = json.dumps(data)
    back = RegistrationOptions.from_dict(json.loads(text))
    assert back == full
    assert back.to_dict() == data and json.dumps(back.to_dict()) == text
    assert RegistrationOptions.from_dict(json.loads(json.dumps(default.to_dict()))) == default
    assert RegistrationOptions.from_dict({}) == default
    # a partial mapping changes only what it names
    assert RegistrationOptions.from_dict({"device": "cpu"}) == RegistrationOptions(device="cpu")


def test_the_command_line_defaults_are_the_options_defaults(tmp_path):
    f, m, d = str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), str(tmp_path / "out")
    args = register_cli.parser().parse_args([f, m, "--output-dir", d])
    assert register_cli.options_from_args(args) == RegistrationOptions()


def test_every_option_flag_maps_onto_its_option(tmp_path):
    matrix = np.array([[1.0, 0.25, 0.0], [-0.125, 1.5, 0.0], [0.0, 0.5, 0.75]])
    translation = (10.5, -3.25, 7.0)
    transform = sitk.AffineTransform(matrix.ravel().tolist(), translation, (0.0, 0.0, 0.0))
    tfm = tmp_path / "start.tfm"
    sitk.WriteTransform(transform, str(tfm))
    expected_matrix = np.eye(4)
    expected_matrix[:3, :3], expected_matrix[:3, 3] = matrix, translation
    argv = [str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"),
            "--output-dir", str(tmp_path / "out"), "--moving-labels", "l.nii.gz",
            "--fixed-labels", "fl.nii.gz", "--model", "/models/my.pt", "--device", "cpu",
            "--threads", "3", "--working-spacing", "1.5", "2", "2.5",
            "--intensity-window", "-100", "300", "0", "1200", "--init", "rigid",
            "--initial-transform", str(tfm), "--contrast", "different", "--no-network",
            "--preset", "fast", "--refine", "25", "--refine-seconds", "12.5", "--refine-similarity", "mind",
            "--inverse", "--fixed-mask", "fm.nii.gz", "--moving-mask", "mm.nii.gz",
            "--no-foreground-box", "--no-png", "--overwrite", "--quiet"]
    options = register_cli.options_from_args(register_cli.parser().parse_args(argv))
    expected = RegistrationOptions(
        model="/models/my.pt", device="cpu", threads=3, working_spacing=(1.5, 2.0, 2.5),
        intensity_window=((-100.0, 300.0), (0.0, 1200.0)), initial_alignment="rigid",
        initial_transform=expected_matrix, contrast="different", network=False, preset="fast",
        refine_iterations=25, refine_seconds=12.5, refine_similarity="mind", inverse=True,
        foreground_box=False)
    np.testing.assert_allclose(options.initial_transform, expected_matrix, rtol=0, atol=1e-12)
    assert options.replace(initial_transform=None) == expected.replace(initial_transform=None)
    # the flags only the command has (folders, label maps, output choices) are not options
    assert set(options.to_dict()) == set(FIELDS)
    # --network forces the network on, --no-network off, neither leaves it to the engine
    forced = register_cli.parser().parse_args(argv[:4] + ["--network"])
    assert register_cli.options_from_args(forced).network is True
    assert register_cli.options_from_args(
        register_cli.parser().parse_args(argv[:4])).network is None
    with pytest.raises(SystemExit):
        register_cli.parser().parse_args(argv[:4] + ["--network", "--no-network"])
    # a flag value the options refuse is refused before anything runs
    bad = register_cli.parser().parse_args(argv[:4] + ["--refine", "-3"])
    with pytest.raises(InputError, match="refine iterations must be a whole number"):
        register_cli.options_from_args(bad)
    unreadable = register_cli.parser().parse_args(argv[:4] + ["--initial-transform",
                                                               str(tmp_path / "none.tfm")])
    with pytest.raises(InputError, match="cannot read the initial transform"):
        register_cli.options_from_args(unreadable)
    field = sitk.Image([6, 6, 6], sitk.sitkVectorFloat64, 3)
    sitk.WriteTransform(sitk.DisplacementFieldTransform(field), str(tmp_path / "field.h5"))
    deformable = register_cli.parser().parse_args(argv[:4] + ["--initial-transform",
                                                              str(tmp_path / "field.h5")])
    with pytest.raises(InputError, match="not linear"):
        register_cli.options_from_args(deformable)
