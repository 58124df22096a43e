"""The README's ways in: the module command from the clone's root as documented, and the Makefile's
choice of environment (a virtual environment's python as it is; any other Python gets .venv/, made
from it, and an existing one made from another Python is refused). The clean-environment
``pip install .`` itself is ``make test-install`` (Testing/check_install.py), run by .ci/run."""
from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_COMMAND = "python -m EOIRRegistrationLib {register,batch,train,models,demo} ..."
BASE_PYTHON = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"


def documented_module_command() -> list[str]:
    """The README's command-line block line that runs the package as a module, as tokens."""
    lines = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
             if MODULE_COMMAND in line]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].split("#")[0])


def run_module(assignments: dict, *args: str) -> subprocess.CompletedProcess:
    """``python -m EOIRRegistrationLib ARGS`` from the root as if the package were not installed:
    ``-S`` skips site-packages' .pth files (where an editable install of this or another clone
    hooks in); the dependencies stay importable, their folders added after the assignments'."""
    import site

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | assignments
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), *site.getsitepackages()]))
    return subprocess.run([sys.executable, "-S", "-m", "EOIRRegistrationLib", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_documented_module_command_runs_the_clone_from_its_root():
    """The README's ``PYTHONPATH=EOIRRegistration python -m EOIRRegistrationLib ...`` from the
    root, with ``models --json``: this clone's package runs (the bundled models it lists lie in
    this clone). Without the assignment the same command finds no package."""
    tokens = documented_module_command()
    python = tokens.index("python")
    assert all("=" in token for token in tokens[:python]), tokens
    assert tokens[python:python + 3] == ["python", "-m", "EOIRRegistrationLib"], tokens
    assignments = dict(token.split("=", 1) for token in tokens[:python])
    run = run_module(assignments, "models", "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    models = json.loads(run.stdout)
    package = ROOT / "EOIRRegistration" / "EOIRRegistrationLib"
    assert models and all(Path(m["path"]).resolve().parent == package / "bundled_models" for m in models)
    bare = run_module({}, "models", "--json")
    assert bare.returncode != 0 and "No module named EOIRRegistrationLib" in bare.stderr, bare.stderr


def make_dry_run(*variables: str) -> subprocess.CompletedProcess:
    # A fresh make, also when the suite itself runs under `make test`: the parent's MAKEFLAGS
    # would pass its PYTHON=... on and make[1] would print "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-n", "test", *variables], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)


def venv_from(python, folder: Path) -> Path:
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    return folder / "bin" / "python"


def commands(run: subprocess.CompletedProcess) -> list[str]:
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def test_make_uses_a_virtual_environments_python_as_it_is(tmp_path):
    python = venv_from(BASE_PYTHON, tmp_path / "env")
    lines = commands(make_dry_run(f"PYTHON={python}", f"VENV={tmp_path / 'unused'}"))
    assert f"{python} -m pip install --quiet -r requirements-dev.txt" in lines
    assert f"{python} -m pytest -q Testing/Python" in lines
    assert not any("-m venv" in line or "unused" in line for line in lines), lines


def test_make_builds_a_virtual_environment_from_any_other_python(tmp_path):
    """A base interpreter (a system Python that PEP 668 closes to pip included) is only used to
    make the environment; everything is installed into and run by that environment."""
    venv = tmp_path / "venv"
    lines = commands(make_dry_run(f"PYTHON={BASE_PYTHON}", f"VENV={venv}"))
    assert lines[0] == f"{BASE_PYTHON} -m venv {venv}", lines
    assert f"{venv}/bin/python -m pip install --quiet -r requirements-dev.txt" in lines
    assert f"{venv}/bin/python -m pytest -q Testing/Python" in lines
    assert not any(line.startswith(f"{BASE_PYTHON} -m pip") for line in lines), lines
    venv_from(BASE_PYTHON, venv)  # made (bin/activate written): used without being made again
    lines = commands(make_dry_run(f"PYTHON={BASE_PYTHON}", f"VENV={venv}"))
    assert not any("-m venv" in line for line in lines) and f"{venv}/bin/python -m ruff check ." in lines


def another_python() -> Path | None:
    """An installed Python other than this one's base (CI has 3.12 and 3.9), or None."""
    here = Path(sys.base_prefix).resolve()
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))
    candidates += filter(None, (shutil.which(f"python3.{minor}") for minor in range(9, 15)))
    for candidate in candidates:
        prefix = subprocess.run([candidate, "-c", "import sys; print(sys.base_prefix)"], capture_output=True,
                                text=True, timeout=60).stdout.strip()
        if prefix and Path(prefix).resolve() != here:
            return Path(candidate)
    return None


def test_make_refuses_an_environment_made_from_another_python(tmp_path):
    other = another_python()
    if other is None:
        pytest.skip("only one Python installed: no environment from another one to refuse")
    venv_from(other, tmp_path / "venv")
    run = make_dry_run(f"PYTHON={BASE_PYTHON}", f"VENV={tmp_path / 'venv'}")
    assert run.returncode != 0 and run.stdout == ""
    assert f"{tmp_path / 'venv'} was made from the Python in" in run.stderr, run.stderr
