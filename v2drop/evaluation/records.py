"""Per-sample records: JSONL reading and appending, traces, and vision-token positions."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path


def read_records(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file; a torn last line (a process killed mid-write) is skipped with a warning.

    Any other line that is not a JSON object is an error naming the file and the line: nothing is
    dropped silently, and the caller, which rewrites the file only after reading it, leaves it as it is.
    """
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    torn = lines[-1] if lines[-1].strip() else None  # no newline after the last line: written in part
    out = []
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            record = None
        if not isinstance(record, dict):
            text = line[:80].decode("utf-8", "replace")
            raise ValueError(
                f"{path}, line {number} is not a JSON record: {text!r}; mend or delete that line and run again "
                "(the file is left as it is)"
            )
        out.append(record)
    if torn is not None:
        try:
            record = json.loads(torn)
        except ValueError:
            record = None
        if isinstance(record, dict):  # a whole record missing only its newline
            out.append(record)
        else:
            warnings.warn(
                f"{path}, line {len(lines)}: a torn last line (a run killed while writing it) is skipped",
                stacklevel=2,
            )
    return out


def write_records(records: Iterable[dict], path: str | os.PathLike) -> None:
    """Replace ``path`` with ``records``, one JSON object per line."""
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in records))


def append_records(records: Iterable[dict], path: str | os.PathLike) -> None:
    """Append ``records`` to ``path`` and flush them to disk (so a killed run keeps what finished)."""
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def repair_tail(path: str | os.PathLike) -> None:
    """Make ``path`` end with a whole line before appending: a torn last line (a process killed
    mid-write) is cut off, a last record missing only its newline gets one.

    Either way ``read_records`` reads the same records before and after, so another rank reading
    the file meanwhile sees what this one sees.
    """
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
        whole = True
    except ValueError:  # JSONDecodeError and UnicodeDecodeError (a multi-byte character cut in half)
        whole = False
    with open(path, "r+b") as f:
        if whole:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())


def write_trace(records_path: str | os.PathLike, trace_path: str | os.PathLike) -> None:
    """Each record's kept vision positions per stage and tokens per layer, as JSONL."""
    with open(trace_path, "w") as f:
        for r in read_records(records_path):
            f.write(
                json.dumps(
                    {"id": r["id"], "stages": r["kept"], "vision_tokens_per_layer": r["vision_tokens_per_layer"]}
                )
                + "\n"
            )


def vision_runs(vision_mask: list[bool]) -> list[list[int]]:
    """[start, length] of each run of vision tokens in a prompt: maps vision-token index <-> prompt position."""
    runs: list[list[int]] = []
    for pos, is_vision in enumerate(vision_mask):
        if is_vision and runs and runs[-1][0] + runs[-1][1] == pos:
            runs[-1][1] += 1
        elif is_vision:
            runs.append([pos, 1])
    return runs


def vision_index_of(record: dict) -> dict[int, int]:
    """Prompt position -> vision-token index (0-based over the sample's vision tokens) for a record."""
    out, k = {}, 0
    for start, length in record["vision_runs"]:
        for pos in range(start, start + length):
            out[pos] = k
            k += 1
    return out
