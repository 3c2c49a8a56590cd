"""Engine overhead benchmark: our loop vs ``model.generate`` with no dropping, and V²Drop's scoring share.

    python -m experiments.bench_engine [--model proxy] [--repeats 7] [--threads 2]

Without ``--model`` a random-weight LLaVA (Llama decoder, hidden 512, 12 layers, 576 vision
tokens) is built from a config, so the figures are about the engine, not about a checkpoint.
Runs are interleaved (A, B, A, B, ...) after warm-up and the medians compared: on a CPU,
absolute times are noise and only the ratios measured side by side mean anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image

import v2drop
from v2drop import Method


def random_llava(hidden: int = 512, layers: int = 12, image_size: int = 96, patch: int = 4) -> v2drop.LVLM:
    """A random-weight LLaVA-1.5-shaped model with (image_size/patch)^2 vision tokens and its processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, PreTrainedTokenizerFast)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>"] + [f"w{i}" for i in range(256)] + ["USER:", "ASSISTANT:"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                        extra_special_tokens={"image_token": "<image>"})
    n_vision = (image_size // patch) ** 2
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=image_size, patch_size=patch),
        text_config=LlamaConfig(vocab_size=len(words), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                initializer_range=0.05, pad_token_id=0),
        image_token_index=4, image_seq_length=n_vision,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1,
    )
    return v2drop.LVLM(model, processor, name=f"random-llava-h{hidden}-l{layers}-v{n_vision}")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    """Run the benchmark and print (and return) the ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model name for v2drop.load (default: a random LLaVA built here)")
    parser.add_argument("--preset", default="v2drop-llava15-128", help="V²Drop preset (rescaled to the model's depth)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant, after one warm-up")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens generated per run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (fixed for every run)")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    lvlm = v2drop.load(args.model) if args.model else random_llava()
    lvlm.model.generation_config.eos_token_id = None
    size = getattr(lvlm.processor.image_processor, "crop_size", {"height": 96})["height"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    prompt = lvlm.format_prompt(" ".join(f"w{i}" for i in range(20)))
    inputs = lvlm.prepare([prompt], [image])
    method = Method.from_preset(args.preset, depth=lvlm.depth)
    n = args.new_tokens

    def hf():
        with torch.no_grad():
            lvlm.model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n)

    def ours(m=Method.none()):
        return lvlm.generate_from_inputs(inputs, m, max_new_tokens=n, stop_at_eos=False)

    hf(), ours(), ours(method)  # warm-up
    t_hf, t_ours, prefill_none, prefill_drop, scoring, drop_stage = [], [], [], [], [], []
    for _ in range(args.repeats):
        t_hf.append(_timed(hf))
        t_ours.append(_timed(ours))
        prefill_none.append(ours().prefill_seconds)
        out = ours(method)
        prefill_drop.append(out.prefill_seconds)
        scoring.append(out.scoring_seconds)
        drop_stage.append(out.drop_seconds)
    med = statistics.median
    figures = {
        "model": lvlm.name,
        "depth": lvlm.depth,
        "vision_tokens": int(lvlm.adapter.vision_mask(inputs["input_ids"]).sum()),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "threads": args.threads,
        "repeats": args.repeats,
        "preset": args.preset,
        "schedule_layers": list(method.schedule.layers),
        "engine_over_generate": med(t_ours) / med(t_hf),
        "scoring_share_of_prefill": med(scoring) / med(prefill_drop),
        "drop_stage_share_of_prefill": med(drop_stage) / med(prefill_drop),
        "prefill_speedup_with_dropping": med(prefill_none) / med(prefill_drop),
        "median_seconds": {"generate": med(t_hf), "engine": med(t_ours), "prefill_none": med(prefill_none),
                           "prefill_v2drop": med(prefill_drop), "scoring_v2drop": med(scoring)},
    }
    print(f"model {figures['model']} ({figures['depth']} layers, {figures['vision_tokens']} vision tokens), "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"engine (no dropping) / model.generate, prefill + {n} tokens : {figures['engine_over_generate']:.3f}")
    print(f"V²Drop scoring / prefill ({args.preset})                 : {figures['scoring_share_of_prefill'] * 100:.3f}%")
    print(f"V²Drop whole drop stages (score, select, rebuild) / prefill : {figures['drop_stage_share_of_prefill'] * 100:.3f}%")
    print(f"prefill speedup with V²Drop                              : x{figures['prefill_speedup_with_dropping']:.2f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main()
