"""The proxy's model: a word-level tokenizer, a ``LlavaProcessor`` and a CLIP + Llama ``LlavaForConditionalGeneration``.

The chat template gives ``USER: <image>\\n{question} ASSISTANT:`` for one image; a multi-image
prompt (a video's frames) marks every frame (``frame three <image>``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from v2drop.benchmarks.digits import FRAMES, IMAGE_SIZE, NUMBER_WORDS, PATCH, PATCHES, Digits, vocabulary

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]  # the first ids of the vocabulary
VISION_TOKENS = PATCHES * PATCHES  # per image: one per patch (the CLS token is not passed on)
FRAME_WORDS = NUMBER_WORDS[1 : FRAMES + 1]  # "one" ... "eight": the frame markers of a multi-image prompt
# One image: "USER: <image>\n{question} ASSISTANT:". Several (a video's frames): each image follows a
# marker "frame one", "frame two", ... (as InternVL's "Frame1: <image>"), so the decoder can tell the
# frames apart by content, not only by position; frames past the eighth get "frame" alone.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% set images = message['content'] | selectattr('type', 'equalto', 'image') | list %}"
    "{% for c in images %}{% if images | length > 1 %}frame "
    "{% if loop.index <= "
    + str(len(FRAME_WORDS))
    + " %}{{ "
    + repr(list(FRAME_WORDS))
    + "[loop.index0] }} {% endif %}{% endif %}<image>\n{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass
class ProxyConfig:
    """Shape of the proxy model (the ``model`` section of ``configs/proxy.yaml``)."""

    hidden: int = 128  # decoder hidden size
    intermediate: int = 512  # decoder MLP width
    layers: int = 12  # decoder layers (token dropping needs depth)
    heads: int = 4  # decoder attention heads
    kv_heads: int = 2  # decoder key/value heads (grouped-query attention)
    vision_hidden: int = 128  # CLIP tower hidden size
    vision_layers: int = 2  # CLIP tower layers
    vision_heads: int = 4  # CLIP tower heads
    # if > 0: std of a "mimetic" start, every head's query weights equal to its key weights (0: transformers' init)
    tied_qk_init: float = 0.0


def build_tokenizer():
    """A word-level tokenizer over the digits vocabulary plus the chat words and special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL_TOKENS + ["USER:", "ASSISTANT:"] + [w for w in vocabulary() if w not in SPECIAL_TOKENS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[?,.]"), behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=4096,
    )


def pixel_statistics(n_scenes: int = 64) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of training scenes (CLIP's defaults collapse these dark scenes)."""
    bench = Digits()
    pixels = np.stack([np.asarray(bench.scene("train", i)[0], dtype=np.float32) / 255 for i in range(n_scenes)])
    return pixels.mean(axis=(0, 1, 2)).round(4).tolist(), pixels.std(axis=(0, 1, 2)).round(4).tolist()


def build_processor(tokenizer=None):
    """``LlavaProcessor`` with a PIL CLIP image processor normalised by the scenes' statistics."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    mean, std = pixel_statistics()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or build_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(cfg: ProxyConfig, tokenizer) -> nn.Module:
    """A randomly initialised ``LlavaForConditionalGeneration`` of the proxy's shape."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=cfg.vision_hidden,
            intermediate_size=cfg.vision_hidden * 2,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden,
            intermediate_size=cfg.intermediate,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=VISION_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    if cfg.tied_qk_init > 0:
        tie_query_to_key(model.model.language_model, cfg.tied_qk_init)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def tie_query_to_key(decoder, std: float) -> None:
    """Mimetic attention init (Trockman & Kolter, 2023): key weights drawn with ``std``, every query head equal to its
    key head.

    Under GQA a query head copies the key head it shares, so ``q·k`` is a similarity and tokens
    attend to tokens that look like them from the first step. Content lookups ("which vision
    tokens show this digit") then start from a useful circuit instead of a long plateau; it
    favours no token dropper.
    """
    with torch.no_grad():
        for layer in decoder.layers:
            attn = layer.self_attn
            heads, kv_heads, dim = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
            attn.k_proj.weight.normal_(0, std)
            for h in range(heads):
                g = h // (heads // kv_heads)
                attn.q_proj.weight[h * dim : (h + 1) * dim] = attn.k_proj.weight[g * dim : (g + 1) * dim]
