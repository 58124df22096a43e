"""Fault injection on the command line's real path: kill -9 at random moments of the writing
stage, SIGTERM and SIGINT, a full disk (RLIMIT_FSIZE), too little memory (RLIMIT_AS), two runs
into one folder, damaged and unsafe model files.

Each probe runs ``python -m EOIRRegistrationLib register`` in a subprocess on a tiny pair (the
LNCC optimisation alone, --refine 1 or 2, no PNG) and then looks at the output folder: it must
hold the complete previous set or the complete new set of files (compared with reference runs
file by file), with nothing left beside it. ``EOIR_WRITE_DELAY_S`` (cli/outputfolder.py) stretches
the writing stage to a few tenths of a second so that the kills land inside it.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import oblique_image, write_tiny_model

from EOIRRegistrationLib.cli import register as register_cli
from EOIRRegistrationLib.cli.outputfolder import OutputFolder
from EOIRRegistrationLib.cli.written import check_written
from EOIRRegistrationLib.core.errors import OutputError
from EOIRRegistrationLib.engine import modelfile

pytestmark = pytest.mark.skipif(os.name != "posix", reason="signals and resource limits: POSIX")

ENGINE_DIR = Path(__file__).resolve().parents[2] / "EOIRRegistration"
OUTPUTS = {"displacement.nii", "warped.nii.gz", "jacobian.nii", "folding.nii.gz",
           "report.json"}
USER_FILE = "notes.txt"  # the user's own file in the output folder: --overwrite keeps it


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    for name, seed in (("fixed", 1), ("moving", 2)):
        image = oblique_image(size=(20, 16, 12), spacing=(2.0, 2.0, 2.0), seed=seed)
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    write_tiny_model(folder / "tiny.pt", 0.0)
    return folder


def command(pair, out, refine: int, *extra):
    return [sys.executable, "-m", "EOIRRegistrationLib", "register", str(pair / "fixed.nii.gz"),
            str(pair / "moving.nii.gz"), "--output-dir", str(out), "--model",
            str(pair / "tiny.pt"), "--no-network", "--refine", str(refine), "--init", "none",
            "--contrast", "same", "--threads", "1", "--no-png", "--quiet", "--overwrite", *extra]


def environment(delay: float | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ENGINE_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("EOIR_WRITE_DELAY_S", None)
    if delay:
        env["EOIR_WRITE_DELAY_S"] = str(delay)
    return env


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=kwargs.pop("env", environment()), capture_output=True,
                          text=True, timeout=120, **kwargs)


def fingerprint(out: Path) -> dict:
    """What identifies a set: every file's bytes, report.json by the run's options (its
    timings differ from run to run)."""
    prints = {}
    for path in sorted(out.iterdir()):
        if path.name == "report.json":
            prints[path.name] = json.loads(path.read_text())["options"]["refine_iterations"]
        else:
            prints[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return prints


def set_of(out: Path, references: dict) -> str:
    """Which reference set ``out`` holds, whole; fails on a partial or mixed folder."""
    assert out.is_dir(), "the output folder is gone"
    found = fingerprint(out)
    assert set(found) == OUTPUTS | {USER_FILE}, sorted(found)
    for label, reference in references.items():
        if found == reference:
            return label
    raise AssertionError(f"a mixed set: {found} is none of {references}")


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def references(pair, tmp_path_factory):
    """The complete sets of the two runs the probes alternate (--refine 1 and 2)."""
    sets = {}
    for refine in (1, 2):
        out = tmp_path_factory.mktemp("reference") / "out"
        out.mkdir()
        (out / USER_FILE).write_text("user data")
        done = run(command(pair, out, refine))
        assert done.returncode == 0, done.stderr
        sets[refine] = fingerprint(out)
    assert sets[1]["displacement.nii"] != sets[2]["displacement.nii"]
    return sets


def start_set(pair, out: Path, refine: int) -> None:
    out.mkdir()
    (out / USER_FILE).write_text("user data")
    done = run(command(pair, out, refine))
    assert done.returncode == 0, done.stderr


def wait_for_staging(process, out: Path, timeout: float = 60.0) -> bool:
    """True once the process's staging folder exists (it is writing); False if it ended."""
    prefix = f".{out.name}.partial-{process.pid}-"
    end = time.monotonic() + timeout
    while time.monotonic() < end and process.poll() is None:
        if any(p.name.startswith(prefix) for p in out.parent.iterdir()):
            return True
        time.sleep(0.005)
    return False


