"""Cost of every preset on real 7B models, analytically (published sizes, no weights).

    python -m analysis.real_cost [--output runs/analysis/real_cost] [--text-tokens 64]

For LLaVA-1.5-7B, Qwen2-VL-7B and LLaVA-OneVision-7B, configs are built locally with their
published sizes; for each preset (rescaled to the model's depth; count-based stages turned into the
same shares of the model's vision tokens) we report the average retained vision tokens, prefill
FLOPs (``v2drop.cost``, formula in ``docs/methods.md``) and KV-cache size, each against no dropping.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt

from analysis.common import run_dir
from v2drop import checks
from v2drop.cli import parse_config, run
from v2drop.cost import kv_cache_bytes, method_prefill_flops, prefill_flops
from v2drop.presets import get_preset, list_presets
from v2drop.tables import write_table


@dataclass(frozen=True)
class ModelSize:
    """Published decoder sizes of a real LVLM and the vision tokens of a typical input."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vision_tokens: int
    vision_note: str

    def text_config(self):
        """A transformers config with these sizes (nothing is downloaded or allocated)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
        )


MODELS = [
    # Vicuna-7B decoder; CLIP ViT-L/14 at 336 px gives 24 x 24 = 576 tokens.
    ModelSize("LLaVA-1.5-7B", 32, 4096, 11008, 32, 32, 576, "one 336 px image: 576 tokens"),
    # Qwen2-7B decoder; a 672 x 672 image gives 48 x 48 patches of 14 px, merged 2 x 2 = 576 tokens.
    ModelSize("Qwen2-VL-7B", 28, 3584, 18944, 28, 4, 576, "one 672 px image: 576 tokens"),
    # Qwen2-7B decoder; 32 video frames of 196 tokens each (lmms-eval's MVBench setting).
    ModelSize("LLaVA-OneVision-7B", 28, 3584, 18944, 28, 4, 32 * 196, "32 video frames: 6,272 tokens"),
]


def cost_rows(model: ModelSize, text_tokens: int, presets: list[str]) -> list[dict]:
    """One row per preset (plus no dropping) with tokens, FLOPs and KV cache against no dropping."""
    cfg = model.text_config()
    full_tokens = [text_tokens + model.vision_tokens] * model.layers
    base_flops = prefill_flops(cfg, full_tokens)
    base_kv = kv_cache_bytes(cfg, full_tokens)
    rows = [
        {
            "model": model.name,
            "preset": "none",
            "layers": "-",
            "avg_vision_tokens": float(model.vision_tokens),
            "kept_share": 1.0,
            "tflops": base_flops / 1e12,
            "flops_ratio": 1.0,
            "kv_cache_mb": base_kv / 2**20,
            "kv_ratio": 1.0,
        }
    ]
    for name in presets:
        preset = get_preset(name)
        method = preset.method(depth=model.layers)
        schedule = method.schedule
        if schedule.keep_mode == "absolute" and model.vision_tokens != preset.reference_vision_tokens:
            # counts were set for the preset's tokens: keep the same shares, or 98 kept of 6,272 would pass for "128"
            schedule = schedule.to_cumulative(preset.reference_vision_tokens)
        per_layer = schedule.tokens_per_layer(model.layers, model.vision_tokens)
        flops = method_prefill_flops(cfg, text_tokens, model.vision_tokens, per_layer, schedule.layers, method.scorer)
        kv = kv_cache_bytes(cfg, [text_tokens + v for v in per_layer])
        avg = sum(per_layer) / model.layers
        rows.append(
            {
                "model": model.name,
                "preset": name,
                "layers": "/".join(map(str, schedule.layers)),
                "avg_vision_tokens": avg,
                "kept_share": avg / model.vision_tokens,
                "tflops": flops / 1e12,
                "flops_ratio": flops / base_flops,
                "kv_cache_mb": kv / 2**20,
                "kv_ratio": kv / base_kv,
            }
        )
    return rows


@dataclass
class RealCostConfig:
    """``analysis.real_cost``'s options."""

    output: str | None = None  # output directory; None = runs/analysis/real_cost
    text_tokens: int = 64  # text tokens in the prompt besides the vision tokens
    presets: list[str] | None = None  # preset names; None = all

    def __post_init__(self):
        checks.check_int("--text-tokens", self.text_tokens, 0)


CONFIG = RealCostConfig


def main(argv=None) -> list[dict]:
    """Compute the table for every model and preset; write CSV, markdown and a PNG."""
    return run(_main, argv)


def _main(argv) -> list[dict]:
    args = parse_config(RealCostConfig, argv, __doc__)
    if args.presets:
        checks.check_presets(args.presets, "--presets")
    checks.check_writable(args.output or "runs/analysis/real_cost", directory=True)
    out = run_dir("real_cost", args.output)
    presets = args.presets or list_presets()
    rows = [r for m in MODELS for r in cost_rows(m, args.text_tokens, presets)]
    markdown = write_table(
        rows,
        out / "real_cost",
        [
            "model",
            "preset",
            "layers",
            "avg_vision_tokens",
            "kept_share",
            "tflops",
            "flops_ratio",
            "kv_cache_mb",
            "kv_ratio",
        ],
    )
    print("\n".join(f"{m.name}: {m.vision_note}, {m.layers} layers" for m in MODELS))
    print(markdown)

    fig, axes = plt.subplots(1, len(MODELS), figsize=(5 * len(MODELS), 4 + 0.18 * len(presets)), sharey=True)
    for ax, model in zip(axes, MODELS):
        mine = [r for r in rows if r["model"] == model.name]
        y = range(len(mine))
        ax.barh([i - 0.2 for i in y], [r["flops_ratio"] for r in mine], height=0.4, label="FLOPs")
        ax.barh([i + 0.2 for i in y], [r["kv_ratio"] for r in mine], height=0.4, label="KV cache")
        ax.set_yticks(list(y), [r["preset"] for r in mine], fontsize=7)
        ax.set_title(f"{model.name}\n{model.vision_note}", fontsize=9)
        ax.set_xlabel("share of no dropping")
        ax.axvline(1.0, color="grey", lw=0.5)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "real_cost.png", dpi=120)
    print(f"wrote {out}/real_cost.csv, .md, .png")
    return rows


if __name__ == "__main__":
    main()
