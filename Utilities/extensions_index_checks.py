"""The Slicer Extensions Index's checks of a catalog entry, those that need no network, run on
this repository.

The index checks a pull request in two workflows (Slicer/ExtensionsIndex, branch main):
- Lint (pre-commit): no file over 1024 KB, LF endings, a final newline, no trailing whitespace or
  tabs, prettier formatting, and check-jsonschema against its local
  schemas/slicer-extension-catalog-entry-schema-v1.0.1.json.
- Extension Validation (scripts/check_description_files.py): clones scm_url at scm_revision,
  validates against the schema the entry's $schema names, LF endings, a name not starting with
  "Slicer", a known category, "slicer" in the repository name, the `3d-slicer-extension` GitHub
  topic, scm_url's scheme, project() in the top-level CMakeLists.txt equal to the file name,
  EXTENSION_ICONURL and EXTENSION_SCREENSHOTURLS downloading as images, a licence file at the
  root, and every build dependency being an entry of the index.

Here the schemas and the rule data are the vendored copies in Utilities/ExtensionsIndex/ (README
there), the clone is this working tree, and an image URL is checked by finding the file it names
in this repository. Not repeated: the GitHub topic and the downloads themselves (network), and
prettier (node; extension_catalog.render writes what it leaves unchanged).
"""
from __future__ import annotations

import json
import re
import subprocess
import urllib.parse as urlparse
from pathlib import Path

import jsonschema

VENDORED = Path(__file__).resolve().parent / "ExtensionsIndex"
RULES = json.loads((VENDORED / "index-rules.json").read_text(encoding="utf-8"))
# Reviewers ask for repositories under 100 MB (e.g. Slicer/ExtensionsIndex#2348); no script checks it.
MAX_REPOSITORY_MB = 100
IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg",
               b"GIF87a": "image/gif", b"GIF89a": "image/gif"}


