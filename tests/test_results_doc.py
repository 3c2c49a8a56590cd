"""docs/results.md names the command of every table, and `python -m analysis.results` writes such a file."""

import re
from pathlib import Path

import pytest

from analysis import results

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"^`python -m [\w.]+[^`]*`$")


def tables_without_command(text: str) -> list[int]:
    """Line numbers of tables with no `python -m ...` line between their heading and their first row."""
    bad, seen_command, previous = [], False, ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            seen_command = False
        elif COMMAND.match(line.strip()):
            seen_command = True
        elif line.startswith("|") and not previous.startswith("|") and not seen_command:
            bad.append(number)
        previous = line
    return bad


def test_every_table_of_results_md_names_its_command():
    text = (ROOT / "docs" / "results.md").read_text()
    assert text.count("\n|") > 20  # the file has its tables
    assert tables_without_command(text) == []
    assert results.check(text, results.SECTIONS) == []  # and every section is in it
    for section in results.SECTIONS:
        assert f"## {section.title}\n" in text


def test_check_finds_a_table_without_command():
    text = "## A\n\n`python -m analysis.real_cost`\n\n| a |\n|---|\n| 1 |\n\n## B\n\nprose\n\n| b |\n|---|\n| 2 |\n"
    assert tables_without_command(text) == [13]
    assert len(results.check(text)) == 1 and "'## B'" in results.check(text)[0]


def test_check_command_fails_on_a_table_without_command(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("# Results\n\n## A\n\n| a |\n|---|\n| 1 |\n")
    with pytest.raises(SystemExit) as exit_info:
        results.main(["--check", "--output", str(path)])
    assert exit_info.value.code == 1


@pytest.mark.slow
def test_results_writes_one_cheap_section(tmp_path, monkeypatch):
    """One section of two commands (the bundled proxy on 3 questions, and an analytic table) is run and
    written under its heading; the other section is kept as the file had it."""
    cheap = results.Section(
        "cheap",
        "Cheap section",
        "The proxy's bars on three questions, and the analytic cost table.",
        (
            ("experiments.check_proxy", "--limit", "3"),
            ("analysis.real_cost", "--out", str(tmp_path / "real_cost")),
        ),
        lambda value, printed: (
            results.proxy_check(value, printed) if isinstance(value, dict) else results.printed_tables(value, printed)
        ),
    )
    kept = results.Section("kept", "Kept section", "Not rerun.", (("analysis.pareto",),))
    monkeypatch.setattr(results, "SECTIONS", [cheap, kept])
    out = tmp_path / "results.md"
    out.write_text("# Old\n\n## Kept section\n\nNot rerun.\n\n`python -m analysis.pareto`\n\n| x |\n|---|\n| 7 |\n")

    results.main(["--only", "cheap", "--output", str(out)])

    text = out.read_text()
    assert text.startswith(results.HEADER)
    blocks = results.split_sections(text)
    assert list(blocks) == ["Cheap section", "Kept section"]
    assert blocks["Kept section"].endswith("| x |\n|---|\n| 7 |\n")  # untouched
    cheap_text = blocks["Cheap section"]
    lines = cheap_text.splitlines()
    first = lines.index("`python -m experiments.check_proxy --limit 3`")
    second = lines.index(f"`python -m analysis.real_cost --out {tmp_path / 'real_cost'}`")
    assert first < second
    assert lines[first + 2].startswith("Ran on ") and "torch threads: " in lines[first + 2]
    header = next(line for line in lines[first:second] if line.startswith("| condition |"))
    assert header.endswith("| overall |")  # one column per family present, then overall
    assert any(line.startswith("| full | ") for line in lines[first:second])
    assert any(line.startswith("| preset |") or line.startswith("| model |") for line in lines[second:])
    assert tables_without_command(text) == []
    results.main(["--check", "--output", str(out)])  # the written file passes its own check
