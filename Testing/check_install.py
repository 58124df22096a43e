"""``make test-install``: the package as a user installs it, run where the clone is out of reach.

1. A new virtual environment made from this interpreter (no system or user site-packages).
2. ``pip install SOURCE`` into it: a plain, non-editable install with the dependencies that
   ``pyproject.toml`` declares, built from a copy of this clone (the clone's own ``build/`` is
   neither used nor written). The versions installed in the calling environment are the
   constraints: the environment gets what the tests ran on (torch included; pip takes it from
   its cache or local wheels where it has them, else downloads it again: about a minute of the
   two this check takes on CI's Python 3.12, with PyPI's CUDA build).
3. From a temporary folder outside the clone, with no PYTHONPATH: ``eoir-register`` on a 24^3
   pair written there (a blob moved by a known shift), checked for exit 0, every output on the
   fixed grid, and the known shift recovered by the bundled default model.
4. Every top-level module that the installed package's files import, at the top of a file or
   inside a function (where ``eoir-register`` may never go: scipy in ``core/metrics.py hd95``),
   imports in that environment, but for those that 3D Slicer or an extra provides (below).

A dependency missing from ``pyproject.toml`` is missing in that environment, so step 3 or 4 fails
and so does this check (exit 1). This file needs only the standard library where it is
started; the new environment's own python writes the pair and reads the outputs (``--write-pair``,
``--verify``: SimpleITK and numpy, both declared dependencies).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "eoir-registration"
# Not copied into the build: version control, environments and earlier builds or outputs.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".ci-venvs", "build", "dist", "*.egg-info",
                                    "__pycache__", ".pytest_cache", ".ruff_cache", "eoir-demo-output")
SIZE = (24, 24, 24)                  # ITK order (x, y, z), identity direction: index axes = LPS axes
SPACING = (2.0, 2.0, 2.5)            # mm
SHIFT_VOXELS = (1.0, -0.5, 0.5)      # the moving blob's centre minus the fixed one's, (x, y, z)
TOLERANCE_MM = 0.5                   # on the median displacement inside the blob (truth: 2.5 mm long)
# Imported by the package, not installed by `pip install .`: the slicer subpackage runs in 3D Slicer.
NOT_DEPENDENCIES = {"slicer": "3D Slicer", "vtk": "3D Slicer", "PyTorchUtils": "Slicer's PyTorch extension"}
PACKAGE = "EOIRRegistrationLib"
# The standard library, other platforms' modules included (cli/outputfolder.py imports msvcrt on
# Windows); before Python 3.10, which lists it, those modules are named here.
STDLIB = set(getattr(sys, "stdlib_module_names", ())) or {"msvcrt", "winreg", "_winapi", "nt"}
OUTPUTS = ("displacement.nii", "warped.nii.gz", "jacobian.nii", "folding.nii.gz", "report.json",
           "overview.png")


class CheckFailed(Exception):
    pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--write-pair", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--verify", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write_pair:
        write_pair(Path(args.write_pair))
        return 0
    if args.verify:
        return report(verify(Path(args.verify)) + missing_imports())
    work = Path(tempfile.mkdtemp(prefix="eoir-install-check-")).resolve()
    if ROOT in work.parents:
        print(f"check_install: error: the temporary folder {work} is inside the clone", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        check(work)
    except CheckFailed as exc:
        print(f"check_install: FAILED: {exc}\n  (files kept in {work})", file=sys.stderr)
        return 1
    if args.keep:
        print(f"check_install: files kept in {work}")
    else:
        shutil.rmtree(work)
    print(f"check_install: {time.perf_counter() - start:.0f} s in all")
    return 0


def check(work: Path) -> None:
    venv, case = work / "venv", work / "case"
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    shutil.copytree(ROOT, work / "source", ignore=NOT_SOURCE)
    shutil.copy(__file__, work / "check_install.py")  # run from here: nothing of the clone on sys.path
    constraints = work / "constraints.txt"
    constraints.write_text("\n".join(installed_versions()) + "\n")
    env = clean_environment()
    step("virtual environment", [sys.executable, "-m", "venv", str(venv)], work, env)
    # --no-compile: byte-compiling torch's files would double the step's time and checks nothing
    # (pip only warns when a file does not compile); what runs is compiled when it is imported.
    step("pip install . (with the constraints of this environment)",
         [str(python), "-m", "pip", "install", "--quiet", "--no-compile", "-c", str(constraints),
          str(work / "source")], work, env)
    step("write a 24^3 pair", [str(python), str(work / "check_install.py"), "--write-pair", str(case)],
         work, env)
    where = step("locate the installed package", [str(python), "-c", f"import {PACKAGE} as p; "
                                                  "print(p.__file__)"], case, env).strip()
    if venv.resolve() not in Path(where).resolve().parents:
        raise CheckFailed(f"{PACKAGE} was imported from {where}, not from {venv}")
    step("eoir-register", [str(bin_dir / "eoir-register"), "fixed.nii.gz", "moving.nii.gz",
                           "--output-dir", "out", "--threads", "1"], case, env)
    step("verify the outputs and the package's imports",
         [str(python), str(work / "check_install.py"), "--verify", str(case)], work, env)
    print("check_install: passed: pip install . into a clean environment; eoir-register ran outside "
          "the clone and wrote its outputs; every module the package imports is there")


def installed_versions() -> list[str]:
    """``name==version`` of each distribution in this environment except the project itself (an
    editable install, or not installed at all)."""
    run = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise CheckFailed(f"pip list failed: {run.stderr.strip()}")
    lines = [line.strip() for line in run.stdout.splitlines() if "==" in line]
    return [line for line in lines if re.sub(r"[-_.]+", "-", line.split("==")[0]).lower() != PROJECT]


def clean_environment() -> dict:
    """This process's environment without what would let the clone or another site-packages in."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def step(what: str, command: list[str], cwd: Path, env: dict) -> str:
    start = time.perf_counter()
    run = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-25:])
        raise CheckFailed(f"{what}: exit status {run.returncode}:\n{tail}")
    print(f"check_install: {what}: {seconds:.1f} s", flush=True)
    return run.stdout


