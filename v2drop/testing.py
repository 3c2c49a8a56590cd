"""Tiny random-initialised LVLMs of every supported family, built from configs (no downloads).

Used by the test suite and by the engine benchmarks (``random_llava``). Nothing here trains.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_clip_size
from transformers.video_processing_utils import BaseVideoProcessor, VideoProcessorMixin
from transformers.video_utils import default_sample_indices_fn

from v2drop.benchmarks import Benchmark, Sample
from v2drop.lvlm import LVLM
from v2drop.models.internvl_processor import InternVLProcessorLite
from v2drop.models.qwen2vl_processor import QwenProcessorLite
from v2drop.models.qwen3vl_processor import Qwen3ProcessorLite

WORDS = "USER: ASSISTANT: what is the digit colour how many in row column yes no a b c d red green blue white".split()
SPECIALS = [
    "<pad>",
    "<unk>",
    "<s>",
    "</s>",
    "<image>",
    "<video>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
]
DEPTH = 6
FAMILIES = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
    "gemma3",
    "qwen3_vl_moe",
)
INTERNVL_SPECIALS = ["<img>", "</img>", "<IMG_CONTEXT>"]  # InternVL3's image start, end and context tokens
GEMMA3_SPECIALS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]  # Gemma 3's boi, eoi, image tokens

__all__ = [
    "DEPTH",
    "FAMILIES",
    "SPECIALS",
    "WORDS",
    "EchoBench",
    "Item",
    "PlaceholderProcessor",
    "batch_for",
    "build",
    "image",
    "prompt_for",
    "random_llava",
    "tokenizer",
    "word_tokenizer",
    "REAL_GEOMETRY",
    "internvl_tokenizer",
    "gemma3_tokenizer",
    "build_real",
    "photo",
    "video_frames",
    "textvqa_copy",
    "ReferenceVideoProcessor",
    "reference_processor",
    "Qwen3ReferenceVideoProcessor",
]


def word_tokenizer(
    words: Sequence[str], split_punctuation: bool = True, special: Sequence[str] = (), named: dict | None = None
) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over ``words`` (which must hold ``<pad>``, ``<unk>``, ``<s>``, ``</s>``, ``<image>``).

    ``named`` adds named special tokens (``extra_special_tokens``, e.g. InternVL's ``context_image_token``).
    """
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(words)}, unk_token="<unk>"))
    splitters = [pre_tokenizers.WhitespaceSplit()] + ([pre_tokenizers.Punctuation()] if split_punctuation else [])
    tok.pre_tokenizer = pre_tokenizers.Sequence(splitters) if len(splitters) > 1 else splitters[0]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>", **(named or {})},
    )
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    return fast


def tokenizer() -> PreTrainedTokenizerFast:
    """The tiny models' tokenizer: a few words, digits and the placeholder tokens of every family."""
    return word_tokenizer(SPECIALS + WORDS + [str(d) for d in range(10)] + ["?", "."], special=SPECIALS[4:])


def internvl_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer plus InternVL3's ``<img>``, ``</img>``, ``<IMG_CONTEXT>``, named as the real one's."""
    names = ("start_image_token", "end_image_token", "context_image_token")
    return word_tokenizer(
        SPECIALS + INTERNVL_SPECIALS + WORDS + [str(d) for d in range(10)] + ["?", "."],
        special=SPECIALS[4:] + INTERNVL_SPECIALS,
        named={**dict(zip(names, INTERNVL_SPECIALS)), "video_token": "<video>"},
    )


def gemma3_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer plus Gemma 3's ``<start_of_image>``, ``<end_of_image>``, ``<image_soft_token>``, named as the
    real one's (``boi_token``, ``eoi_token``, ``image_token``)."""
    return word_tokenizer(
        SPECIALS + GEMMA3_SPECIALS + WORDS + [str(d) for d in range(10)] + ["?", "."],
        special=SPECIALS[4:] + GEMMA3_SPECIALS,
        named=dict(zip(("boi_token", "eoi_token", "image_token"), GEMMA3_SPECIALS)),
    )


