"""Paper Fig. 3: each vision token's variation as a heatmap over the image, kept tokens outlined.

    python -m analysis.variation_maps [--model proxy] [--benchmark digits] [--samples 4] [--budget 192]

For a few samples, one row each: the image, then for every V²Drop stage the L2 variation of the
tokens present (a heatmap on the token grid over the image) with the kept tokens outlined; the
question, the reference answer and the answers without and with dropping are in the row title.
"""

from __future__ import annotations

import textwrap
from contextlib import contextmanager
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

from analysis.common import AnalysisConfig, budget_method, check_args, resolve_split, run_dir, save_figure, write_json
from v2drop import checks
from v2drop.cli import parse_config, run
from v2drop.method import Method
from v2drop.scorers.v2drop import V2DropScorer


@contextmanager
def recorded_scores(history: list):
    """While open, every V²Drop score is also appended to ``history`` as (layer, vision-token positions, scores).

    The registered scorer is recorded in place, not subclassed: a ``Method`` only takes registered
    scorer classes, so that every method can be saved and loaded.
    """
    original = V2DropScorer.score

    def score(self, state):
        scores = original(self, state)
        history.append((state.layer_idx, state.orig_idx.gather(1, state.vision_idx)[0].tolist(), scores[0].tolist()))
        return scores

    V2DropScorer.score = score
    try:
        yield history
    finally:
        V2DropScorer.score = original


@dataclass
class VariationMapsConfig(AnalysisConfig):
    """``analysis.variation_maps``'s options."""

    samples: int = 4  # samples plotted, one row each
    budget: int = 192  # paper budget (of 576) of the V²Drop schedule

    def __post_init__(self):
        super().__post_init__()
        checks.check_int("--samples", self.samples, 1)
        checks.check_int("--budget", self.budget, 1)


CONFIG = VariationMapsConfig


def main(argv=None) -> list[dict]:
    """Plot the variation maps of the first ``--samples`` samples."""
    return run(_main, argv)


def _main(argv) -> list[dict]:
    args = parse_config(VariationMapsConfig, argv, __doc__)
    check_args(args, "variation_maps")
    import v2drop
    from v2drop.benchmarks import get_benchmark

    torch.set_num_threads(args.threads)
    out = run_dir("variation_maps", args.output)
    benchmark = get_benchmark(args.benchmark)
    lvlm = v2drop.load(args.model, attn_implementation=args.attn_implementation)
    samples = benchmark.load(resolve_split(args, benchmark), args.limit or args.samples)[: args.samples]
    rows, panels = [], []
    for sample in samples:
        prompt = lvlm.format_prompt(sample.question, n_images=len(sample.images))
        inputs = lvlm.prepare([prompt], [list(sample.images)])
        n_vision = int(lvlm.adapter.vision_mask(inputs["input_ids"]).sum())
        fitted = budget_method("v2drop", args.budget, lvlm.depth, n_vision)
        with recorded_scores([]) as history:
            dropped = lvlm.generate_from_inputs(inputs, Method("v2drop", schedule=fitted.schedule), max_new_tokens=8)
        full = lvlm.generate_from_inputs(inputs, Method.none(), max_new_tokens=8)
        grid = lvlm.adapter.image_grids(inputs)[0]
        vision_pos = lvlm.adapter.vision_mask(inputs["input_ids"])[0].nonzero().flatten().tolist()
        index = {p: k for k, p in enumerate(vision_pos)}
        kept_sets = [set(s["kept"]) for s in dropped.traces[0].stages]
        panels.append((sample, grid, index, history, kept_sets, full.texts[0], dropped.texts[0]))
        rows.append(
            {
                "id": sample.id,
                "question": sample.question,
                "reference": sample.answer,
                "no_drop": full.texts[0],
                "v2drop": dropped.texts[0],
                "stages": [h[0] for h in history],
            }
        )
    n_stages = max(len(p[3]) for p in panels)
    fig, axes = plt.subplots(
        len(panels), n_stages + 1, figsize=(3.2 * (n_stages + 1), 3.4 * len(panels)), squeeze=False
    )
    for row_axes, (sample, (_t, h, w), index, history, kept_sets, ans_full, ans_drop) in zip(axes, panels):
        image = np.asarray(sample.images[0].convert("RGB"))
        row_axes[0].imshow(image)
        question = "\n".join(
            textwrap.wrap(sample.question, 40)
        )  # long multiple-choice questions would run off the figure
        row_axes[0].set_title(f"{question}\nref {sample.answer} | none: {ans_full} | V²Drop: {ans_drop}", fontsize=7)
        for ax, (layer, positions, scores), kept in zip(row_axes[1:], history, kept_sets):
            heat = np.full((h, w), np.nan)
            for pos, score in zip(positions, scores):
                k = index[pos]
                if k < h * w:  # first image / frame only
                    heat[k // w, k % w] = score
            ax.imshow(image, extent=(0, w, h, 0))
            im = ax.imshow(heat, cmap="magma", alpha=0.65, extent=(0, w, h, 0))
            for pos in kept:
                k = index[pos]
                if k < h * w:
                    ax.add_patch(Rectangle((k % w, k // w), 1, 1, fill=False, ec="cyan", lw=0.8))
            ax.set_title(f"variation before layer {layer}: {len(kept)} kept (cyan)", fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046)
        for ax in row_axes:
            ax.axis("off")
    write_json(rows, out / "variation_maps.json")
    save_figure(fig, out, "variation_maps", dpi=110, message=f"wrote {out}/variation_maps.png")
    return rows


if __name__ == "__main__":
    main()
