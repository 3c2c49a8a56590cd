"""The proxy's quality and validity bars (issue 7), measured on the digits test split.

    python -m experiments.check_proxy [--model proxy] [--benchmark digits] [--layer 2] [--limit N]

Four conditions per question, accuracy per family:
- ``full``: no dropping;
- ``no image``: every vision token removed before layer 0 (should be near chance);
- ``evidence``: before ``--layer`` only the question's ground-truth evidence tokens are kept;
- ``random``: before ``--layer`` the same number of random vision tokens are kept (seeded).
Validity bar: evidence ≥ 95% of full, and random ≥ 10 points below evidence. Quality bar: full
≥ 90% overall and ≥ 80% in every family.
"""

from __future__ import annotations

import argparse
import json

import torch

import v2drop
from v2drop.benchmarks import get_benchmark
from v2drop.proxy import bar_table


def main(argv=None) -> dict:
    """Run the four conditions and print the per-family table and the verdict."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="proxy")
    p.add_argument("--benchmark", default="digits")
    p.add_argument("--split", default="test")
    p.add_argument("--layer", type=int, default=2, help="drop layer of the evidence and random conditions")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lvlm = v2drop.load(args.model)
    bench = get_benchmark(args.benchmark)
    samples = bench.load(args.split, args.limit)
    table = bar_table(lvlm, bench, samples, args.layer, progress=True)
    families = [f for f in next(iter(table.values())) if f != "overall"]
    print(f"{'condition':<12}" + "".join(f"{f:>9}" for f in families + ["overall"]))
    for name, row in table.items():
        print(f"{name:<12}" + "".join(f"{row[f]:>9.3f}" for f in families + ["overall"]))
    full, ev, rnd = table["full"]["overall"], table["evidence"]["overall"], table["random"]["overall"]
    verdict = {
        "quality_overall_ge_0.90": full >= 0.90,
        "quality_every_family_ge_0.80": all(table["full"][f] >= 0.80 for f in families),
        "validity_evidence_ge_95pct_of_full": ev >= 0.95 * full,
        "validity_random_10_points_below_evidence": rnd <= ev - 0.10,
    }
    print(json.dumps(verdict, indent=1))
    result = {"table": table, "verdict": verdict, "layer": args.layer, "n": len(samples), "model": args.model}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
