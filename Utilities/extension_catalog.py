"""Write the Slicer Extensions Index catalog entry, EOIRRegistration.json, from the top-level
CMakeLists.txt, and check it the way the index's CI does where that needs no network.

    python Utilities/extension_catalog.py            # (re)write EOIRRegistration.json
    python Utilities/extension_catalog.py --check    # exit 1 if the file is stale or a check fails
    python Utilities/extension_catalog.py --scm-revision 5.10 --output /tmp/EOIRRegistration.json

The index's branches for Slicer 5.8 and later hold one `<Name>.json` per extension (schema
slicer-extension-catalog-entry-schema-v1.0.2, vendored in Utilities/ExtensionsIndex/). The name
is CMake's project(), the category and build dependencies are EXTENSION_CATEGORY and
EXTENSION_DEPENDS; only what CMake does not hold (where the index clones from, which revision,
the tier) is set here. docs/publishing.md says how to submit the file.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extensions_index_checks import entry_problems  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_URL = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
              "slicer-extension-catalog-entry-schema-v1.0.2.json#")
# Where the index's factory clones the source from; the checks require the icon and screenshot
# URLs in CMake to be raw URLs of this same GitHub repository.
SCM_URL = "https://github.com/EOIRRegistration/SlicerEOIRRegistration.git"
# A branch, not a hash: the index builds its newest commit every night (index PR template).
SCM_REVISION = "main"
TIER = 1  # experimental; the index maintainers raise it once the tier 3 checklist is met


class CatalogError(ValueError):
    """The CMake metadata cannot make a catalog entry (the message says why)."""


@dataclass(frozen=True)
class CMakeMetadata:
    project: str
    variables: dict[str, str]  # EXTENSION_* -> its quoted value

    def get(self, name: str) -> str:
        if name not in self.variables:
            raise CatalogError(f'set({name} "...") not found in the top-level CMakeLists.txt')
        return self.variables[name]

    @property
    def depends(self) -> list[str]:
        # Slicer's "NA" placeholder means no dependency
        return [d for d in self.get("EXTENSION_DEPENDS").split() if d != "NA"]


def read_cmake_metadata(text: str) -> CMakeMetadata:
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    project = re.search(r"^\s*project\(\s*([A-Za-z0-9_]+)", code, re.M)
    if not project:
        raise CatalogError("no project(<Name>) in the top-level CMakeLists.txt")
    variables = dict(re.findall(r'set\(\s*(EXTENSION_[A-Z_]+)\s+"([^"]*)"\s*\)', text))
    return CMakeMetadata(project.group(1), variables)


def catalog_entry(meta: CMakeMetadata, scm_revision: str = SCM_REVISION) -> dict:
    category = meta.get("EXTENSION_CATEGORY").strip()
    if not category:
        raise CatalogError("EXTENSION_CATEGORY is empty")
    return {
        "$schema": SCHEMA_URL,
        "build_dependencies": meta.depends,
        "build_subdirectory": ".",
        "category": category,
        "enabled": True,
        "scm_revision": scm_revision,
        "scm_url": SCM_URL,
        "tier": TIER,
    }


def render(entry: dict) -> str:
    # Sorted keys, two spaces, one array item per line, LF and a final newline: what the index's
    # prettier hook (multilineArraysWrapThreshold 0) and end-of-file fixer leave unchanged.
    return json.dumps(entry, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def expected_text(root: Path, scm_revision: str = SCM_REVISION) -> tuple[str, str]:
    """(extension name, the entry's text) for the CMakeLists.txt under ``root``."""
    cmake = root / "CMakeLists.txt"
    if not cmake.is_file():
        raise CatalogError(f"{cmake} not found")
    meta = read_cmake_metadata(cmake.read_text(encoding="utf-8"))
    return meta.project, render(catalog_entry(meta, scm_revision))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if the committed entry is stale or fails a check")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this one)")
    ap.add_argument("--scm-revision", default=SCM_REVISION,
                    help="branch or tag the index builds (default: %(default)s)")
    ap.add_argument("--output", type=Path, help="write here instead of <root>/<Name>.json")
    args = ap.parse_args(argv)
    try:
        name, text = expected_text(args.root, args.scm_revision)
    except CatalogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = args.output or args.root / f"{name}.json"
    if path.name != f"{name}.json":
        print(f"error: the index names an extension after its file: call it {name}.json", file=sys.stderr)
        return 2
    if args.check:
        problems = []
        if not path.is_file() or path.read_bytes() != text.encode("utf-8"):
            problems.append(f"{path.name} differs from what {Path(__file__).name} writes from "
                            "CMakeLists.txt; run: python Utilities/extension_catalog.py")
        if path.is_file():
            problems += entry_problems(name, path.read_bytes(), args.root)
    else:
        problems = entry_problems(name, text.encode("utf-8"), args.root)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems or args.check:
        return 1 if problems else 0
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(text.encode("utf-8"))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