def blob(centre, np):
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in reversed(SIZE)), indexing="ij")
    r2 = ((x - centre[0]) / 6) ** 2 + ((y - centre[1]) / 5) ** 2 + ((z - centre[2]) / 4) ** 2
    return (100 * np.exp(-r2)).astype(np.float32)


def write_pair(case: Path) -> None:
    """In the new environment: fixed and moving 24^3 images, the moving blob shifted."""
    import numpy as np
    import SimpleITK as sitk

    case.mkdir(parents=True)
    centre = [(n - 1) / 2 for n in SIZE]
    for name, c in (("fixed", centre), ("moving", [a + s for a, s in zip(centre, SHIFT_VOXELS)])):
        image = sitk.GetImageFromArray(blob(c, np))
        image.SetSpacing(SPACING)
        sitk.WriteImage(image, str(case / f"{name}.nii.gz"))


def verify(case: Path) -> list[str]:
    """In the new environment: the problems with eoir-register's outputs (none: passed)."""
    import numpy as np
    import SimpleITK as sitk

    out = case / "out"
    missing = [name for name in OUTPUTS if not (out / name).is_file() or (out / name).stat().st_size == 0]
    if missing:
        return [f"missing or empty outputs: {missing}"]
    problems = []
    fixed = sitk.ReadImage(str(case / "fixed.nii.gz"))
    for name in OUTPUTS[:4]:
        image = sitk.ReadImage(str(out / name))
        if image.GetSize() != fixed.GetSize() or not all(
                np.allclose(getattr(image, g)(), getattr(fixed, g)(), atol=1e-4)
                for g in ("GetSpacing", "GetOrigin", "GetDirection")):
            problems.append(f"{name} is not on the fixed grid")
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii"), sitk.sitkVectorFloat64))
    inside = sitk.GetArrayFromImage(fixed) > 50
    truth = np.multiply(SHIFT_VOXELS, SPACING)  # LPS mm: fixed point x -> moving point x + d(x)
    found = np.median(field[inside], axis=0)
    if field.shape[-1] != 3 or not np.isfinite(field).all() or np.abs(found - truth).max() > TOLERANCE_MM:
        problems.append(f"displacement inside the blob {np.round(found, 2).tolist()} mm, "
                        f"expected {truth.tolist()} mm within {TOLERANCE_MM} mm")
    quality = json.loads((out / "report.json").read_text())["quality"]
    if not quality:
        problems.append("report.json has no quality figures")
    if (out / "overview.png").read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        problems.append("overview.png is not a PNG file")
    return problems


def missing_imports() -> list[str]:
    """In the new environment: the modules the installed package imports that do not import."""
    import ast
    import importlib
    import importlib.util

    folder = Path(importlib.util.find_spec(PACKAGE).origin).parent
    users: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                users.setdefault(name.split(".")[0], set()).add(str(path.relative_to(folder)))
    problems = []
    for name in sorted(set(users) - set(NOT_DEPENDENCIES) - STDLIB - {PACKAGE}):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            problems.append(f"{name}, imported by {sorted(users[name])}, does not import after pip install . "
                            f"({exc}): a dependency missing from pyproject.toml?")
    return problems


def report(problems: list[str]) -> int:
    for problem in problems:
        print(f"check_install: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
