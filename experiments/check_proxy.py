"""The proxy's quality and validity bars, measured on the digits test split (see ``experiments.proxy.check``).

    python -m experiments.check_proxy [--model proxy] [--benchmark digits] [--layer 2] [--limit N] [--lookups SCENES]

Four conditions per question, accuracy per family: ``full`` (no dropping), ``no image`` (every
vision token removed before layer 0), ``evidence`` (before ``--layer`` only the question's
evidence tokens kept) and ``random`` (as many random tokens kept). Validity bar: evidence ≥ 95%
of full, and random ≥ 10 points below evidence. Quality bar: full ≥ 90% overall and ≥ 80% in
every family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

import v2drop
from experiments.proxy.check import cell_lookups, check, format_table, lookup_table
from v2drop import checks
from v2drop.benchmarks import get_benchmark
from v2drop.cli import parse_config, run


@dataclass
class CheckProxyConfig:
    """``experiments.check_proxy``'s options."""

    model: str = "proxy"  # bundled name, local directory or hub id
    benchmark: str = "digits"  # registered benchmark
    seed: int | None = None  # the benchmark's seed (digits: another draw of scenes and questions); None = its own
    split: str = "test"  # benchmark split
    layer: int = 2  # drop layer of the evidence and random conditions
    limit: int | None = None  # questions to score; None = the whole split
    threads: int = 2  # torch CPU threads
    # digits: also probe each digit's cell lookup in the training turns' wordings and the ident question,
    # on this many scenes
    lookups: int = 0
    output: str | None = None  # write the table as JSON here

    def __post_init__(self):
        checks.check_int("--limit", self.limit, 1, optional=True)
        checks.check_int("--threads", self.threads, 1)
        checks.check_int("--lookups", self.lookups, 0)
        checks.check_int("--layer", self.layer, 0)


CONFIG = CheckProxyConfig


def main(argv=None) -> dict:
    """Run the four conditions, print the per-family table and the verdict; bad input is a one-line error and exit
    status 2.
    """
    return run(_main, argv)


def _main(argv) -> dict:
    args = parse_config(CheckProxyConfig, argv, __doc__)
    if args.output:
        checks.check_writable(args.output)
    bench = get_benchmark(args.benchmark, seed=args.seed)
    bench.resolve_split(args.split)
    if args.lookups and not (hasattr(bench, "scene") and bench.modality == "image"):
        raise ValueError(f"--lookups needs the digits image benchmark, not {args.benchmark!r}")
    depth = checks.model_depth(args.model)
    if args.layer >= depth:
        raise ValueError(
            f"--layer {args.layer} is past the model's last layer (model {args.model!r} has {depth} layers: "
            f"0..{depth - 1})"
        )
    samples = bench.load(args.split, args.limit)
    torch.set_num_threads(args.threads)
    lvlm = v2drop.load(args.model)
    result = {**check(lvlm, bench, samples, args.layer), "model": args.model}
    print(format_table(result["table"]))
    print(
        "mean change of the vision tokens per decoder layer (‖h_{l+1} − h_l‖, l = 0, 1, ...): "
        + " ".join(f"{c:.1f}" for c in result["layer_changes"])
    )
    if result["ident_by_column_mates"]:
        print(
            "ident, by whether another digit shares the asked column: "
            + ", ".join(
                f"{kind} {v['accuracy']:.3f} (n={v['n']})"
                for kind, v in result["ident_by_column_mates"].items()
                if v["n"]
            )
        )
    if args.lookups:
        result["cell_lookups"] = lookup_table(cell_lookups(lvlm, bench, args.split, args.lookups))
        print(f"next-token cell lookup by wording ({args.lookups} scenes; alone / with a column mate):")
        for wording, kinds in result["cell_lookups"].items():
            print(
                f"  {wording:13s} "
                + "   ".join(f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in kinds.items() if v["n"])
            )
    print(json.dumps(result["verdict"], indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
