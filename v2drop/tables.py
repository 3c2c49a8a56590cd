"""Result tables: CSV for machines, markdown for people."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def write_csv(rows: Sequence[dict], path: str | Path, columns: Sequence[str] | None = None) -> None:
    """Write ``rows`` as CSV; columns default to every key in order of first appearance."""
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = "{:.4g}") -> str:
    """``rows`` as a markdown table (floats with ``floatfmt``, None as empty)."""
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: floatfmt.format(v) if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(
    rows: Sequence[dict], path_stem: str | Path, columns: Sequence[str] | None = None, floatfmt: str = "{:.4g}"
) -> str:
    """Write ``rows`` as ``<stem>.csv`` and ``<stem>.md``; return the markdown."""
    path_stem = Path(path_stem)
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    write_csv(rows, path_stem.with_suffix(".csv"), columns)
    markdown = markdown_table(rows, columns, floatfmt)
    path_stem.with_suffix(".md").write_text(markdown)
    return markdown
