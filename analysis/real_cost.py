"""Cost of every preset on the real checkpoints of every supported family, analytically (published sizes, no weights).

    python -m analysis.real_cost [--output runs/analysis/real_cost] [--text-tokens 64]

``MODELS`` lists one real checkpoint per family: its published decoder sizes and a typical input.
The input's vision tokens are counted by the family's real preprocessing
(``v2drop.testing.build_real``: the checkpoint's processor geometry on tiny weights), so a family
appears once it has a ``build_real`` builder. For each preset (rescaled to the model's depth;
count-based stages turned into the same shares of the model's vision tokens) we report the average
retained vision tokens, prefill FLOPs (``v2drop.cost``, formula in ``docs/methods.md``) and
KV-cache size, each against no dropping.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import matplotlib.pyplot as plt

from analysis.common import run_dir
from v2drop import checks
from v2drop.cli import parse_config, run
from v2drop.cost import kv_cache_bytes, method_prefill_flops, prefill_flops
from v2drop.presets import get_preset, list_presets
from v2drop.tables import markdown_table, write_table


@dataclass(frozen=True)
class ModelSize:
    """A real checkpoint: its family, published decoder sizes and the typical input its vision tokens come from."""

    family: str  # the ``config.model_type`` (a family of ``v2drop.testing.FAMILIES`` once it has a builder)
    checkpoint: str  # hub id
    name: str  # short name for tables
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int | None = None  # None: hidden // heads
    image: int = 672  # side of the one square image of the typical input (0: a video instead)
    video_frames: int = 0  # frames of the typical video clip (with ``image`` 0)
    frame_size: int = 384  # side of each square video frame

    def text_config(self):
        """A transformers config with these sizes (nothing is downloaded or allocated)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim or self.hidden // self.heads,
        )

    @property
    def vision_tokens(self) -> int:
        """Vision tokens of the typical input under the family's real preprocessing (``count_vision_tokens``)."""
        return count_vision_tokens(self.family, self.image, self.video_frames, self.frame_size)

    @property
    def input_note(self) -> str:
        """The typical input in words, with its vision tokens."""
        what = (
            f"one {self.image} px image" if self.image else f"{self.video_frames} video frames of {self.frame_size} px"
        )
        return f"{what}: {self.vision_tokens:,} tokens"


