"""The package's layout holds: import layers (import-linter, contracts in pyproject.toml), one job
per subpackage stated in its docstring, small modules, and the torch-free modules stay so."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "EOIRRegistration" / "EOIRRegistrationLib"
SUBPACKAGES = ("core", "models", "engine", "training", "slicer", "cli")
MAX_LINES = 450


def test_import_contracts_are_kept():
    """``lint-imports`` on the project's contracts (front ends over training over the engine over
    the models over the core; options, results and QA figures free of torch and scipy)."""
    run = subprocess.run([sys.executable, "-c", "from importlinter.cli import "
                          "lint_imports_command; lint_imports_command()", "--no-cache"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "2 kept, 0 broken" in run.stdout


def test_a_broken_layer_is_caught(tmp_path):
    """The layers contract bites: a copy of the package where the core imports the engine fails."""
    import shutil

    copy = tmp_path / "EOIRRegistrationLib"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.pt", "__pycache__"))
    with open(copy / "core" / "qa.py", "a", encoding="utf-8") as f:
        f.write("\nfrom EOIRRegistrationLib.engine import options  # noqa: E402,F401\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    run = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); from "
                          "importlinter.cli import lint_imports_command; lint_imports_command()",
                          "--no-cache"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode != 0 and "BROKEN" in run.stdout, run.stdout[-2000:]


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_each_subpackage_says_what_it_holds_and_may_import(name):
    doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
    assert doc and "May import" in doc, f"{name}/__init__.py needs a docstring with 'May import'"


def test_no_module_is_over_the_size_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for p in [*PACKAGE.rglob("*.py"), ROOT / "EOIRRegistration" / "EOIRRegistration.py"]}
    over = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_the_panel_modules_load_without_torch():
    """What Slicer loads with the module (and the panel's checks) imports neither torch nor
    scipy: options, results, the scene logic, the runners, the model list and texts."""
    code = ("import sys\n"
            "import EOIRRegistrationLib.engine.options, EOIRRegistrationLib.engine.result\n"
            "import EOIRRegistrationLib.slicer.logic, EOIRRegistrationLib.slicer.runners\n"
            "import EOIRRegistrationLib.slicer.catalog, EOIRRegistrationLib.slicer.texts\n"
            "import EOIRRegistrationLib.slicer.selftest, EOIRRegistrationLib.cli.main\n"
            "print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "EOIRRegistration",
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