def _gemma3(image: int, patch: int, per_image: int, window: int, local_per_global: int, attn: str | None) -> LVLM:
    """A Gemma 3 model (SigLIP tower of 2 layers, width 32; a ``DEPTH``-layer Gemma 3 decoder of width 64 with
    ``local_per_global`` sliding-window layers of ``window`` before each global one, global RoPE linearly scaled by 8
    as gemma-3-4b-it's) and transformers' own ``Gemma3Processor`` (it needs no torchvision); ``image``-pixel inputs in
    ``patch``-pixel patches, pooled to ``per_image`` tokens. Built from the current RNG; the projector (zero at
    initialisation) is drawn at random too."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.gemma3.processing_gemma3 import Gemma3Processor

    tok = gemma3_tokenizer()
    period = local_per_global + 1
    text = dict(
        model_type="gemma3_text",
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=DEPTH,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=window,
        layer_types=["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(DEPTH)],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        max_position_embeddings=16384,
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image,
        patch_size=patch,
        vision_use_head=False,
    )
    ids = [tok.convert_tokens_to_ids(t) for t in GEMMA3_SPECIALS]
    cfg = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=per_image,
        boi_token_index=ids[0],
        eoi_token_index=ids[1],
        image_token_index=ids[2],
        tie_word_embeddings=False,  # a head of its own: tied to the scaled embeddings, greedy tokens echo the input
    )
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    image_processor = Gemma3ImageProcessorPil(size={"height": image, "width": image}, **_HALF)
    proc = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=per_image)
    return _ready(model, proc, f"gemma3-{image}px-window{window}", attn)


# InternVL3-8B-hf's image processor: ImageNet mean and std, 1..12 tiles plus a thumbnail
_IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def _internvl(tile: int, patch: int, max_tiles: int, max_positions: int, attn: str | None) -> LVLM:
    """An InternVL3 model (InternViT tower of 2 layers, width 32; Qwen2 decoder as ``build``'s) and its stand-in
    processor; tiles of ``tile`` pixels in ``patch``-pixel patches, pixel shuffle 0.5; built from the current RNG."""
    tok = internvl_tokenizer()
    per_tile = (tile // patch // 2) ** 2
    text = dict(
        model_type="qwen2",
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=DEPTH,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        max_position_embeddings=max_positions,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=tile,
        patch_size=patch,
        initializer_range=0.2,
    )
    cfg = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=per_tile,
        downsample_ratio=0.5,
    )
    model = InternVLForConditionalGeneration(cfg)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1, max_patches=max_tiles, **_IMAGENET
    )
    proc = InternVLProcessorLite(image_processor, tok, image_seq_length=per_tile)
    return _ready(model, proc, f"internvl-{tile}px-{max_tiles}tiles", attn)


def _llama(vocab: int, **kw) -> LlamaConfig:
    kw = {"max_position_embeddings": 512, **kw}
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=DEPTH,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        pad_token_id=0,
        **kw,
    )


def _clip(image_size: int = 32, patch_size: int = 4) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
        initializer_range=0.2,
    )


def _llava(tok, text_config, vision_config, image_size: int, patch: int):
    """A LLaVA-1.5-shaped model (one token per patch) and its processor; the model is built from the current RNG."""
    n_vision = (image_size // patch) ** 2
    cfg = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=n_vision,
    )
    model = LlavaForConditionalGeneration(copy.deepcopy(cfg))
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    return model, proc


def _ready(model, proc, name: str, attn: str | None = None) -> LVLM:
    """Greedy decoding that never stops early, the attention implementation set, wrapped as an LVLM."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if attn is not None:
        model.set_attn_implementation(attn)
    return LVLM(model.eval(), proc, name=name)


def build(family: str, attn: str = "sdpa", seed: int = 0) -> LVLM:
    """A tiny LVLM of ``family`` (one of ``FAMILIES``), ``DEPTH`` decoder layers of hidden size 64."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown tiny family {family!r}; valid: {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    if family == "internvl":  # 32-pixel tiles of 8x8 patches: 16 tokens a tile, 1..4 tiles plus a thumbnail
        return _internvl(tile=32, patch=4, max_tiles=4, max_positions=512, attn=attn)
    if (
        family == "gemma3"
    ):  # 32-pixel images of 8x8 patches pooled to 4x4 = 16 tokens; windows of 12 in layers 0, 1, 3, 4
        return _gemma3(image=32, patch=4, per_image=16, window=12, local_per_global=2, attn=attn)
    tok = tokenizer()
    vocab = len(tok)
    video_id = tok.convert_tokens_to_ids("<video>")
    if family == "llava":
        model, proc = _llava(tok, _llama(vocab), _clip(), image_size=32, patch=4)
    elif family in ("llava_next", "llava_onevision"):
        common = dict(
            vision_config=_clip(),
            text_config=_llama(vocab),
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]],
            vision_feature_select_strategy="default",
        )
        if family == "llava_next":
            model = LlavaNextForConditionalGeneration(LlavaNextConfig(**common))
        else:
            model = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**common, video_token_index=video_id))
        proc = PlaceholderProcessor(tok, model)
    elif family in ("qwen3_vl", "qwen3_vl_moe"):
        model = _qwen3_vl(tok, patch=8, grid_side=4, max_positions=512, moe=family == "qwen3_vl_moe")
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8, merge_size=2, temporal_patch_size=2, **_HALF
        )
        proc = Qwen3ProcessorLite(image_processor, tok)
    else:
        qwen_image, qwen_video = tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|video_pad|>")
        text = dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=DEPTH,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=0.2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,
        )
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=0.2,
        )
        ids = dict(
            image_token_id=qwen_image,
            video_token_id=qwen_video,
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        )
        if family == "qwen2_5_vl":
            vision.update(out_hidden_size=64, intermediate_size=64, fullatt_block_indexes=[1], window_size=32)
            vision.pop("embed_dim")
            vision["hidden_size"] = 32
            model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
        else:
            model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
        proc = QwenProcessorLite(
            Qwen2VLImageProcessorPil(
                min_pixels=32 * 32, max_pixels=64 * 64, patch_size=8, merge_size=2, temporal_patch_size=2
            ),
            tok,
            second_per_grid=family == "qwen2_5_vl",
        )
    return _ready(model, proc, f"tiny-{family}", attn)


_HALF = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)  # Qwen3-VL's image normalisation


def _qwen3_vl(tok, patch: int, grid_side: int, max_positions: int, moe: bool = False):
    """A Qwen3-VL model: decoder as ``build``'s Qwen ones (interleaved M-RoPE), a 3-layer tower whose every layer
    feeds DeepStack (as the real [8, 16, 24] of 27 feed decoder layers 0-2); built from the current RNG.

    ``moe``: Qwen3-VL-MoE, every decoder layer's MLP a sparse block of 4 experts of width 32, top-2 routed (the
    real Qwen3-VL-30B-A3B: 128 experts of width 768, top-8, in every layer)."""
    text = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=DEPTH,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        initializer_range=0.2,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],  # the real [24, 20, 20] of head_dim 128, scaled to head_dim 16
            "mrope_interleaved": True,
        },
        max_position_embeddings=max_positions,
        pad_token_id=0,
    )
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=patch,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
        num_position_embeddings=grid_side * grid_side,
        deepstack_visual_indexes=[0, 1, 2],
        initializer_range=0.2,
    )
    ids = {f"{name}_token_id": tok.convert_tokens_to_ids(f"<|{name}|>") for name in ("vision_start", "vision_end")}
    ids.update(
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
    )
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        return Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids))
    return Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **ids))


def random_llava(
    hidden: int = 512, layers: int = 12, image_size: int = 96, patch: int = 4, vision: CLIPVisionConfig | None = None
) -> LVLM:
    """A random-weight LLaVA-1.5-shaped model with (image_size/patch)^2 vision tokens, for engine benchmarks.

    Its prompts use the words ``w0`` .. ``w255``, ``USER:`` and ``ASSISTANT:``. ``vision`` replaces the
    default 2-layer, width-64 CLIP tower (its image size and patch must match ``image_size``, ``patch``).
    """
    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>"] + [f"w{i}" for i in range(256)] + ["USER:", "ASSISTANT:"]
    tok = word_tokenizer(words, split_punctuation=False)
    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=len(words),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        initializer_range=0.05,
        pad_token_id=0,
    )
    vision = vision or CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
    )
    model, proc = _llava(tok, text, vision, image_size, patch)
    return _ready(model, proc, f"random-llava-h{hidden}-l{layers}-v{(image_size // patch) ** 2}")


class PlaceholderProcessor:
    """Image processor stand-in for anyres families: expands ``<image>`` to the model's own feature count."""

    image_token = "<image>"
    chat_template = None

    def __init__(self, tok, model):
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        self.tokenizer = tok
        self.model = model
        onevision = model.config.model_type == "llava_onevision"
        self.image_processor = (LlavaOnevisionImageProcessorPil if onevision else LlavaNextImageProcessorPil)(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]],
        )

    def __call__(self, text, images=None, videos=None, return_tensors="pt"):
        out = {}
        if images:
            px = self.image_processor(images=images, return_tensors="pt")
            out.update(pixel_values=px["pixel_values"], image_sizes=px["image_sizes"])
            with torch.no_grad():
                feats = self.model.model.get_image_features(
                    pixel_values=px["pixel_values"], image_sizes=px["image_sizes"]
                ).pooler_output
            pieces = text.split(self.image_token)
            text = pieces[0] + "".join(
                self.image_token * f.reshape(-1, f.shape[-1]).shape[0] + p for f, p in zip(feats, pieces[1:])
            )
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        out.update(input_ids=ids, attention_mask=torch.ones_like(ids))
        return out


