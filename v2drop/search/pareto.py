"""Pareto filtering: the one implementation the sweep and the analysis scripts share."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_indices(values: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the non-dominated rows of ``values`` (``directions`` per column: maximize / minimize).

    A row is dominated when another is at least as good in every column and better in one; equal
    rows are all kept.
    """
    for d in directions:
        if d not in ("maximize", "minimize"):
            raise ValueError(f"a direction is 'maximize' or 'minimize', got {d!r}")
    signed = [[v if d == "minimize" else -v for v, d in zip(row, directions)] for row in values]
    front = []
    for i, a in enumerate(signed):
        dominated = any(
            all(x <= y for x, y in zip(b, a)) and any(x < y for x, y in zip(b, a))
            for j, b in enumerate(signed)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front
