"""One options object, three front ends, one field: the command line, the Python API and the Slicer
logic given the same ``RegistrationOptions`` on the same oblique, anisotropic pair return the same
displacement (LPS mm on the fixed grid), and the worker's job file carries the options intact."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import rotation

from EOIRRegistrationLib.cli import register as cli_register
from EOIRRegistrationLib.engine.options import RegistrationOptions
from EOIRRegistrationLib.engine.pipeline import register
from EOIRRegistrationLib.engine.refine import RefineConfig
from EOIRRegistrationLib.slicer import bridge
from EOIRRegistrationLib.slicer.logic import RegistrationLogic
from EOIRRegistrationLib.slicer.selftest import syntheticTestPair

OPTIONS = RegistrationOptions(device="cpu", threads=1, working_spacing=(2.5, 2.5, 2.5),
                              initial_alignment="com", contrast="same", refine_iterations=4,
                              refine_similarity="lncc")


def argv_of(options: RegistrationOptions, fixed, moving, out) -> list[str]:
    """The eoir-register command line that asks for ``options`` (every field this test sets)."""
    argv = [str(fixed), str(moving), "--output-dir", str(out), "--quiet", "--no-png",
            "--model", options.model, "--device", options.device, "--init",
            options.initial_alignment, "--contrast", options.contrast]
    if options.threads is not None:
        argv += ["--threads", str(options.threads)]
    if options.working_spacing is not None:
        argv += ["--working-spacing", *map(str, options.working_spacing)]
    if options.refine_iterations is not None:
        argv += ["--refine", str(options.refine_iterations)]
    if options.refine_similarity is not None:
        argv += ["--refine-similarity", options.refine_similarity]
    return argv


@pytest.fixture(scope="module")
def pair():
    """The self-test pair on an oblique grid with anisotropic voxels, as float32."""
    fixed, moving, _, _ = syntheticTestPair(size=32, spacing=2.0)
    images = []
    for image in (fixed, moving):
        image = sitk.Cast(image, sitk.sitkFloat32)
        image.SetSpacing((2.0, 1.6, 2.4))
        image.SetDirection(rotation(0.15, -0.1, 0.2))
        image.SetOrigin((-30.0, -25.0, -35.0))
        images.append(image)
    return images


def test_cli_api_and_slicer_give_the_same_field(pair, tmp_path):
    fixed, moving = pair
    fixed_path, moving_path = tmp_path / "fixed.nrrd", tmp_path / "moving.nrrd"
    sitk.WriteImage(fixed, str(fixed_path))
    sitk.WriteImage(moving, str(moving_path))
    argv = argv_of(OPTIONS, fixed_path, moving_path, tmp_path / "out")
    assert cli_register.options_from_args(cli_register.parser().parse_args(argv)) == OPTIONS

    api = register(fixed, moving, OPTIONS)
    api_field = sitk.GetArrayFromImage(api.displacement)
    assert np.abs(api_field).max() > 0.5  # a real deformation, not the identity

    assert cli_register.main(argv) == 0
    cli_field = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "displacement.nii")))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert RegistrationOptions.from_dict(report["options"]) == OPTIONS
    # the file holds float32 vectors: equal to float32 rounding
    np.testing.assert_allclose(cli_field, api_field, rtol=0, atol=1e-4)

    scene, _app_logic = bridge.createStandaloneScene()
    fixed_node = bridge.imageToVolumeNode(fixed, scene, "fixed")
    moving_node = bridge.imageToVolumeNode(moving, scene, "moving")
    outputs = RegistrationLogic(scene).registerVolumes(fixed_node, moving_node, OPTIONS)
    assert outputs.result.options == OPTIONS
    slicer_field = sitk.GetArrayFromImage(
        bridge.gridTransformNodeToDisplacement(outputs.transformNode))
    # The node's direction comes back from Slicer's matrices 1e-16 off; 33 optimisation steps in
    # float32 carry that to some 1e-5 mm (1.9e-5 measured): not a different field.
    np.testing.assert_allclose(slicer_field, api_field, rtol=0, atol=1e-4)
    # the Jacobian's figures of fields that far apart (2e-7 on its minimum measured)
    assert outputs.result.qa == pytest.approx(api.qa, rel=1e-5, abs=1e-5)


def test_every_front_end_uses_the_engines_default_refinement(tmp_path, monkeypatch):
    """The defaults are defined once (engine/options.py) and the CLI's --help states them; the
    CLI, the Slicer logic and its worker leave the choice to the engine."""
    import inspect

    import SimpleITK as sitk

    from EOIRRegistrationLib.cli import register as register_cli
    from EOIRRegistrationLib.core.errors import InputError
    from EOIRRegistrationLib.engine import pipeline, refine
    from EOIRRegistrationLib.engine.options import RegistrationOptions
    from EOIRRegistrationLib.slicer import logic as slicer_logic
    from EOIRRegistrationLib.slicer import worker as slicer_worker

    help_text = " ".join(register_cli.parser().format_help().split())
    assert "optimisation steps at the finest scale of --preset (default: the preset's)" in help_text
    assert "--preset {fast,default,accurate}" in help_text
    # every front end leaves the steps and the similarity to the engine, which picks them by
    # contrast: the preset's multi-scale schedule on LNCC for one contrast, MIND-SSC for two
    args = register_cli.parser().parse_args(["f", "m", "--output-dir", "o"])
    assert args.refine is None and args.refine_similarity is None
    assert register_cli.options_from_args(args) == RegistrationOptions()
    assert inspect.signature(pipeline.register).parameters["options"].default is None
    assert inspect.signature(
        slicer_logic.RegistrationLogic.registerVolumes).parameters["options"].default is None
    assert refine.config_from_options(RegistrationOptions()) == RefineConfig()
    # the Slicer worker registers with the options of its job file, as given
    seen = []

    def spy_engine(fixed, moving, options, **kwargs):
        seen.append(options)
        raise InputError("stop here")
    monkeypatch.setattr(slicer_worker, "_engine", lambda spec: spy_engine)
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((4, 5, 6)).astype(np.float32))
    for job_options in (RegistrationOptions(), RegistrationOptions(refine_iterations=0),
                        RegistrationOptions(refine_iterations=7, refine_seconds=2.5,
                                            refine_similarity="mind")):
        job_dir = tmp_path / f"job{len(seen)}"
        job_dir.mkdir()
        for name in ("fixed", "moving"):
            sitk.WriteImage(image, str(job_dir / f"{name}.mha"))
        (job_dir / slicer_worker.JOB_FILE).write_text(json.dumps(
            {"options": job_options.to_dict(), "engine": None, "fixed": "fixed.mha",
             "moving": "moving.mha", "labels": None}))
        assert slicer_worker.run(job_dir) == slicer_worker.EXIT_ERROR
        assert seen[-1] == job_options
    assert refine.config_from_options(seen[0]) == RefineConfig()
    assert refine.config_from_options(seen[1]) is None
    # one rule turns every front end's options into the engine's refinement
    assert refine.config_from_options(RegistrationOptions(
        refine_iterations=0, refine_seconds=5.0, refine_similarity="mind")) is None
    assert refine.config_from_options(seen[2]) == RefineConfig(
        iterations=7, time_budget_s=2.5, similarity="mind")
    assert RefineConfig().resolved(same_contrast=True) == RefineConfig(similarity="lncc")
    assert RefineConfig().resolved(same_contrast=False) == RefineConfig(similarity="mind")
    assert RefineConfig(iterations=3, similarity="lncc").resolved(False) == RefineConfig(
        iterations=3, similarity="lncc")  # explicit choices stay