def photo(seed: int, width: int, height: int) -> Image.Image:
    """A random RGB test image of width x height (smooth enough that resizing keeps structure)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def textvqa_copy(dest, rows: int, width: int = 1024, height: int = 768, seed: int = 0, quality: int = 90):
    """Write a local TextVQA-schema copy to ``dest`` (``validation.jsonl`` + ``images/*.jpg``): ``rows`` questions, one
    random ``width`` x ``height`` JPEG each, for measuring evaluation at scale (never committed: build it where needed).

    Returns ``dest`` as a Path.
    """
    import json
    from pathlib import Path

    dest = Path(dest)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(256)]
    rng = np.random.default_rng(seed)
    with open(dest / "validation.jsonl", "w", encoding="utf-8") as f:
        for i in range(rows):
            name = f"images/{i:06d}.jpg"
            if not (dest / name).is_file():  # a copy built before is reused (same seed, same pixels)
                photo(seed * 1_000_003 + i, width, height).save(dest / name, quality=quality)
            question = " ".join(rng.choice(words, 8).tolist())
            answers = [str(a) for a in rng.choice(words[:4], 10).tolist()]
            row = {
                "question_id": i,
                "question": question,
                "answers": answers,
                "image": name,
                "image_id": f"{i:06d}",
                "ocr_tokens": rng.choice(words, 3).tolist(),
            }
            f.write(json.dumps(row) + "\n")
    return dest


def video_frames(seed: int, frames: int, width: int, height: int) -> list[Image.Image]:
    """A random video: ``frames`` frames of width x height."""
    return [photo(seed * 1000 + f, width, height) for f in range(frames)]


def image(seed: int, size: int = 32) -> Image.Image:
    """A random RGB test image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def prompt_for(lvlm, question: str, n_images: int = 1) -> str:
    """A prompt with ``n_images`` placeholders in the family's format (Qwen wraps them in vision start/end)."""
    token = lvlm.image_token
    if token == "<|image_pad|>":
        token = "<|vision_start|>" + token + "<|vision_end|>"
    return "USER: " + token * n_images + "\n" + question + " ASSISTANT:"


def batch_for(lvlm, n: int, family: str):
    """``n`` prompts of different lengths with one image each (different sizes for Qwen; for InternVL, different
    aspect ratios: 1, 2 + thumbnail and 3 + thumbnail tiles)."""
    questions = ["what is the digit ?", "how many ?", "what is the colour of the digit in row 2 column 3 ?"]
    if family == "internvl":
        sizes = [(32, 32), (64, 32), (32, 96)]
        return [prompt_for(lvlm, questions[i % 3]) for i in range(n)], [photo(i, *sizes[i % 3]) for i in range(n)]
    sizes = [32, 48, 40] if family.startswith("qwen") else [32, 32, 32]
    prompts = [prompt_for(lvlm, questions[i % 3]) for i in range(n)]
    images = [image(i, sizes[i % 3]) for i in range(n)]
    return prompts, images


Item = Sample  # the harness's own sample type


class EchoBench(Benchmark):
    """A small unregistered benchmark of random images (answers fixed, so correctness is real)."""

    name, modality, families = "echo", "image", ("a", "b")
    splits = ("test", "validation")  # both give the same samples

    def __init__(self, n=5, answer="?"):
        self.items = [Item(f"s{i}", "how many ?", answer, "ab"[i % 2], (image(i),)) for i in range(n)]

    def load_split(self, split, limit=None):
        """The first ``limit`` samples (every split is the same)."""
        return self.items[:limit]

    def is_correct(self, prediction, sample):
        """Exact match."""
        return prediction == sample.answer

    def aggregate(self, records):
        """Accuracy overall and per family."""
        fam = {f: [r["correct"] for r in records if r["family"] == f] for f in self.families}
        return {
            "accuracy": sum(r["correct"] for r in records) / len(records),
            "per_family": {f: sum(v) / len(v) for f, v in fam.items() if v},
        }


# -- realistic geometry: the real checkpoints' preprocessing with tiny weights ---------------------------
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 anyres resolutions (H, W)
ONEVISION_PINPOINTS = [
    [384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)
]  # llava-onevision: 1x1 .. 6x6 crops of 384
# each family's preprocessing in build_real, as its real checkpoints set it
REAL_GEOMETRY = {
    "llava": "llava-1.5: CLIP 336px, patch 14, resize + centre crop: 576 tokens per image",
    "llava_next": "llava-v1.6: CLIP 336px/14, anyres pinpoints " + str(NEXT_PINPOINTS) + ", unpadded tiles + newlines",
    "llava_onevision": (
        "llava-onevision: SigLIP 384px/14 (729 per crop), 6x6 anyres pinpoints, anyres_max_9, "
        "video frames 384px pooled to 196"
    ),
    "qwen2_vl": "Qwen2-VL: patch 14, merge 2, temporal 2, min_pixels 3136, max_pixels 12845056",
    "qwen2_5_vl": "Qwen2.5-VL: as Qwen2-VL, window attention (window 112)",
    "internvl": (
        "InternVL3 (InternVL3-8B-hf): InternViT 448px tiles, patch 14, [CLS] dropped, pixel shuffle 0.5 -> 256 tokens "
        "a tile, 1..12 tiles plus a thumbnail, ImageNet mean/std, Qwen2 decoder"
    ),
    "gemma3": (
        "Gemma 3 (gemma-3-4b-it): SigLIP 896px, patch 14, no [CLS], 64x64 patches average-pooled to 16x16 = 256 tokens "
        "an image, mean/std 0.5, pan-and-scan off unless asked at call time; sliding window 1024 in five of every six "
        "decoder layers, global RoPE linearly scaled by 8"
    ),
    "qwen3_vl": (
        "Qwen3-VL (Qwen3-VL-8B-Instruct): patch 16, merge 2, temporal 2, min_pixels 65536, max_pixels 16777216, "
        "mean/std 0.5, a 48x48 learned position grid, DeepStack into decoder layers 0-2, interleaved M-RoPE; videos: "
        "4096..25165824 pixels a clip, 2 frames a second, timestamps"
    ),
    "qwen3_vl_moe": (
        "Qwen3-VL-MoE (Qwen3-VL-30B-A3B-Instruct): Qwen3-VL-8B's vision geometry and processing (patch 16, merge 2, "
        "min_pixels 65536, max_pixels 16777216, 48x48 position grid, DeepStack into decoder layers 0-2); every "
        "decoder MLP a top-k routed mixture of experts"
    ),
}


def build_real(family: str, attn: str = "sdpa", seed: int = 0, vllm: bool = False) -> LVLM:
    """A tiny-weight LVLM of ``family`` with the real checkpoint's preprocessing geometry (``REAL_GEOMETRY``).

    Vision towers take the real input resolution and patch size (so token counts are the real
    ones: thousands per high-resolution image) but have 2 layers of width 32; the decoder is the
    tiny ``DEPTH``-layer one of ``build``. LLaVA-NeXT uses transformers' own ``LlavaNextProcessor``;
    OneVision and Qwen use the torchvision-free stand-ins ``v2drop.load`` falls back to.

    ``vllm`` (Qwen2-VL / Qwen2.5-VL only) gives every attention the head size 32 that vLLM's CPU attention needs
    at least: 2 decoder heads of 32 (M-RoPE sections [4, 6, 6]) and a tower 64 wide (2 heads of 32), 4 decoder
    layers, 4096 positions (save it for vLLM with ``save_for_vllm``).
    """
    from transformers import LlavaNextProcessor, SiglipVisionConfig
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from v2drop.models.onevision_processor import OnevisionProcessorLite

    if family not in FAMILIES:
        raise ValueError(f"Unknown tiny family {family!r}; valid: {', '.join(FAMILIES)}")
    if vllm and family not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"vllm=True builds Qwen2-VL / Qwen2.5-VL only, got {family!r}")
    torch.manual_seed(seed)
    if family == "internvl":  # InternVL3-8B-hf: 448-pixel tiles, patch 14, pixel shuffle 0.5, 1..12 tiles + thumbnail
        return _internvl(tile=448, patch=14, max_tiles=12, max_positions=16384, attn=attn)
    if family == "gemma3":  # gemma-3-4b-it: 896 pixels, patch 14 (64x64 patches) pooled to 16x16, window 1024, 5:1
        return _gemma3(image=896, patch=14, per_image=256, window=1024, local_per_global=5, attn=attn)
    tok = tokenizer()
    vocab = len(tok)
    text = _llama(vocab, max_position_embeddings=16384)
    image_id, video_id = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<video>")
    if family == "llava":
        model, proc = _llava(tok, text, _clip(336, 14), image_size=336, patch=14)
    elif family == "llava_next":
        model = LlavaNextForConditionalGeneration(
            LlavaNextConfig(
                vision_config=_clip(336, 14),
                text_config=text,
                image_token_index=image_id,
                image_grid_pinpoints=NEXT_PINPOINTS,
                vision_feature_select_strategy="default",
            )
        )
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=NEXT_PINPOINTS,
        )
        proc = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    elif family == "llava_onevision":
        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=384,
            patch_size=14,
        )
        model = LlavaOnevisionForConditionalGeneration(
            LlavaOnevisionConfig(
                vision_config=vision,
                text_config=text,
                image_token_index=image_id,
                video_token_index=video_id,
                image_grid_pinpoints=ONEVISION_PINPOINTS,
                vision_feature_select_strategy="full",
                vision_feature_layer=-1,
                vision_aspect_ratio="anyres_max_9",
            )
        )
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": 384, "width": 384},
            image_grid_pinpoints=ONEVISION_PINPOINTS,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
        proc = OnevisionProcessorLite(image_processor, tok, num_image_tokens=729, vision_feature_select_strategy="full")
    elif family in ("qwen3_vl", "qwen3_vl_moe"):
        model = _qwen3_vl(tok, patch=16, grid_side=48, max_positions=32768, moe=family == "qwen3_vl_moe")
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=65536, max_pixels=16777216, patch_size=16, merge_size=2, temporal_patch_size=2, **_HALF
        )
        proc = Qwen3ProcessorLite(image_processor, tok)
    else:
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        text = dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=DEPTH,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=0.2,
            rope_parameters=rope,
            max_position_embeddings=32768,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,
        )
        tower = 32  # the tower's width (Qwen2.5-VL: hidden_size, Qwen2-VL: embed_dim)
        if vllm:  # head size 32 everywhere (vLLM's CPU attention's minimum)
            text.update(num_hidden_layers=4, num_attention_heads=2, head_dim=32, max_position_embeddings=4096)
            text["rope_parameters"] = dict(rope, mrope_section=[4, 6, 6])
            tower = 64
        vision = dict(
            depth=2,
            hidden_size=64,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=0.2,
        )
        ids = dict(
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        )
        if family == "qwen2_5_vl":
            vision.update(
                hidden_size=tower, out_hidden_size=64, intermediate_size=64, fullatt_block_indexes=[1], window_size=112
            )
            model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
        else:
            model = Qwen2VLForConditionalGeneration(
                Qwen2VLConfig(text_config=text, vision_config=dict(vision, embed_dim=tower), **ids)
            )
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2, temporal_patch_size=2
        )
        proc = QwenProcessorLite(image_processor, tok, second_per_grid=family == "qwen2_5_vl")
    return _ready(model, proc, f"real-geometry-{family}", attn)


def save_for_vllm(lvlm: LVLM, path) -> None:
    """Save a tiny Qwen2-VL / Qwen2.5-VL (``build_real(..., vllm=True)``) as a checkpoint at ``path`` that vLLM loads:
    its tokenizer names ``<|image_pad|>`` / ``<|video_pad|>`` as the real one does (vLLM's processor reads them)."""
    path = Path(path)
    lvlm.model.save_pretrained(path)
    lvlm.processor.save_pretrained(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


# -- reference video processing: transformers' own processors around a torchvision-free video processor -------------
def reference_processor(lvlm):
    """The family's real transformers processor (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``,
    ``Qwen3VLProcessor`` or ``LlavaOnevisionProcessor``) over ``lvlm.processor``'s tokenizer and image
    processor, with a ``ReferenceVideoProcessor`` (Qwen3-VL: ``Qwen3ReferenceVideoProcessor``) as its
    video processor: the oracle the stand-in processors are checked against."""
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    from transformers.video_processing_utils import VideoProcessorMixin

    family = lvlm.model.config.model_type
    if family == "internvl":
        return _internvl_reference(lvlm)
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    classes = {
        "qwen3_vl": Qwen3VLProcessor,
        "qwen3_vl_moe": Qwen3VLProcessor,
        "qwen2_vl": Qwen2VLProcessor,
        "qwen2_5_vl": Qwen2_5_VLProcessor,
        "llava_onevision": LlavaOnevisionProcessor,
    }
    if family not in classes:
        raise ValueError(f"No video reference for family {family!r}; valid: {', '.join(classes)}")

    class Reference(classes[family]):
        def check_argument_for_proper_class(self, argument_name, argument):
            # the real check looks ``VideoProcessorMixin`` up among transformers' exports, which need torchvision
            if argument_name == "video_processor" and isinstance(argument, VideoProcessorMixin):
                return VideoProcessorMixin
            return super().check_argument_for_proper_class(argument_name, argument)

    lite = lvlm.processor
    kwargs = {}
    if family == "llava_onevision":
        kwargs = dict(
            num_image_tokens=lite.num_image_tokens,
            vision_feature_select_strategy=lite.vision_feature_select_strategy,
            vision_aspect_ratio=lite.vision_aspect_ratio,
        )
    qwen3 = family in ("qwen3_vl", "qwen3_vl_moe")
    video = Qwen3ReferenceVideoProcessor(lite) if qwen3 else ReferenceVideoProcessor(lite)
    ref = Reference(image_processor=lite.image_processor, tokenizer=lite.tokenizer, video_processor=video, **kwargs)
    if ref.image_token != lite.image_token:
        # the tiny tokenizer names its LLaVA "<image>" as the image token; a Qwen tokenizer names "<|image_pad|>"
        ref.image_token, ref.image_token_id = lite.image_token, lite.tokenizer.convert_tokens_to_ids(lite.image_token)
    return ref


def _internvl_reference(lvlm):
    """transformers' own ``InternVLProcessor`` over the stand-in's tokenizer and image processor, without a video
    processor (``InternVLVideoProcessor`` needs torchvision; images need none)."""
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    class Reference(InternVLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            # the real check looks the video processor class up among transformers' exports, which need torchvision
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    lite = lvlm.processor
    return Reference(
        image_processor=lite.image_processor,
        tokenizer=lite.tokenizer,
        video_processor=None,
        image_seq_length=lite.image_seq_length,
    )


class ReferenceVideoProcessor(VideoProcessorMixin):
    """transformers' video processing for frames that need no resizing, runnable without torchvision.

    ``Qwen2VLVideoProcessor`` and ``LlavaOnevisionVideoProcessor`` need torchvision. This runs the
    code they share as it is: ``VideoProcessorMixin.preprocess`` (kwarg defaults, metadata,
    ``return_metadata``), ``BaseVideoProcessor._decode_and_sample_videos`` (batching, metadata,
    frame sampling) and ``TorchvisionBackend.rescale_and_normalize`` (the fused float32 rescale and
    normalise), with torchvision's ``normalize_image`` (subtract, then divide) written out. Qwen
    frames are then patchified one by one with the real image processor's ``patchify`` and their
    patches interleaved in time (``Qwen2VLVideoProcessor.patchify``'s layout; a clip of odd length
    repeats its last frame); OneVision frames are stacked. Frames must need no resizing (Qwen:
    sides multiples of ``patch_size * merge_size`` within the pixel bounds; OneVision: the video
    size), because resizing is torchvision's. Frame sampling is ``Qwen2VLVideoProcessor.sample_frames``
    (Qwen, as ``QwenProcessorLite.sample_frames`` ports it) or ``BaseVideoProcessor.sample_frames`` (OneVision).
    """

    _decode_and_sample_videos = BaseVideoProcessor._decode_and_sample_videos
    _fuse_mean_std_and_rescale_factor = TorchvisionBackend._fuse_mean_std_and_rescale_factor
    rescale_and_normalize = TorchvisionBackend.rescale_and_normalize
    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    do_sample_frames = False
    do_rescale = do_normalize = True

    def __init__(self, lite):
        super().__init__()
        self.lite = lite
        proc = lite.image_processor
        self.qwen = isinstance(lite, QwenProcessorLite)
        self.rescale_factor = proc.rescale_factor
        self.image_mean = tuple(proc.image_mean if self.qwen else lite.video_mean)
        self.image_std = tuple(proc.image_std if self.qwen else lite.video_std)
        self.patch_size = getattr(proc, "patch_size", None)
        self.merge_size = getattr(proc, "merge_size", None)
        self.temporal_patch_size = getattr(proc, "temporal_patch_size", None)

    def sample_frames(self, metadata, num_frames=None, fps=None, **kwargs):
        """The family's frame sampling (see the class docstring)."""
        if self.qwen:
            return self.lite.sample_frames(metadata, fps=fps, num_frames=num_frames)
        return default_sample_indices_fn(metadata, num_frames=num_frames, fps=fps)

    def _prepare_input_videos(self, videos, **kwargs):
        """(T, H, W, 3) uint8 -> (T, 3, H, W), as ``BaseVideoProcessor._prepare_input_videos`` lays them out."""
        return [torch.from_numpy(np.asarray(v)).permute(0, 3, 1, 2).contiguous() for v in videos]

    def _standardize_kwargs(self, **kwargs):
        return kwargs

    def _validate_preprocess_kwargs(self, **kwargs):
        return None

    def normalize(self, image, mean, std, inplace=False, **kwargs):
        """torchvision's ``normalize_image``: subtract the mean, then divide by the std, in the image's dtype."""
        mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
        return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)

    def _preprocess(self, videos, do_rescale, rescale_factor, do_normalize, image_mean, image_std, **kwargs):
        out = []
        for video in videos:
            h, w = video.shape[-2:]
            if self.qwen:
                size = self.lite.video_size
                target = smart_resize(
                    h, w, self.patch_size * self.merge_size, size["shortest_edge"], size["longest_edge"]
                )
            else:
                target = (self.lite.video_size["height"], self.lite.video_size["width"])
            if target != (h, w):
                raise ValueError(f"The reference takes frames that need no resizing ({h}x{w} would become {target})")
            out.append(
                self.rescale_and_normalize(video, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            )
        if not self.qwen:
            return BatchFeature({"pixel_values_videos": torch.stack(out)}, tensor_type=kwargs.get("return_tensors"))
        patch, merge, temporal = self.patch_size, self.merge_size, self.temporal_patch_size
        patches, grids = [], []
        for video in out:
            frames = list(video) + [video[-1]] * (-len(video) % temporal)  # padded in time with the last frame
            flat = [self.lite.image_processor.patchify(f.numpy(), patch, merge, temporal) for f in frames]
            _, grid_h, grid_w = flat[0]
            # an image's patch repeats its frame in every temporal slot; slot t of step g is frame g * temporal + t
            slots = [torch.from_numpy(f[0]).view(grid_h * grid_w, 3, temporal, patch, patch)[:, :, 0] for f in flat]
            steps = [torch.stack(slots[g : g + temporal], dim=2) for g in range(0, len(slots), temporal)]
            patches += [s.reshape(grid_h * grid_w, -1) for s in steps]
            grids.append([len(steps), grid_h, grid_w])
        data = {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids)}
        return BatchFeature(data, tensor_type=kwargs.get("return_tensors"))


class Qwen3ReferenceVideoProcessor(Qwen3VLVideoProcessor):
    """transformers' ``Qwen3VLVideoProcessor`` itself, runnable without torchvision for frames that need no resizing.

    Only the three steps that call torchvision are replaced: RGB conversion (frames are RGB already),
    normalisation (torchvision's ``normalize_image`` written out, as ``ReferenceVideoProcessor.normalize``)
    and resizing (the clip-level ``smart_resize`` must give the frames' own size, or it raises).
    Sampling, the pixel budget, patchifying and the processor's timestamps are transformers' own.
    """

    normalize = ReferenceVideoProcessor.normalize

    def __init__(self, lite):
        proc = lite.image_processor
        super().__init__(
            size=dict(lite.video_size),
            image_mean=list(proc.image_mean),
            image_std=list(proc.image_std),
            patch_size=proc.patch_size,
            merge_size=proc.merge_size,
            temporal_patch_size=proc.temporal_patch_size,
            do_sample_frames=lite.do_sample_frames,
            fps=lite.fps,
            num_frames=lite.num_frames,
            min_frames=lite.min_frames,
            max_frames=lite.max_frames,
            cap_pixels_per_frame=False,
        )

    def convert_to_rgb(self, video):
        """The frames as they are (the test frames are RGB)."""
        return video

    def resize(self, videos, size, resample, factor, temporal_factor, cap_pixels_per_frame=None, **kwargs):
        """The frames unchanged when the clip-level ``smart_resize`` keeps their size; otherwise a ValueError."""
        h, w = videos.shape[-2:]
        target = qwen3_clip_size(
            videos.shape[1],
            h,
            w,
            temporal_factor=temporal_factor,
            factor=factor,
            min_pixels=size.shortest_edge,
            max_pixels=size.longest_edge,
        )
        if target != (h, w):
            raise ValueError(f"The reference takes frames that need no resizing ({h}x{w} would become {target})")
        return videos


def widened_proxy(dest, hidden: int = 1024, layers: int = 12, seed: int = 0) -> str:
    """Save to ``dest`` a random-weight copy of the bundled proxy with a ``hidden``-wide, ``layers``-deep decoder.

    The proxy's tokenizer, processor, chat template and trained vision tower are kept (so the ``digits``
    prompts and images work as for the proxy); the decoder (heads of 64) and the projector are random
    (``initializer_range`` 0.05, seeded). For serving measurements in which the decoder dominates
    (``docs/serving.md``); its answers are meaningless. Returns ``dest``.
    """
    import shutil
    from pathlib import Path

    from transformers import AutoConfig, LlavaForConditionalGeneration

    from v2drop.bundled import LOCAL_MODELS

    src, dest = Path(LOCAL_MODELS["proxy"]), Path(dest)
    config = AutoConfig.from_pretrained(src)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, hidden * 11 // 4, layers
    text.num_attention_heads = text.num_key_value_heads = hidden // 64
    text.head_dim, text.initializer_range = 64, 0.05
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    proxy = LlavaForConditionalGeneration.from_pretrained(src)
    model.model.vision_tower.load_state_dict(proxy.model.vision_tower.state_dict())
    model.save_pretrained(dest)
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "train_config.json", "started_from.json"):
            shutil.copy(f, dest / f.name)
    return str(dest)


def widened_qwen2vl(dest, hidden: int = 768, layers: int = 12, seed: int = 0, min_pixels: int = 3136) -> str:
    """Save to ``dest`` a random-weight Qwen2-VL with a ``hidden``-wide, ``layers``-deep decoder that vLLM loads.

    ``build_real("qwen2_vl", vllm=True)``'s tower (2 layers 64 wide, heads of 32, its merger widened to
    ``hidden``), tokenizer and Qwen's image processing (patch 14, merge 2; images resized to at least
    ``min_pixels``, Qwen2-VL's 3136 by default) under a decoder with heads of 64 (M-RoPE sections [8, 12, 12]);
    every weight random (seeded); answers end at the tokenizer's EOS, as vLLM ends them; saved by
    ``save_for_vllm``. The Qwen counterpart of ``widened_proxy``, for serving measurements in which the decoder
    dominates (``docs/serving.md``: ``min_pixels=451584`` turns digits' 64-pixel images into 576 vision tokens);
    its answers are meaningless. Returns ``dest``.
    """
    if hidden < 64 or hidden % 64 or layers < 1:
        raise ValueError(f"hidden must be a positive multiple of 64 and layers >= 1, got {hidden} and {layers}")
    base = build_real("qwen2_vl", "eager", seed=seed, vllm=True)
    image_processor = base.processor.image_processor
    if not 3136 <= min_pixels <= image_processor.size["longest_edge"]:
        raise ValueError(
            f"min_pixels must be between 3136 and {image_processor.size['longest_edge']}, got {min_pixels}"
        )
    image_processor.size["shortest_edge"] = min_pixels
    cfg = base.model.config.to_dict()
    text = {k: v for k, v in cfg["text_config"].items() if k not in ("layer_types", "max_window_layers")}
    text.update(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        head_dim=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
    )
    ids = {k: cfg[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id")}
    torch.manual_seed(seed)
    config = Qwen2VLConfig(text_config=text, vision_config=dict(cfg["vision_config"], hidden_size=hidden), **ids)
    model = Qwen2VLForConditionalGeneration(config).eval()
    # the tokenizer's EOS ends answers in the engine as in vLLM (which stops at the tokenizer's)
    model.generation_config.eos_token_id = base.processor.tokenizer.eos_token_id
    model.set_attn_implementation("eager")
    save_for_vllm(LVLM(model, base.processor, name="wide-qwen2vl"), dest)
    return str(dest)
