"""The Extensions Index catalog entry (EOIRRegistration.json): it is what Utilities/
extension_catalog.py writes from CMakeLists.txt, it passes the index's checks that need no network
(schemas vendored in Utilities/ExtensionsIndex/), and each of those checks fails when its rule is
broken in a copy of the repository."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "Utilities"))

import extension_catalog  # noqa: E402
import extensions_index_checks as checks  # noqa: E402

NAME = "EOIRRegistration"
ENTRY = ROOT / f"{NAME}.json"
SCRIPT = ROOT / "Utilities" / "extension_catalog.py"
COPIED = ["CMakeLists.txt", "LICENSE", f"{NAME}.json", f"Resources/{NAME}.png", "Resources/Screenshot-panel.png"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_committed_entry_is_what_the_script_writes():
    run = run_script("--check")
    assert run.returncode == 0, run.stderr
    name, text = extension_catalog.expected_text(ROOT)
    assert name == NAME and ENTRY.read_bytes() == text.encode("utf-8")


def test_entry_carries_the_cmake_metadata():
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(rf"^project\({NAME}\)$", cmake, re.M)
    assert entry["category"] == re.search(r'set\(EXTENSION_CATEGORY "([^"]*)"\)', cmake).group(1)
    assert entry["build_dependencies"] == ["PyTorch"] == \
        re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', cmake).group(1).split()
    assert entry["$schema"] == ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                                "slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert (entry["scm_revision"], entry["tier"], entry["enabled"], entry["build_subdirectory"]) == \
        ("main", 1, True, ".")
    # the repository the index clones is the one the icon and screenshot URLs name
    icon = re.search(r'set\(EXTENSION_ICONURL "([^"]*)"\)', cmake).group(1)
    owner_repo = icon.split("/")[3:5]
    assert entry["scm_url"] == f"https://github.com/{owner_repo[0]}/{owner_repo[1]}.git"


def test_committed_entry_passes_the_offline_index_checks():
    assert checks.entry_problems(NAME, ENTRY.read_bytes(), ROOT) == []


def test_a_straight_copy_of_the_s4ext_fields_fails_the_index_schema():
    """The old description-file keys and its "1" for enabled are what the schema refuses."""
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    copy = {"$schema": extension_catalog.SCHEMA_URL, "scm_url": extension_catalog.SCM_URL,
            "scm_revision": "main", "category": "Registration", "build_subdirectory": ".",
            "depends": "PyTorch", "contributors": "The EOIRRegistration developers", "status": "Beta",
            "homepage": re.search(r'set\(EXTENSION_HOMEPAGE "([^"]*)"\)', cmake).group(1),
            "enabled": "1"}
    problems = checks.schema_problems(copy)
    assert ("check_json_schema: Additional properties are not allowed ('contributors', 'depends', "
            "'homepage', 'status' were unexpected) at path: (top)") in problems
    assert "check_json_schema: '1' is not of type 'boolean' at path: enabled" in problems
    # the index's lint validates against its local v1.0.1 schema as well
    assert any(p.startswith("check-jsonschema (slicer-extension-catalog-entry-schema-v1.0.1.json): "
                            "Additional properties") for p in problems)


def test_the_vendored_schemas_are_the_ones_named():
    schemas = checks.vendored_schemas()
    assert set(schemas) == {f"https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                            f"slicer-extension-catalog-entry-schema-v1.0.{v}.json" for v in (1, 2)}
    for schema in schemas.values():
        assert schema["additionalProperties"] is False
        assert schema["required"] == ["$schema", "category", "scm_url"]
        jsonschema.Draft7Validator.check_schema(schema)
    assert "dicom_support_rule" in schemas[extension_catalog.SCHEMA_URL.split("#")[0]]["properties"]


@pytest.fixture()
def repo(tmp_path) -> Path:
    """A git working tree holding what the index's checks read."""
    for rel in COPIED:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    return tmp_path


def edit(path: Path, old: str, new: str):
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new), encoding="utf-8")


def edit_entry(repo: Path, **changes):
    entry = json.loads((repo / f"{NAME}.json").read_text(encoding="utf-8"))
    entry.update(changes)
    (repo / f"{NAME}.json").write_text(extension_catalog.render(entry), encoding="utf-8")


def problems_of(repo: Path, name: str = NAME) -> list[str]:
    return checks.entry_problems(name, (repo / f"{NAME}.json").read_bytes(), repo)


