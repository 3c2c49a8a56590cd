"""Shared helpers for the analysis commands: run directories and table output (CSV, markdown, PNG)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display


def run_dir(name: str, root: str | Path | None = None) -> Path:
    """``runs/analysis/<name>`` (or ``root``), created."""
    path = Path(root) if root else Path("runs") / "analysis" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_table(rows: Sequence[dict], path_stem: Path, columns: Sequence[str] | None = None, floatfmt: str = "{:.4g}") -> str:
    """Write ``rows`` as ``<stem>.csv`` and ``<stem>.md``; return the markdown."""
    columns = list(columns or (rows[0].keys() if rows else []))
    with open(path_stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: floatfmt.format(v) if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    path_stem.with_suffix(".md").write_text(markdown)
    return markdown


def write_json(data, path: Path) -> None:
    """Pretty JSON."""
    path.write_text(json.dumps(data, indent=2, default=str))