def test_kill_9_while_writing_leaves_the_old_or_the_new_set(pair, references, tmp_path):
    """20 runs killed (SIGKILL) at random moments of the writing stage, each replacing the set
    the folder holds with the other one: after each kill the folder holds one whole set; each
    run cleans what the killed one before it left; a last run succeeds and leaves nothing."""
    out = tmp_path / "out"
    start_set(pair, out, 1)
    rng = random.Random(0)
    outcomes = {"old": 0, "new": 0}
    for _ in range(20):
        old = set_of(out, references)
        new = 3 - old
        process = subprocess.Popen(command(pair, out, new), env=environment(delay=0.05),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        writing = wait_for_staging(process, out)
        # the writing stage takes about 0.3 s with the delay; some kills come after it ends
        time.sleep(rng.uniform(0.0, 0.45))
        process.kill()
        assert process.wait(timeout=60) in (0, -signal.SIGKILL)
        assert writing or process.returncode == 0
        found = set_of(out, references)
        outcomes["old" if found == old else "new"] += 1
        # the killed run's own leftovers at most: the one before it cleaned the earlier ones
        assert all(name.startswith(f".out.partial-{process.pid}-") or name == ".out.eoir-lock"
                   for name in leftovers(out)), leftovers(out)
    assert outcomes["old"] and outcomes["new"], outcomes
    done = run(command(pair, out, 1))
    assert done.returncode == 0, done.stderr
    assert set_of(out, references) == 1 and leftovers(out) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_while_writing_end_with_one_line_and_change_nothing(
        pair, references, tmp_path, signum):
    out = tmp_path / "out"
    start_set(pair, out, 1)
    process = subprocess.Popen(command(pair, out, 2), env=environment(delay=0.5),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for_staging(process, out)
    time.sleep(0.1)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    assert err.strip().splitlines() == [
        f"eoir-register: interrupted; nothing written ({out} is as it was)"], err
    assert set_of(out, references) == 1 and leftovers(out) == []


def _limit_file_size(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_full_disk_is_a_clear_error_that_changes_nothing(pair, references, tmp_path):
    """RLIMIT_FSIZE makes writes fail as on a full disk; ITK's NIfTI writer then leaves a short
    file without raising (it prints 'wrote only N of M bytes'): the check after writing turns
    that into one clear line, and the folder keeps its set."""
    out = tmp_path / "out"
    start_set(pair, out, 1)
    size = (out / "displacement.nii").stat().st_size
    done = run(command(pair, out, 2), preexec_fn=_limit_file_size(size // 2))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("eoir-register: error: cannot write the outputs:"), done.stderr
    assert "incompletely" in last and f"nothing was changed in {out}" in last
    assert set_of(out, references) == 1 and leftovers(out) == []


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_itk_short_writes_are_caught_by_the_check(tmp_path, suffix):
    """ITK's own short write under RLIMIT_FSIZE (no exception) fails ``check_written``; the same
    image written whole passes."""
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.random((24, 24, 24)).astype(np.float32))  # 55 kB
    whole, short = tmp_path / f"whole{suffix}", tmp_path / f"short{suffix}"
    sitk.WriteImage(image, str(whole))
    check_written(whole)
    script = ("import sys, SimpleITK as sitk; sitk.WriteImage(sitk.ReadImage(sys.argv[1]), "
              "sys.argv[2]); print('no exception')")
    done = run([sys.executable, "-c", script, str(whole), str(short)],
               preexec_fn=_limit_file_size(20_000))
    assert done.returncode == 0 and "no exception" in done.stdout, done.stderr
    assert short.stat().st_size == 20_000
    with pytest.raises(OutputError, match="written incompletely"):
        check_written(short)


def test_a_run_into_a_folder_another_run_holds_is_refused(pair, references, tmp_path):
    out = tmp_path / "out"
    start_set(pair, out, 1)
    with OutputFolder(out, True, OUTPUTS):
        done = run(command(pair, out, 2))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"eoir-register: error: another run (process {os.getpid()}) "
                                   f"is writing to {out}; wait for it to end or choose another "
                                   "output folder")
    assert set_of(out, references) == 1 and leftovers(out) == []


def test_two_concurrent_runs_never_both_write(pair, references, tmp_path):
    """Two runs started together into one folder: one is refused while the other holds it (or,
    if they do not overlap, they run one after the other); the folder holds one whole set."""
    out = tmp_path / "out"
    start_set(pair, out, 1)
    runs = {refine: subprocess.Popen(command(pair, out, refine), env=environment(delay=0.2),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for refine in (1, 2)}
    results = {refine: (p.wait(timeout=120), p.communicate()[1]) for refine, p in runs.items()}
    succeeded = [refine for refine, (code, _) in results.items() if code == 0]
    for code, err in results.values():
        assert code == 0 or (code == 2 and "another run" in err), err
    assert succeeded
    assert set_of(out, references) in succeeded
    assert leftovers(out) == []


def test_a_swap_cut_between_its_renames_is_restored(pair, references, tmp_path, monkeypatch):
    """Where the folders cannot be exchanged in one step (not Linux), the swap is three renames;
    a run killed between them leaves the old set aside (.NAME.old-PID) and no folder: the next
    claim renames it back and deletes dead runs' staging folders."""
    from EOIRRegistrationLib.cli import outputfolder

    out = tmp_path / "out"
    start_set(pair, out, 1)
    dead = 2 ** 22 + 1  # above Linux's largest process id: no such process
    out.rename(tmp_path / f".out.old-{dead}")
    (tmp_path / f".out.partial-{dead}-abc_123").mkdir()
    (tmp_path / ".other.partial-1-abc").mkdir()  # not this folder's: left alone
    with OutputFolder(out, True, OUTPUTS):
        assert set_of(out, references) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-1-abc", "out"]
    # the three-rename swap itself, as it runs where renameat2 is missing
    monkeypatch.setattr(outputfolder, "_exchange", lambda a, b: False)
    with OutputFolder(out, True, OUTPUTS) as folder:
        folder.commit({"report.json": lambda p: Path(p).write_text(
            json.dumps({"options": {"refine_iterations": 7}}))})
    assert fingerprint(out) == {"report.json": 7, USER_FILE: references[1][USER_FILE]}


def test_the_current_folder_is_refused_as_the_output_folder(pair, tmp_path, monkeypatch, capsys):
    """The swap replaces the folder itself: a shell inside it would be left in a deleted one."""
    inside = tmp_path / "work" / "here"
    inside.mkdir(parents=True)
    monkeypatch.chdir(inside)
    for out in (".", ".."):
        assert register_cli.main(command(pair, out, 1)[4:]) == 2
        assert "holds the current folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.joinpath("work").iterdir()) == ["here"]
    assert list(inside.iterdir()) == []


def test_running_out_of_memory_is_a_clear_error(pair, tmp_path):
    """A registration whose working grid (0.05 mm over a 40 x 32 x 24 mm field: 150 million
    voxels) needs more memory than the process may have (RLIMIT_AS: what it holds after the
    imports plus 512 MB) is refused before any work by the estimate (engine/memory.py); with
    the estimate out of the way (its memory reader reporting nothing), torch 2.13's own message
    ("DefaultCPUAllocator: can't allocate memory") becomes one line. Both name
    --working-spacing."""
    script = """
import resource, sys
import torch
from EOIRRegistrationLib.cli import register
from EOIRRegistrationLib.engine import memory
import EOIRRegistrationLib.cli.outputs, EOIRRegistrationLib.engine.pipeline  # imported first
torch.set_num_threads(1)
if sys.argv.pop(1) == "no-estimate":
    memory.available_bytes = lambda: None
size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
            if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + (512 << 20), resource.RLIM_INFINITY))
sys.exit(register.main(sys.argv[1:]))
"""
    out = tmp_path / "out"
    argv = command(pair, out, 1, "--working-spacing", "0.05", "0.05", "0.05")[4:]
    for mode, start in (("estimate", "eoir-register: error: this registration needs about "),
                        ("no-estimate", "eoir-register: error: the computer ran out of memory")):
        done = run([sys.executable, "-c", script, mode, *argv])
        assert done.returncode == 2, done.stderr[-3000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), done.stderr[-3000:]
        assert "--working-spacing" in lines[0]
    assert not out.exists() and leftovers(out) == []


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _model_files(tmp_path) -> tuple[dict, str]:
    """Real damaged, unsafe and mismatched files, with the message each must give."""
    bundled = Path(modelfile.resolve_model("default").path).read_bytes()
    marker = str(tmp_path / "code-ran")
    files = {
        "random.pt": (os.urandom(20_000), "not the zip archive torch.save writes"),
        "truncated.pt": (bundled[:len(bundled) // 2], "not the zip archive torch.save writes"),
    }
    changed = bytearray(bundled)
    changed[len(bundled) // 2:len(bundled) // 2 + 16] = bytes(16)
    files["changed.pt"] = (bytes(changed), "does not match the archive's checksum")
    for name, payload in files.items():
        (tmp_path / name).write_bytes(payload[0])
    messages = {name: message for name, (_, message) in files.items()}
    import torch
    torch.save({"format": modelfile.FORMAT, "format_version": 1, "code": _RunsCode(marker)},
               tmp_path / "unsafe.pt")
    messages["unsafe.pt"] = "refused: it holds a reference to posix.mkdir"
    with open(tmp_path / "unsafe.pkl", "wb") as f:
        pickle.dump({"code": _RunsCode(marker)}, f)
    messages["unsafe.pkl"] = "not the zip archive"
    payload = torch.load(modelfile.resolve_model("default").path, weights_only=True)
    payload["config"]["channels"] = 4
    torch.save(payload, tmp_path / "mismatched.pt")
    messages["mismatched.pt"] = "weights do not match the stored eoir configuration"
    return messages, marker


def test_damaged_unsafe_and_mismatched_model_files_are_clear_errors(pair, tmp_path, capsys):
    """Through eoir-register: one line, exit 2, nothing written, no code run, and never
    torch's advice to load with weights_only=False."""
    messages, marker = _model_files(tmp_path)
    for name, message in messages.items():
        out = tmp_path / "out"
        code = register_cli.main(command(pair, out, 1, "--model", str(tmp_path / name))[4:])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (name, err)
        assert "weights_only" not in err and "Traceback" not in err, err
        assert not out.exists() and not os.path.exists(marker)