MODELS = [
    # Vicuna-7B decoder; CLIP ViT-L/14 at 336 px: every image is resized to 24 x 24 = 576 tokens.
    ModelSize("llava", "llava-hf/llava-1.5-7b-hf", "LLaVA-1.5-7B", 32, 4096, 11008, 32, 32),
    # Vicuna-7B decoder; anyres: a 672 px image is the 336 px base view plus 2 x 2 tiles with a newline per row.
    ModelSize("llava_next", "llava-hf/llava-v1.6-vicuna-7b-hf", "LLaVA-NeXT-7B", 32, 4096, 11008, 32, 32),
    # Qwen2-7B decoder; 32 video frames of 196 tokens each plus one newline (lmms-eval's MVBench setting).
    ModelSize(
        "llava_onevision",
        "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        "LLaVA-OneVision-7B",
        28,
        3584,
        18944,
        28,
        4,
        image=0,
        video_frames=32,
    ),
    # Qwen2-7B decoder; a 672 px image is 48 x 48 patches of 14 px, merged 2 x 2.
    ModelSize("qwen2_vl", "Qwen/Qwen2-VL-7B-Instruct", "Qwen2-VL-7B", 28, 3584, 18944, 28, 4),
    # Qwen2.5-7B decoder (the same sizes); the same patches and merge as Qwen2-VL.
    ModelSize("qwen2_5_vl", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL-7B", 28, 3584, 18944, 28, 4),
    # Qwen3-8B decoder (head_dim 128); patches of 16 px merged 2 x 2: a 672 px image is 21 x 21 tokens.
    ModelSize("qwen3_vl", "Qwen/Qwen3-VL-8B-Instruct", "Qwen3-VL-8B", 36, 4096, 12288, 32, 8, head_dim=128),
    # Qwen3-30B-A3B decoder (head_dim 128): every layer's MLP is 128 experts of width 768, 8 routed a token, so the
    # active MLP width is 8 x 768 = 6,144 (the router's 2,048 x 128 is left out); Qwen3-VL-8B's vision geometry.
    ModelSize(
        "qwen3_vl_moe", "Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen3-VL-30B-A3B", 48, 2048, 8 * 768, 32, 4, head_dim=128
    ),
    # Qwen2.5-7B decoder; a 672 px image is 2 x 2 tiles of 448 px plus a thumbnail, 256 tokens each.
    ModelSize("internvl", "OpenGVLab/InternVL3-8B-hf", "InternVL3-8B", 28, 3584, 18944, 28, 4),
    # Gemma-3-4B decoder (head_dim 256; 5 of every 6 layers attend within a 1,024-token window, so below
    # 1,024 tokens the count is exact); SigLIP at 896 px pooled to 256 tokens an image, whatever its size.
    ModelSize("gemma3", "google/gemma-3-4b-it", "Gemma-3-4B", 34, 2560, 10240, 8, 4, head_dim=256),
]


@functools.cache
def count_vision_tokens(family: str, image: int, video_frames: int = 0, frame_size: int = 384) -> int:
    """Vision tokens of one ``image``-pixel square image (or ``video_frames`` frames of ``frame_size`` pixels, with
    ``image`` 0) under ``family``'s real preprocessing: ``build_real``'s processor, no model is run."""
    from v2drop import testing

    lvlm = testing.build_real(family)
    if image:
        inputs = lvlm.prepare([lvlm.format_prompt("what ?")], [testing.photo(0, image, image)])
    else:
        token = lvlm.processor.video_token
        frames = testing.video_frames(0, video_frames, frame_size, frame_size)
        inputs = lvlm.prepare([f"USER: {token}\nwhat ? ASSISTANT:"], videos=[frames])
    return int(lvlm.adapter.vision_mask(inputs["input_ids"]).sum())


def available_models(models: list[ModelSize] = MODELS) -> list[ModelSize]:
    """The models whose family has a ``build_real`` builder (``v2drop.testing.FAMILIES``)."""
    from v2drop.testing import FAMILIES

    return [m for m in models if m.family in FAMILIES]


def cost_rows(model: ModelSize, text_tokens: int, presets: list[str]) -> list[dict]:
    """One row per preset (plus no dropping) with tokens, FLOPs and KV cache against no dropping."""
    cfg = model.text_config()
    vision_tokens = model.vision_tokens
    full_tokens = [text_tokens + vision_tokens] * model.layers
    base_flops = prefill_flops(cfg, full_tokens)
    base_kv = kv_cache_bytes(cfg, full_tokens)
    rows = [
        {
            "model": model.name,
            "preset": "none",
            "layers": "-",
            "avg_vision_tokens": float(vision_tokens),
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
        if schedule.keep_mode == "absolute" and vision_tokens != preset.reference_vision_tokens:
            # counts were set for the preset's tokens: keep the same shares, or 98 kept of 6,272 would pass for "128"
            schedule = schedule.to_cumulative(preset.reference_vision_tokens)
        per_layer = schedule.tokens_per_layer(model.layers, vision_tokens)
        flops = method_prefill_flops(cfg, text_tokens, vision_tokens, per_layer, schedule.layers, method.scorer)
        kv = kv_cache_bytes(cfg, [text_tokens + v for v in per_layer])
        avg = sum(per_layer) / model.layers
        rows.append(
            {
                "model": model.name,
                "preset": name,
                "layers": "/".join(map(str, schedule.layers)),
                "avg_vision_tokens": avg,
                "kept_share": avg / vision_tokens,
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


COLUMNS = [
    "model",
    "preset",
    "layers",
    "avg_vision_tokens",
    "kept_share",
    "tflops",
    "flops_ratio",
    "kv_cache_mb",
    "kv_ratio",
]


def _main(argv) -> list[dict]:
    args = parse_config(RealCostConfig, argv, __doc__)
    if args.presets:
        checks.check_presets(args.presets, "--presets")
    checks.check_writable(args.output or "runs/analysis/real_cost", directory=True)
    out = run_dir("real_cost", args.output)
    presets = args.presets or list_presets()
    models = available_models()
    for model in MODELS:
        if model not in models:
            print(f"{model.name} ({model.checkpoint}): skipped, family {model.family!r} has no build_real builder yet")
    rows = [r for m in models for r in cost_rows(m, args.text_tokens, presets)]
    write_table(rows, out / "real_cost", COLUMNS)
    for model in models:  # one table per model, under a caption naming the checkpoint and its input
        print(f"## {model.name} ({model.checkpoint}): {model.layers} layers, {model.input_note}\n")
        print(markdown_table([r for r in rows if r["model"] == model.name], COLUMNS[1:]))

    cols = min(4, len(models))
    fig, axes = plt.subplots(
        math.ceil(len(models) / cols),
        cols,
        figsize=(5 * cols, (4 + 0.18 * len(presets)) * math.ceil(len(models) / cols)),
        sharey=True,
        squeeze=False,
    )
    for ax, model in zip(axes.flat, models):
        mine = [r for r in rows if r["model"] == model.name]
        y = range(len(mine))
        ax.barh([i - 0.2 for i in y], [r["flops_ratio"] for r in mine], height=0.4, label="FLOPs")
        ax.barh([i + 0.2 for i in y], [r["kv_ratio"] for r in mine], height=0.4, label="KV cache")
        ax.set_yticks(list(y), [r["preset"] for r in mine], fontsize=7)
        ax.set_title(f"{model.name}\n{model.input_note}", fontsize=9)
        ax.set_xlabel("share of no dropping")
        ax.axvline(1.0, color="grey", lw=0.5)
    for ax in list(axes.flat)[len(models) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "real_cost.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out}/real_cost.csv, .md, .png")
    return rows


if __name__ == "__main__":
    main()
