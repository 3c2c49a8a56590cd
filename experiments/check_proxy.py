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
from dataclasses import dataclass

import torch
from tqdm import tqdm

import v2drop
from v2drop import Method, Schedule, Scorer
from v2drop.benchmarks import get_benchmark


@dataclass
class KeepGiven(Scorer):
    """Scores 1 for the given vision-token indices, 0 elsewhere (an oracle; not registered)."""

    keep: tuple = ()

    def score(self, state):
        scores = torch.zeros(state.vision_idx.shape, dtype=torch.float32)
        index = torch.tensor([k for k in self.keep if k < scores.shape[1]], dtype=torch.long)
        scores[:, index] = 1.0
        return scores


def conditions(sample, layer: int) -> dict[str, Method]:
    """The four methods for one sample."""
    n = len(sample.evidence)
    return {
        "full": Method.none(),
        "no image": Method("random", schedule=Schedule.one_shot(0, 0.0, min_keep=0)),
        "evidence": Method(KeepGiven(keep=tuple(sample.evidence)), schedule=Schedule.one_shot(layer, n, keep_mode="absolute", min_keep=0)),
        "random": Method("random", schedule=Schedule.one_shot(layer, n, keep_mode="absolute", min_keep=0)),
    }


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
    correct: dict[str, dict[str, list[bool]]] = {}
    for sample in tqdm(samples, desc="check"):
        prompt = lvlm.format_prompt(sample.question, n_images=len(sample.images))
        inputs = lvlm.prepare([prompt], [list(sample.images)])
        for name, method in conditions(sample, args.layer).items():
            text = lvlm.generate_from_inputs(inputs, method, max_new_tokens=4).texts[0]
            correct.setdefault(name, {}).setdefault(sample.family, []).append(bench.is_correct(text, sample))
    families = sorted({s.family for s in samples})
    table = {name: {f: sum(v[f]) / len(v[f]) for f in families} for name, v in correct.items()}
    for name, v in correct.items():
        table[name]["overall"] = sum(sum(x) for x in v.values()) / sum(len(x) for x in v.values())
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
