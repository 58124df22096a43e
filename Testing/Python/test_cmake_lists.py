"""Packaging checks: the CMake lists name exactly the module's files, the top-level CMakeLists.txt
is an extension with its metadata, and the images and licence the Extensions Index asks for exist
(the catalog entry itself: test_extension_catalog.py)."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_NAME = "EOIRRegistration"
MODULE_DIR = ROOT / MODULE_NAME
IGNORED_PARTS = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints"}


def strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def cmake_set(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\(\s*{variable}\b(.*?)\)", strip_comments(text), re.S)
    assert match, f"set({variable} ...) not found"
    return match.group(1).split()


def cmake_string(text: str, variable: str) -> str:
    match = re.search(rf'set\(\s*{variable}\s+"([^"]*)"\s*\)', text)
    assert match, f'set({variable} "...") not found'
    return match.group(1)


def module_files():
    for path in sorted(MODULE_DIR.rglob("*")):
        rel = path.relative_to(MODULE_DIR)
        if path.is_file() and not IGNORED_PARTS & set(rel.parts) and path.suffix != ".pyc" \
                and not path.name.startswith(".") and rel.as_posix() != "CMakeLists.txt":
            yield rel.as_posix()


@pytest.fixture(scope="module")
def module_cmake() -> str:
    return (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def listed(module_cmake):
    name = cmake_set(module_cmake, "MODULE_NAME")
    assert name == [MODULE_NAME]

    def expand(items):
        return [item.replace("${MODULE_NAME}", MODULE_NAME) for item in items]

    return (expand(cmake_set(module_cmake, "MODULE_PYTHON_SCRIPTS")),
            expand(cmake_set(module_cmake, "MODULE_PYTHON_RESOURCES")))


def test_every_listed_file_exists(listed):
    scripts, resources = listed
    missing = [f for f in scripts + resources if not (MODULE_DIR / f).is_file()]
    assert not missing, f"listed in {MODULE_NAME}/CMakeLists.txt but missing: {missing}"
    assert len(set(scripts)) == len(scripts) and len(set(resources)) == len(resources)
    assert all(f.endswith(".py") for f in scripts)
    assert not any(f.endswith(".py") for f in resources)


def test_every_module_file_is_listed(listed):
    """New engine files, bundled models and their cards must be added to the CMake lists, or the
    built extension silently lacks them."""
    scripts, resources = listed
    files = list(module_files())
    unlisted_scripts = sorted(f for f in files if f.endswith(".py") and f not in scripts)
    unlisted_resources = sorted(f for f in files if not f.endswith(".py") and f not in resources)
    assert not unlisted_scripts, f"add to MODULE_PYTHON_SCRIPTS: {unlisted_scripts}"
    assert not unlisted_resources, f"add to MODULE_PYTHON_RESOURCES: {unlisted_resources}"
    # the engine is a package of subpackages (core, engine, models, ...): every folder of Python
    # files is a package whose __init__.py is listed
    folders = sorted({f.rsplit("/", 1)[0] for f in files if f.endswith(".py") and "/" in f})
    assert "EOIRRegistrationLib" in folders and len(folders) > 1, folders
    missing_inits = [f"{d}/__init__.py" for d in folders if f"{d}/__init__.py" not in scripts]
    assert not missing_inits, f"packages without a listed __init__.py: {missing_inits}"
    assert "EOIRRegistration.py" in scripts
    assert f"Resources/Icons/{MODULE_NAME}.png" in resources
    assert f"Resources/UI/{MODULE_NAME}.ui" in resources


def test_module_build_and_test_wiring(module_cmake):
    text = strip_comments(module_cmake)
    call = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S)
    assert call, "slicerMacroBuildScriptedModule(...) missing"
    args = call.group(1).split()
    for keyword, value in (("NAME", "${MODULE_NAME}"), ("SCRIPTS", "${MODULE_PYTHON_SCRIPTS}"),
                           ("RESOURCES", "${MODULE_PYTHON_RESOURCES}")):
        assert args[args.index(keyword) + 1] == value
    assert "WITH_GENERIC_TESTS" in args
    testing = re.search(r"if\(\s*BUILD_TESTING\s*\)(.*?)endif\(", text, re.S)
    assert testing and re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)",
                                 testing.group(1))


def test_top_level_cmake_is_an_extension(module_cmake):
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    code = strip_comments(text)
    assert re.search(r"cmake_minimum_required\(VERSION \d+\.\d+", code)
    assert re.search(rf"project\(\s*{MODULE_NAME}\s*\)", code)
    for variable in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL",
                     "SCREENSHOTURLS", "DEPENDS"):
        assert cmake_string(text, f"EXTENSION_{variable}").strip(), variable
    assert cmake_string(text, "EXTENSION_CATEGORY") == "Registration"
    assert "PyTorch" in cmake_string(text, "EXTENSION_DEPENDS").split()
    order = [code.index(s) for s in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                                     f"add_subdirectory({MODULE_NAME})",
                                     "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                                     "include(${Slicer_EXTENSION_CPACK})")]
    assert order == sorted(order)
    # every module folder with a CMakeLists.txt is added
    for sub in ROOT.iterdir():
        if (sub / "CMakeLists.txt").is_file() and sub.name not in ("Testing",):
            assert f"add_subdirectory({sub.name})" in code, sub.name


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_icons_screenshot_and_licence_exist():
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for url in [cmake_string(cmake, "EXTENSION_ICONURL"), *cmake_string(cmake, "EXTENSION_SCREENSHOTURLS").split()]:
        # raw.githubusercontent.com/<owner>/<repo>/<branch>/<path in this repository>
        rel = url.split("/", 6)[-1]
        assert (ROOT / rel).is_file(), f"{url} points to {rel}, which is not in the repository"
    assert png_size(ROOT / "Resources" / f"{MODULE_NAME}.png") == (128, 128)
    assert png_size(MODULE_DIR / "Resources" / "Icons" / f"{MODULE_NAME}.png") == (128, 128)
    width, height = png_size(ROOT / "Resources" / "Screenshot-panel.png")
    assert width >= 300 and height >= 300
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0" in licence
    assert "Copyright 2026 The EOIRRegistration developers" in licence


def test_packaging_files_use_lf_line_endings():
    for path in [ROOT / "CMakeLists.txt", MODULE_DIR / "CMakeLists.txt",
                 ROOT / f"{MODULE_NAME}.json", ROOT / "LICENSE",
                 MODULE_DIR / "Resources" / "UI" / f"{MODULE_NAME}.ui", MODULE_DIR / f"{MODULE_NAME}.py"]:
        assert b"\r\n" not in path.read_bytes(), path
