"""Measured figures live in one place: the README's tables are generated from
``benchmarks/results.json`` and the model cards, and help texts and tooltips state no timings."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import results  # noqa: E402

TIMING = re.compile(r"\b\d+(\.\d+)?\s?(s|seconds|ms)\b")


def test_readme_tables_are_the_results_file():
    readme = results.README.read_text(encoding="utf-8")
    assert readme == results.readme_with_tables(readme, results.load()), (
        "README tables differ from benchmarks/results.json: run "
        "python benchmarks/results.py --write-readme")


def test_every_results_section_is_shown_and_says_where_it_comes_from():
    data = results.load()
    shown = results.sections_in(results.README.read_text(encoding="utf-8"))
    assert set(data) <= set(shown), f"sections not in the README: {set(data) - set(shown)}"
    for name, section in data.items():
        for key in ("source", "measured", "machine", "columns", "rows"):
            assert section.get(key), f"{name} has no {key}"
        assert all(column in results.COLUMNS for column in section["columns"])
        assert all(row.get("label") for row in section["rows"])


def test_a_changed_figure_makes_the_readme_differ():
    readme = results.README.read_text(encoding="utf-8")
    data = results.load()
    data["brain_label_maps"]["rows"][1]["dice"] += 0.01
    assert results.readme_with_tables(readme, data) != readme


def test_a_section_the_file_lacks_is_an_error():
    with pytest.raises(KeyError, match="nowhere"):
        results.readme_with_tables("<!-- results:nowhere -->\n<!-- /results -->", {})


def test_help_texts_and_tooltips_state_no_timings():
    from EOIRRegistrationLib.cli import register, train
    from EOIRRegistrationLib.slicer import texts

    sources = {"eoir-register --help": register.parser().format_help(),
               "eoir-train --help": train.parser().format_help(),
               "Slicer help": texts.HELP_TEXT}
    for name in dir(texts):
        if name.endswith(("_LABELS", "_TIPS")):
            sources[name] = " ".join(getattr(texts, name).values())
    ui = (ROOT / "EOIRRegistration" / "Resources" / "UI" / "EOIRRegistration.ui").read_text()
    sources["panel tooltips"] = " ".join(re.findall(r"<string>(.*?)</string>", ui, re.S))
    found = {name: TIMING.search(text).group(0) for name, text in sources.items()
             if TIMING.search(text)}
    assert not found, f"timings in help texts: {found}"