def test_the_copy_passes(repo):
    assert problems_of(repo) == []


@pytest.mark.parametrize("breakage, expected", [
    ("project", ["check_cmakelists_content: project name 'EOIRReg' in CMakeLists.txt does not match "
                 "extension description file name 'EOIRRegistration'"]),
    ("licence", ["check_license_file: no license file found in repository root"]),
    ("icon missing", ["check_cmakelists_content: EXTENSION_ICONURL 'https://raw.githubusercontent.com/"
                      "EOIRRegistration/SlicerEOIRRegistration/main/Resources/EOIRRegistration.png' names "
                      "Resources/EOIRRegistration.png, which is not in the repository"]),
    ("screenshot not an image", ["check_cmakelists_content: EXTENSION_SCREENSHOTURLS 'https://raw."
                                 "githubusercontent.com/EOIRRegistration/SlicerEOIRRegistration/main/Resources/"
                                 "Screenshot-panel.png' is not a PNG, JPEG or GIF image (image/png, "
                                 "image/jpeg, image/gif)"]),
    ("icon elsewhere", ["check_cmakelists_content: EXTENSION_ICONURL 'https://example.org/icon.png' is not a "
                        "raw.githubusercontent.com URL of https://github.com/EOIRRegistration/"
                        "SlicerEOIRRegistration.git"]),
    ("no screenshot", ["check_cmakelists_content: no EXTENSION_SCREENSHOTURLS found in CMakeLists.txt"]),
    ("crlf", ["check_json_file_format: non-LF line endings (CR or CRLF)"]),
    ("category", ["check_category: category 'Registrations' is unknown to the index"]),
    ("dependency", ["check_dependencies: 'Elastix' extension is not found in the index (known: ['PyTorch']); "
                    "read its entry there and add it to entries_in_index"]),
    ("dependency drift", ["build_dependencies [] differ from EXTENSION_DEPENDS ['PyTorch']"]),
    ("scheme", ["check_scm_url_syntax: scm_url 'ssh://github.com/EOIRRegistration/SlicerEOIRRegistration.git' "
                "is not git|https://host/path"]),
])
def test_each_index_check_fails_when_its_rule_is_broken(repo, breakage, expected):
    cmake = repo / "CMakeLists.txt"
    if breakage == "project":
        edit(cmake, f"project({NAME})", "project(EOIRReg)")
    elif breakage == "licence":
        (repo / "LICENSE").unlink()
    elif breakage == "icon missing":
        (repo / "Resources" / f"{NAME}.png").unlink()
    elif breakage == "screenshot not an image":
        (repo / "Resources" / "Screenshot-panel.png").write_text("not an image")
    elif breakage == "icon elsewhere":
        text = cmake.read_text(encoding="utf-8")
        cmake.write_text(re.sub(r'EXTENSION_ICONURL "[^"]*"', 'EXTENSION_ICONURL "https://example.org/icon.png"',
                                text), encoding="utf-8")
    elif breakage == "no screenshot":
        text = cmake.read_text(encoding="utf-8")
        cmake.write_text(re.sub(r"set\(EXTENSION_SCREENSHOTURLS[^\n]*\n", "", text), encoding="utf-8")
    elif breakage == "crlf":
        path = repo / f"{NAME}.json"
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    elif breakage == "category":
        edit_entry(repo, category="Registrations")
    elif breakage == "dependency":
        edit(cmake, 'EXTENSION_DEPENDS "PyTorch"', 'EXTENSION_DEPENDS "PyTorch Elastix"')
        edit_entry(repo, build_dependencies=["PyTorch", "Elastix"])
    elif breakage == "dependency drift":
        edit_entry(repo, build_dependencies=[])
    elif breakage == "scheme":
        edit_entry(repo, scm_url="ssh://github.com/EOIRRegistration/SlicerEOIRRegistration.git")
    assert problems_of(repo) == expected


def test_names_the_index_refuses(repo):
    edit(repo / "CMakeLists.txt", f"project({NAME})", f"project(Slicer{NAME})")
    assert problems_of(repo, f"Slicer{NAME}") == [
        f"check_extension_name: extension name should not start with 'Slicer' (Slicer{NAME})"]
    edit_entry(repo, scm_url="https://github.com/EOIRRegistration/EOIRRegistration.git")
    assert "check_git_repository_name: repository name 'EOIRRegistration' should be 'SlicerEOIRRegistration'" \
        in problems_of(repo, f"Slicer{NAME}")


