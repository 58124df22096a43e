"""The cohort from Slicer's Python console (``slicer/batch.py``): eoir-batch in a child process,
its options passed as the command's own flags, progress, cancel and resume."""
import time

import numpy as np
from test_batch import write_cohort

from EOIRRegistrationLib.cli import batch as batch_cli
from EOIRRegistrationLib.cli.register import options_from_args
from EOIRRegistrationLib.engine.options import RegistrationOptions
from EOIRRegistrationLib.slicer.batch import batchArguments, runBatch


def test_every_option_reaches_eoir_batch_unchanged(tmp_path):
    matrix = np.eye(4)
    matrix[:3, :3] = [[0.98, -0.17, 0.02], [0.17, 0.97, 0.1], [0.0, -0.1, 1.05]]
    matrix[:3, 3] = [1.5, -2.25, 3.125]
    options = RegistrationOptions(
        model="georeg-synth", device="cpu", threads=3, working_spacing=(1.5, 2.0, 2.5),
        intensity_window=((-100.0, 900.5), (0.0, 255.0)), initial_alignment="rigid",
        initial_transform=matrix.tolist(), contrast="different", network=False,
        preset="accurate", refine_iterations=7, refine_seconds=12.5, refine_similarity="mind")
    args = batch_cli.parser().parse_args(["m.csv", "--output-dir", "out",
                                          *batchArguments(options, tmp_path)])
    back = options_from_args(args)
    np.testing.assert_allclose(back.initial_transform, options.initial_transform, atol=1e-12)
    assert back.replace(initial_transform=None) == options.replace(initial_transform=None)
    defaults = options_from_args(batch_cli.parser().parse_args(
        ["m.csv", "--output-dir", "out", *batchArguments(RegistrationOptions(), tmp_path)]))
    assert defaults == RegistrationOptions()
    for network in (True, False):  # forced on and off travel as --network / --no-network
        forced = RegistrationOptions(network=network)
        assert options_from_args(batch_cli.parser().parse_args(
            ["m.csv", "--output-dir", "out", *batchArguments(forced, tmp_path)])) == forced


def test_a_cancelled_cohort_resumes_with_the_pairs_it_finished(tmp_path):
    ids = write_cohort(tmp_path / "data", 3, labels=False)
    manifest, out = tmp_path / "data" / "manifest.csv", tmp_path / "out"
    fast = dict(initial_alignment="none", network=False, refine_iterations=1, preset="fast",
                workers=1, png=False)
    run = runBatch(manifest, out, **fast)
    assert run.commandLine.startswith("eoir-batch ") and "--no-network" in run.commandLine
    deadline = time.monotonic() + 240
    while run.poll()["done"] < 1:
        assert not run.done and time.monotonic() < deadline, run.output()
        time.sleep(0.05)
    run.cancel()
    assert run.returncode != 0 and not (out / "batch_summary.csv").exists()
    finished = {i for i in ids if (out / i / "report.json").exists()}
    again = runBatch(manifest, out, wait=True, **fast)
    assert again.returncode == 0, again.output()
    assert again.poll()["total"] == len(ids) - len(finished)
    assert {r["id"]: r["status"] for r in again.rows()} == {
        i: "reused" if i in finished else "registered" for i in ids}
    assert "3 of 3 pairs registered" in again.output()