def vendored_schemas() -> dict[str, dict]:
    """The vendored schemas by their $id without the fragment (what $schema names)."""
    schemas = {}
    for path in sorted(VENDORED.glob("slicer-extension-catalog-entry-schema-*.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        schemas[schema["$id"].split("#")[0]] = schema
    return schemas


def schema_errors(entry: dict, schema: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{e.message} at path: {' -> '.join(str(p) for p in e.absolute_path) or '(top)'}"
            for e in sorted(validator.iter_errors(entry), key=lambda e: list(e.absolute_path))]


def file_format_problems(raw: bytes) -> list[str]:
    problems = []
    if len(raw) > RULES["max_entry_kb"] * 1024:
        problems.append(f"check-added-large-files: {len(raw)} bytes, over {RULES['max_entry_kb']} KB")
    text = raw.decode("utf-8", "replace")
    if "\r" in text:
        problems.append("check_json_file_format: non-LF line endings (CR or CRLF)")
    if "\t" in text:
        problems.append("forbid-tabs: the file contains tabs")
    if not text.endswith("\n") or text.endswith("\n\n"):
        problems.append("end-of-file-fixer: the file must end with exactly one newline")
    if any(line != line.rstrip() for line in text.splitlines()):
        problems.append("trailing-whitespace: a line ends with spaces")
    return problems


def schema_problems(entry: dict) -> list[str]:
    url = entry.get("$schema")
    if not url:
        return ["check_json_schema: no $schema field found in extension description"]
    schemas = vendored_schemas()
    schema = schemas.get(url.split("#")[0])
    if schema is None:
        return [f"check_json_schema: $schema {url} is not a vendored schema ({sorted(schemas)})"]
    lint = json.loads((VENDORED / RULES["lint_schema"]).read_text(encoding="utf-8"))
    return ([f"check_json_schema: {e}" for e in schema_errors(entry, schema)]
            + [f"check-jsonschema ({RULES['lint_schema']}): {e}" for e in schema_errors(entry, lint)])


def github_repository(url: str) -> tuple[str, str] | None:
    """(owner, name) of a github.com or raw.githubusercontent.com URL, lower case."""
    parts = urlparse.urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    if parts.netloc.lower() not in ("github.com", "raw.githubusercontent.com") or len(segments) < 2:
        return None
    name = segments[1][:-4] if segments[1].endswith(".git") else segments[1]
    return segments[0].lower(), name.lower()


def name_problems(name: str, entry: dict) -> list[str]:
    problems = []
    if name.lower().startswith("slicer"):
        problems.append(f"check_extension_name: extension name should not start with 'Slicer' ({name})")
    category = entry.get("category")
    if category not in RULES["accepted_categories"]:
        problems.append(f"check_category: category {category!r} is unknown to the index")
    scm_url = entry.get("scm_url", "")
    scheme = urlparse.urlsplit(scm_url).scheme
    if "://" not in scm_url or scheme not in RULES["scm_url_schemes"]:
        problems.append(f"check_scm_url_syntax: scm_url {scm_url!r} is not "
                        f"{'|'.join(RULES['scm_url_schemes'])}://host/path")
    repo_name = Path(urlparse.urlsplit(scm_url).path).stem
    if "slicer" not in repo_name.lower():
        problems.append(f"check_git_repository_name: repository name {repo_name!r} should be "
                        f"'Slicer{repo_name}'")
    return problems


def image_problem(url: str, what: str, entry: dict, root: Path) -> str | None:
    """Offline stand-in for the index's download: a raw URL of the entry's own repository whose
    path is an image file in this working tree."""
    if not url.startswith("http"):
        return f"{what} '{url}' should be a valid URL starting with 'http'"
    parts = urlparse.urlsplit(url)
    if parts.netloc.lower() != "raw.githubusercontent.com" or \
            github_repository(url) != github_repository(entry.get("scm_url", "")):
        return f"{what} '{url}' is not a raw.githubusercontent.com URL of {entry.get('scm_url')}"
    rel = parts.path.strip("/").split("/", 3)[-1]  # owner/repo/branch/<path in the repository>
    path = root / rel
    if not path.is_file():
        return f"{what} '{url}' names {rel}, which is not in the repository"
    head = path.read_bytes()[:8]
    if not any(head.startswith(magic) for magic in IMAGE_MAGIC):
        return f"{what} '{url}' is not a PNG, JPEG or GIF image ({', '.join(RULES['image_content_types'])})"
    return None


def cmake_problems(name: str, entry: dict, root: Path) -> list[str]:
    cmake_path = root / "CMakeLists.txt"
    if not cmake_path.is_file():
        return ["check_cmakelists_content: CMakeLists.txt file not found in repository root"]
    cmake = cmake_path.read_text(encoding="utf-8", errors="ignore")
    problems = []
    # the index's own patterns, so that what it cannot parse fails here too
    project = re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", cmake, re.IGNORECASE | re.MULTILINE)
    in_cmake = project[0].strip().strip('"').strip("'") if project else None
    if in_cmake != name:
        problems.append(f"check_cmakelists_content: project name {in_cmake!r} in CMakeLists.txt does not "
                        f"match extension description file name {name!r}")
    icon = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', cmake, re.IGNORECASE | re.MULTILINE)
    shots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', cmake, re.IGNORECASE | re.MULTILINE)
    if not icon:
        problems.append("check_cmakelists_content: no EXTENSION_ICONURL found in CMakeLists.txt")
    if not shots or not shots[0].split():
        problems.append("check_cmakelists_content: no EXTENSION_SCREENSHOTURLS found in CMakeLists.txt")
    urls = [("EXTENSION_ICONURL", icon[0].strip())] if icon else []
    urls += [("EXTENSION_SCREENSHOTURLS", u) for u in (shots[0].split() if shots else [])]
    for what, url in urls:
        problem = image_problem(url, what, entry, root)
        if problem:
            problems.append(f"check_cmakelists_content: {problem}")
    # PR template: the entry agrees with CMake (dependencies)
    depends = re.findall(r'set\s*\(EXTENSION_DEPENDS\s*"([^"]*)"', cmake)
    cmake_depends = [d for d in depends[0].split() if d != "NA"] if depends else []
    if entry.get("build_dependencies", []) != cmake_depends:
        problems.append(f"build_dependencies {entry.get('build_dependencies', [])} differ from "
                        f"EXTENSION_DEPENDS {cmake_depends}")
    return problems


def license_problems(root: Path) -> list[str]:
    if any((root / name).is_file() for name in RULES["license_file_names"]):
        return []
    return ["check_license_file: no license file found in repository root"]


def dependency_problems(entry: dict) -> list[str]:
    known = set(RULES["entries_in_index"])
    return [f"check_dependencies: '{dep}' extension is not found in the index (known: {sorted(known)}); "
            "read its entry there and add it to entries_in_index"
            for dep in entry.get("build_dependencies", []) if dep and dep not in known]


def repository_size_problems(root: Path) -> list[str]:
    run = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True)
    if run.returncode != 0:
        return [f"repository size: cannot list tracked files ({run.stderr.decode(errors='replace').strip()})"]
    files = [root / f for f in run.stdout.decode("utf-8").split("\0") if f]
    total = sum(f.stat().st_size for f in files if f.is_file())
    if total > MAX_REPOSITORY_MB * 1024 * 1024:
        return [f"repository size: tracked files take {total / 2**20:.1f} MB, over {MAX_REPOSITORY_MB} MB"]
    return []


def entry_problems(name: str, raw: bytes, root: Path) -> list[str]:
    """Every problem the offline checks find with the entry ``raw`` (the bytes of <name>.json)
    for the repository at ``root``; empty when it passes."""
    problems = file_format_problems(raw)
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return problems + [f"parse_json: failed to parse {name}.json: {exc}"]
    if not isinstance(entry, dict):
        return problems + [f"parse_json: {name}.json is not a JSON object"]
    return (problems + schema_problems(entry) + name_problems(name, entry)
            + cmake_problems(name, entry, root) + license_problems(root)
            + dependency_problems(entry) + repository_size_problems(root))