def test_entry_format_rules(repo):
    path = repo / f"{NAME}.json"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace('"tier": 1', '"tier": 1 \t') + "\n", encoding="utf-8")
    assert problems_of(repo) == ["forbid-tabs: the file contains tabs",
                                 "end-of-file-fixer: the file must end with exactly one newline",
                                 "trailing-whitespace: a line ends with spaces"]
    path.write_text(text.replace('"category"', '"homepage": "x",\n  "category"'), encoding="utf-8")
    assert problems_of(repo) == [
        "check_json_schema: Additional properties are not allowed ('homepage' was unexpected) at path: (top)",
        "check-jsonschema (slicer-extension-catalog-entry-schema-v1.0.1.json): Additional properties are not "
        "allowed ('homepage' was unexpected) at path: (top)"]
    path.write_text(text[:-3], encoding="utf-8")
    assert problems_of(repo)[-1].startswith("parse_json: failed to parse EOIRRegistration.json: ")


def test_repository_size_limit(repo, monkeypatch):
    monkeypatch.setattr(checks, "MAX_REPOSITORY_MB", 0.01)  # the copy's tracked files are ~100 KB
    (problem,) = problems_of(repo)
    assert re.fullmatch(r"repository size: tracked files take \d+\.\d MB, over 0\.01 MB", problem)


def test_check_reports_a_stale_entry_and_the_script_rewrites_it(repo):
    entry = repo / f"{NAME}.json"
    before = entry.read_bytes()
    edit(repo / "CMakeLists.txt", 'EXTENSION_DEPENDS "PyTorch"', 'EXTENSION_DEPENDS "NA"')
    run = run_script("--check", "--root", str(repo))
    assert run.returncode == 1 and entry.read_bytes() == before
    assert run.stderr.splitlines() == [
        f"{NAME}.json differs from what extension_catalog.py writes from CMakeLists.txt; "
        "run: python Utilities/extension_catalog.py",
        "build_dependencies ['PyTorch'] differ from EXTENSION_DEPENDS []"]
    run = run_script("--root", str(repo))
    assert run.returncode == 0, run.stderr
    assert json.loads(entry.read_text(encoding="utf-8"))["build_dependencies"] == []
    assert run_script("--check", "--root", str(repo)).returncode == 0


def test_an_entry_for_a_stable_branch(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("submission") / f"{NAME}.json"
    assert run_script("--root", str(repo), "--scm-revision", "5.10", "--output", str(out)).returncode == 0
    entry = json.loads(out.read_text(encoding="utf-8"))
    assert entry["scm_revision"] == "5.10"
    assert json.loads((repo / f"{NAME}.json").read_text(encoding="utf-8"))["scm_revision"] == "main"
    wrong = out.with_name("entry.json")
    run = run_script("--root", str(repo), "--output", str(wrong))
    assert run.returncode == 2 and not wrong.exists()
    assert run.stderr == f"error: the index names an extension after its file: call it {NAME}.json\n"


@pytest.mark.parametrize("old, new, message", [
    ('set(EXTENSION_CATEGORY "Registration")\n', "",
     'error: set(EXTENSION_CATEGORY "...") not found in the top-level CMakeLists.txt'),
    (f"project({NAME})", "", "error: no project(<Name>) in the top-level CMakeLists.txt"),
    ('EXTENSION_CATEGORY "Registration"', 'EXTENSION_CATEGORY " "', "error: EXTENSION_CATEGORY is empty"),
])
def test_bad_cmake_is_refused_and_nothing_written(repo, old, new, message):
    entry = repo / f"{NAME}.json"
    entry.unlink()
    edit(repo / "CMakeLists.txt", old, new)
    run = run_script("--root", str(repo))
    assert (run.returncode, run.stderr, entry.exists()) == (2, message + "\n", False)


def test_an_entry_failing_an_index_check_is_not_written(repo):
    entry = repo / f"{NAME}.json"
    entry.unlink()
    edit(repo / "CMakeLists.txt", 'EXTENSION_CATEGORY "Registration"', 'EXTENSION_CATEGORY "Registrations"')
    run = run_script("--root", str(repo))
    assert run.returncode == 1 and not entry.exists() and not list(repo.glob(".*.tmp"))
    assert run.stderr == "check_category: category 'Registrations' is unknown to the index\n"
