"""Paper appendix D: which parts of the vision-token sequence each scorer keeps.

    python -m analysis.positional_bias [--model proxy] [--benchmark digits] [--limit N] [--keep 0.5]

Every scorer drops half of the vision tokens at one layer (the paper's layer 3 of 32, moved to
the model's depth); the vision tokens are split into 10 index intervals and we report how often
each interval's tokens are kept. Attention scorers favour the last intervals; a position-free
scorer is flat at the keep fraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt

from analysis.common import AnalysisConfig, read_records, run_methods, save_figure, setup, write_table
from v2drop import checks
from v2drop.cli import parse_config, run
from v2drop.evaluation import vision_index_of
from v2drop.method import Method
from v2drop.schedule import Schedule
from v2drop.scorers import list_scorers

BINS = 10


def interval_keep_rates(records: list[dict], bins: int = BINS) -> list[float]:
    """Share of vision tokens kept at the first stage, per index interval (equal tenths of each sample's tokens)."""
    kept_count, total = [0] * bins, [0] * bins
    for r in records:
        index = vision_index_of(r)
        n = len(index)
        kept = {index[p] for p in r["kept"][0]["kept"]} if r["kept"] else set(range(n))
        for k in range(n):
            b = min(bins - 1, k * bins // n)
            total[b] += 1
            kept_count[b] += k in kept
    return [c / t if t else 0.0 for c, t in zip(kept_count, total)]


@dataclass
class PositionalBiasConfig(AnalysisConfig):
    """``analysis.positional_bias``'s options."""

    keep: float = 0.5  # fraction of vision tokens kept at the stage
    layer: int | None = None  # stage layer; None = 3 of 32 moved to the model's depth

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"--keep must be a fraction in (0, 1], got {self.keep!r}")
        checks.check_int("--layer", self.layer, 0, optional=True)


CONFIG = PositionalBiasConfig


def main(argv=None) -> list[dict]:
    """Run every registered scorer with one 50% stage and write the table and a plot."""
    return run(_main, argv)


def _main(argv) -> list[dict]:
    args = parse_config(PositionalBiasConfig, argv, __doc__)
    if args.layer is not None:
        depth = checks.model_depth(args.model)
        if args.layer >= depth:
            raise ValueError(
                f"--layer {args.layer} is past the model's last layer (model {args.model!r} has {depth} layers: "
                f"0..{depth - 1})"
            )
    lvlm, benchmark, samples, n_vision, config, out = setup(args, "positional_bias")
    layer = args.layer if args.layer is not None else max(1, round(3 * lvlm.depth / 32))
    schedule = Schedule.one_shot(layer, args.keep)
    # V²Drop first (the method under study), then every other registered scorer.
    names = sorted(list_scorers(), key=lambda name: name != "v2drop")
    methods = {name: Method(name, schedule=schedule) for name in names}
    results = run_methods(lvlm, benchmark, methods, config, samples)
    rows = []
    for name in methods:
        rates = interval_keep_rates(read_records(results[name]))
        rows.append({"scorer": name, **{f"{10 * i}-{10 * (i + 1)}%": rate for i, rate in enumerate(rates)}})
    print(f"drop {1 - args.keep:.0%} before layer {layer} of {lvlm.depth}; keep rate per vision-token index interval")
    print(write_table(rows, out / "positional_bias"))
    fig, ax = plt.subplots(figsize=(8, 4))
    for row in rows:
        ax.plot(range(1, BINS + 1), [v for k, v in row.items() if k != "scorer"], marker="o", label=row["scorer"])
    ax.set_xticks(range(1, BINS + 1))
    ax.set_xlabel("vision-token index interval (tenths, first to last)")
    ax.set_ylabel("share kept")
    ax.axhline(args.keep, color="grey", lw=0.5, ls="--")
    ax.legend(fontsize=8)
    ax.set_title(f"positional bias: keep {args.keep:.0%} at layer {layer} ({lvlm.name})")
    save_figure(fig, out, "positional_bias")
    return rows


if __name__ == "__main__":
    main()
