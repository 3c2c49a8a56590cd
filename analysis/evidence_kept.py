"""Evidence kept: the share of each question's ground-truth evidence tokens that survive, per scorer and budget.

    python -m analysis.evidence_kept [--model proxy] [--benchmark digits] [--limit N]

The direct test of "low variation = unimportant" that a synthetic benchmark makes possible: every
question names the vision tokens covering the objects its answer depends on. Runs the same
methods as ``analysis.method_table`` and reuses its results from the run store (``--store``, default
``runs/store``).
"""

from __future__ import annotations

import matplotlib.pyplot as plt

from analysis.common import AnalysisConfig, read_records, run_methods, save_figure, setup, write_table
from analysis.method_table import methods_at_budgets
from v2drop.cli import parse_config, run
from v2drop.evaluation import vision_index_of


def evidence_shares(records: list[dict], evidence: dict[str, tuple]) -> dict:
    """Evidence kept per sample, averaged: after the first stage, over all layers, after the last stage.

    ``layer_average`` is the share of a question's evidence tokens present in a decoder layer,
    averaged over layers (the evidence analogue of average retained tokens); ``enrichment``
    divides it by the share of all vision tokens retained, so 1.0 means "no better than chance".
    """
    first, layer_avg, last, enrich, per_family = [], [], [], [], {}
    for r in records:
        ev = set(evidence.get(r["id"], ()))
        if not ev or not r["kept"]:
            continue
        index = vision_index_of(r)
        kept = [(s["layer"], {index[p] for p in s["kept"]}) for s in r["kept"]]
        depth = len(r["vision_tokens_per_layer"])
        present = []
        for layer_idx in range(depth):
            now = [k for layer, k in kept if layer <= layer_idx]
            present.append(len(ev & now[-1]) / len(ev) if now else 1.0)
        first.append(len(ev & kept[0][1]) / len(ev))
        last.append(len(ev & kept[-1][1]) / len(ev))
        layer_avg.append(sum(present) / depth)
        enrich.append(layer_avg[-1] / (r["average_vision_tokens"] / r["vision_tokens"]))
        per_family.setdefault(r["family"], []).append(layer_avg[-1])
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "after_first_stage": mean(first),
        "layer_average": mean(layer_avg),
        "enrichment": mean(enrich),
        "after_last_stage": mean(last),
        **{f"layer_average:{f}": mean(v) for f, v in sorted(per_family.items())},
    }


CONFIG = AnalysisConfig  # no options of its own: the methods' runs come from the run store, as method_table's do


def main(argv=None) -> list[dict]:
    """Compute the evidence shares of every method at every budget; write the table and a plot."""
    return run(_main, argv)


def _main(argv) -> list[dict]:
    args = parse_config(CONFIG, argv, __doc__)
    lvlm, benchmark, samples, n_vision, config, out = setup(args, "evidence_kept")
    methods, info = methods_at_budgets(lvlm.depth, n_vision)
    methods.pop("none")
    results = run_methods(lvlm, benchmark, methods, config, samples)
    evidence = {s.id: s.evidence for s in samples}
    rows = [
        {**info[label], "method": label, **evidence_shares(read_records(results[label]), evidence)} for label in methods
    ]
    print(write_table(rows, out / "evidence_kept"))
    fig, ax = plt.subplots(figsize=(8, 4))
    for variant in dict.fromkeys(i["scorer"] for i in info.values()):
        pts = [(str(r["budget"]), r["layer_average"]) for r in rows if r["scorer"] == variant]
        ax.plot(*zip(*pts), marker="o", label=variant)
    ax.set_xlabel("budget (of 576)")
    ax.set_ylabel("share of evidence tokens present (mean over layers)")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, out, "evidence_kept")
    return rows


if __name__ == "__main__":
    main()
