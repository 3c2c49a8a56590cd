"""The proxy LVLM: a small standard ``LlavaForConditionalGeneration`` trained on the digits world.

Built from a config (CLIP tower + projector + Llama decoder), with its own word-level tokenizer,
a ``LlavaProcessor`` normalised with the scenes' own pixel statistics, and a chat template giving
``USER: <image>\\n{question} ASSISTANT:``. Training (``python -m experiments.train_proxy``) has three
stages, all PyTorch Lightning modules defined here:

1. ``align``: the vision tower and projector learn to emit, for every patch, a token close to the
   (frozen) LLM input embeddings of what is there: the digit word (or ``none``), its colour and the
   row/column words of its grid cell — the vision tokens "speak the LLM's vocabulary"
   (PROXY.md idea 1; recognition is cheap this way).
2. ``lvlm``: the whole model on conversations about the image, one isolated question of every
   family (each sees the image prefix only, at its evaluation positions) plus a dense auxiliary
   ``digits`` turn; input embeddings stay frozen so the alignment keeps its meaning. Half of the
   conversations lose vision tokens before decoder layer 1 or 2 (``draw_drop``: single tokens,
   whole blocks, or whole objects with or without background) and are answered as if the dropped
   tokens had never been there, so the model reads the image after layer 2, as the validity bar
   requires, and does not derail when only a few tokens survive. It changes the test bed for every
   method alike: the drops are not any method's choice of tokens.
3. ``robust``: the same again, a second learning-rate cycle with more whole-object drops, half of
   which keep every object (``all_objects``): a count question's evidence is exactly that.
4. ``video``: clips of 1–8 frames (``ClipStream``) beside the image conversations. A multi-image
   prompt marks every frame (``frame three <image>``, ``CHAT_TEMPLATE``); ``frame_tag_loss`` teaches
   the first decoder layer to copy that marker into every vision token of the frame; isolated
   video questions, dense ``frames``/``firsts`` turns and clip drops (``draw_clip_drop``) as in
   the image stages.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from v2drop.method import Method
from v2drop.schedule import Schedule
from v2drop.scorers.base import Scorer
from v2drop.benchmarks.digits import (
    COL_WORDS,
    FRAMES,
    GRID,
    IMAGE_SIZE,
    NUMBER_WORDS,
    PATCH,
    PATCHES,
    ROW_WORDS,
    Digits,
    DigitsVideo,
    image_questions,
    video_questions,
    vocabulary,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
FRAME_WORDS = NUMBER_WORDS[1 : FRAMES + 1]  # "one" ... "eight": the frame markers of a multi-image prompt
# One image: "USER: <image>\n{question} ASSISTANT:". Several (a video's frames): each image follows a
# marker "frame one", "frame two", ... (as InternVL's "Frame1: <image>"), so the decoder can tell the
# frames apart by content, not only by position; frames past the eighth get "frame" alone.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% set images = message['content'] | selectattr('type', 'equalto', 'image') | list %}"
    "{% for c in images %}{% if images | length > 1 %}frame "
    "{% if loop.index <= " + str(len(FRAME_WORDS)) + " %}{{ " + repr(list(FRAME_WORDS)) + "[loop.index0] }} {% endif %}{% endif %}<image>\n{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass
class ProxyConfig:
    """Shape of the proxy model (every field maps to a key of ``configs/proxy.yaml``'s ``model``)."""

    hidden: int = 128  # decoder hidden size
    intermediate: int = 512  # decoder MLP width
    layers: int = 12  # decoder layers (token dropping needs depth)
    heads: int = 4  # decoder attention heads
    kv_heads: int = 2  # decoder key/value heads (grouped-query attention)
    vision_hidden: int = 128  # CLIP tower hidden size
    vision_layers: int = 2  # CLIP tower layers
    vision_heads: int = 4  # CLIP tower heads
    tied_qk_init: float = 0.0  # if > 0: std of a "mimetic" start, every head's query weights equal to its key weights (0: transformers' init)


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
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=4096,
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
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=mean, image_std=std, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(), patch_size=PATCH,
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(cfg: ProxyConfig, tokenizer) -> nn.Module:
    """A randomly initialised ``LlavaForConditionalGeneration`` of the proxy's shape."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_hidden * 2, num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads, image_size=IMAGE_SIZE, patch_size=PATCH,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=PATCHES * PATCHES,
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
    """Mimetic attention init (Trockman & Kolter, 2023): draw key weights with ``std`` and start every
    query head equal to the key head it shares (GQA), so ``q·k`` is a similarity and tokens attend to
    tokens that look like them from the first step. Content lookups ("which vision tokens show this
    digit") then start from a useful circuit instead of a long plateau; it favours no token dropper.
    """
    with torch.no_grad():
        for layer in decoder.layers:
            attn = layer.self_attn
            heads, kv_heads, dim = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
            attn.k_proj.weight.normal_(0, std)
            for h in range(heads):
                g = h // (heads // kv_heads)
                attn.q_proj.weight[h * dim : (h + 1) * dim] = attn.k_proj.weight[g * dim : (g + 1) * dim]


# -- stage 1: align the vision tokens with the vocabulary -----------------------------------------------

def patch_words(objects) -> list[list[str]]:
    """For each of the 256 patches: the words it should carry (content, colour, row, column)."""
    per_cell = PATCHES // GRID
    words = []
    for p in range(PATCHES * PATCHES):
        pr, pc = divmod(p, PATCHES)
        row, col = pr // per_cell, pc // per_cell
        content = ["none", "<pad>"]  # <pad> = no colour word (left out of the target)
        for o in objects:
            if o.mask[pr * PATCH : (pr + 1) * PATCH, pc * PATCH : (pc + 1) * PATCH].any():
                content = [str(o.label), o.colour]
        words.append(content + [ROW_WORDS[row], COL_WORDS[col]])
    return words


class SceneStream(torch.utils.data.IterableDataset):
    """An endless, seeded stream of training scenes (train-split digits only)."""

    def __init__(self, seed: int, start: int = 0):
        self.seed, self.start = seed, start

    def __iter__(self):
        bench = Digits(seed=self.seed)
        i = self.start
        while True:
            image, objects, rng = bench.scene("train", i)
            yield {"image": image, "objects": objects, "rng_seed": rng.random()}
            i += 1


class ClipStream(torch.utils.data.IterableDataset):
    """An endless, seeded stream of video-stage steps: ``scenes`` training scenes and ``clips``
    training clips per step, every clip of a step with the same frame count (drawn per step from
    ``frames`` = [min, max]); ``start`` = steps already done.
    """

    def __init__(self, seed: int, scenes: int, clips: int, frames, start: int = 0):
        self.seed, self.scenes, self.clips, self.frames, self.start = seed, scenes, clips, frames, start

    def __iter__(self):
        images, video = Digits(seed=self.seed), DigitsVideo(seed=self.seed)
        step = self.start
        while True:
            n = random.Random(f"frames-{self.seed}-{step}").randint(*self.frames)
            scenes = []
            for i in range(step * self.scenes, (step + 1) * self.scenes):
                image, objects, rng = images.scene("train", i)
                scenes.append({"image": image, "objects": objects, "rng_seed": rng.random()})
            clips = []
            for i in range(step * self.clips, (step + 1) * self.clips):
                frames, contents, rng = video.clip("train", i, n)
                clips.append({"frames": frames, "contents": contents, "rng_seed": rng.random()})
            yield {"scenes": scenes, "clips": clips}
            step += 1


def _collate(items):
    return items


class AlignModule:
    """Factory for the Lightning module of the alignment stage (imports Lightning lazily)."""

    @staticmethod
    def create(model, processor, lr: float, steps: int, content_ce: float = 0.0):
        """A LightningModule training tower + projector toward summed word embeddings.

        The regression is averaged over object and background patches separately (background is
        ~85% of the patches and would otherwise dominate). ``content_ce`` > 0 adds, on object
        patches, a cross-entropy over the content words (digits and ``none``) with the token's dot
        products scaled by ``content_ce`` as logits: without it the tower learnt colour and position
        but not which digit a patch shows (argmax accuracy 8%, chance 10%).
        """
        import lightning as L

        tok = processor.tokenizer
        content_ids = torch.tensor([tok.convert_tokens_to_ids(w) for w in [str(d) for d in range(10)] + ["none"]])

        class Align(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = model
                for p in self.model.parameters():
                    p.requires_grad_(False)
                for m in (model.model.vision_tower, model.model.multi_modal_projector):
                    for p in m.parameters():
                        p.requires_grad_(True)

            def training_step(self, batch, batch_idx):
                pixels = processor.image_processor([b["image"] for b in batch], return_tensors="pt")["pixel_values"].to(self.device)
                feats = self.model.model.get_image_features(pixel_values=pixels).pooler_output
                feats = torch.stack(list(feats)).float()  # (B, 256, D)
                emb = self.model.model.get_input_embeddings().weight.detach().float()
                ids = torch.tensor([[tok.convert_tokens_to_ids(w) for w in words] for b in batch for words in patch_words(b["objects"])],
                                   device=self.device).view(len(batch), PATCHES * PATCHES, 4)
                target = (emb[ids] * (ids != tok.pad_token_id)[..., None]).sum(2)  # (B, 256, D)
                error = ((feats - target) ** 2).sum(-1).div(target.pow(2).sum(-1))
                on_object = ids[..., 0] != tok.convert_tokens_to_ids("none")
                loss = 0.5 * sum(error[part].mean() for part in (on_object, ~on_object) if part.any())
                if content_ce > 0 and on_object.any():
                    logits = feats[on_object] @ emb[content_ids.to(self.device)].T * content_ce
                    labels = (ids[..., 0][on_object][:, None] == content_ids.to(self.device)).float().argmax(-1)
                    loss = loss + torch.nn.functional.cross_entropy(logits, labels)
                self.log("align_loss", loss, prog_bar=True)
                return loss

            def configure_optimizers(self):
                params = [p for p in self.model.parameters() if p.requires_grad]
                opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
                sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
                return [opt], [{"scheduler": sched, "interval": "step"}]

        return Align()


# -- stage 2: the whole LVLM on conversations ------------------------------------------------------------

EXTRA_FAMILIES = ("ident", "exist", "colour", "mc")


AUX_TURNS = ("digits", "which", "cells")
WHICH_QUESTION = "What digit is in the image?"


def aux_turn(tokenizer, objects, rng: random.Random, kind: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one dense auxiliary turn (``kind`` in ``AUX_TURNS``).

    ``digits``: the ten digit words in shuffled order, each followed by its colour, or ``none``
    when the digit is absent: ``7 red 2 none 0 white ...``. Every answer is predicted at the
    position of the digit it is about, so the lookup "which vision tokens show this digit" gets a
    direct, first-order training signal (the question formats only reach it through a hop from
    the answer position back to the digit word, a chicken-and-egg the randomly initialised decoder
    did not leave in 700 steps). It is a training device only: evaluation prompts never contain it.

    ``cells``: the occupied grid cells and as many empty ones, shuffled, each a row and a column
    word followed by the digit there or ``none``: ``upper left 7 bottom rightmost none ...`` (all
    sixteen cells, 80% ``none``, stayed at always-``none`` for 300 steps) — the same first-order
    signal for the opposite lookup, position as the key and the digit as the value (what ``ident``
    asks; ``digits`` only ever reads a digit as the key). ``which``: "What digit is in the image?"
    when exactly one digit is visible (nothing otherwise).
    """
    if kind not in AUX_TURNS:
        raise ValueError(f"Unknown auxiliary turn {kind!r}; known: {list(AUX_TURNS)}")
    if kind == "which":
        if len(objects) != 1:
            return [], []
        prompt = tokenizer(WHICH_QUESTION, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("ASSISTANT:")]
        target = [tokenizer.convert_tokens_to_ids(str(objects[0].label)), tokenizer.convert_tokens_to_ids("</s>")]
        return prompt + target, [-100] * len(prompt) + target
    if kind == "cells":
        where = {(o.row, o.col): str(o.label) for o in objects}
        empty = [(r, c) for r in range(len(ROW_WORDS)) for c in range(len(COL_WORDS)) if (r, c) not in where]
        cells = list(where) + rng.sample(empty, min(len(where), len(empty)))
        rng.shuffle(cells)
        ids, labels = [], []
        for r, c in cells:
            answer = tokenizer.convert_tokens_to_ids(where.get((r, c), "none"))
            ids += [tokenizer.convert_tokens_to_ids(ROW_WORDS[r]), tokenizer.convert_tokens_to_ids(COL_WORDS[c]), answer]
            labels += [-100, -100, answer]
        return ids, labels
    colour = {o.label: o.colour for o in objects}
    digits = list(range(10))
    rng.shuffle(digits)
    ids, labels = [], []
    for d in digits:
        answer = tokenizer.convert_tokens_to_ids(colour.get(d, "none"))
        ids += [tokenizer.convert_tokens_to_ids(str(d)), answer]
        labels += [-100, answer]
    return ids, labels


def conversation(processor, image, objects, rng: random.Random, turns: int = 5, isolated: bool = False, aux=(), visible=None):
    """Token ids and labels of one multi-turn conversation, every answer supervised.

    The first five turns ask one question of every family (shuffled); turns beyond five add more
    questions of the retrieval families (``EXTRA_FAMILIES``): each costs a few tokens next to the
    256 vision tokens, so they multiply the learning signal per image almost for free. ``aux``
    names dense auxiliary turns (``aux_turn``) added after the questions. ``visible`` (labels, or
    None for all): answer as if only those objects were in the image (``image_questions``).
    """
    tok = processor.tokenizer
    qa = image_questions(rng, objects, visible)
    rng.shuffle(qa)
    seen = {q for _, q, *_ in qa}
    for _ in range(8 * turns):
        if len(qa) >= turns:
            break
        extra = [x for x in image_questions(rng, objects, visible) if x[0] in EXTRA_FAMILIES and x[1] not in seen]
        if extra:
            pick = rng.choice(extra)
            seen.add(pick[1])
            qa.append(pick)
    image_id = tok.convert_tokens_to_ids("<image>")
    user, assistant, eos = (tok.convert_tokens_to_ids(w) for w in ("USER:", "ASSISTANT:", "</s>"))
    shown = objects if visible is None else [o for o in objects if o.label in visible]
    extra = [aux_turn(tok, shown, rng, kind) for kind in aux]
    if isolated:  # one shared "USER: <image>" prefix, then every turn as the evaluation prompt continues it
        ids, labels, segments = [user] + [image_id] * (PATCHES * PATCHES), [], []
        labels, segments = [-100] * len(ids), [0] * len(ids)
        positions = list(range(len(ids)))
        for turn, (_, question, answer, _, _) in enumerate(qa, start=1):
            prompt = tok(question, add_special_tokens=False)["input_ids"] + [assistant]
            target = tok(answer, add_special_tokens=False)["input_ids"] + [eos]
            ids += prompt + target
            labels += [-100] * len(prompt) + target
            segments += [turn] * (len(prompt) + len(target))
            start = PATCHES * PATCHES + 1  # each turn continues the image prefix, as its evaluation prompt does
            positions += list(range(start, start + len(prompt) + len(target)))
        for turn, (aux_ids, aux_labels) in enumerate(extra, start=len(qa) + 1):
            ids, labels, segments = ids + aux_ids, labels + aux_labels, segments + [turn] * len(aux_ids)
            positions += list(range(PATCHES * PATCHES + 1, PATCHES * PATCHES + 1 + len(aux_ids)))
        return ids, labels, segments, positions
    ids, labels = [], []
    for turn, (_, question, answer, _, _) in enumerate(qa):
        prefix = [user] + ([image_id] * (PATCHES * PATCHES) if turn == 0 else []) + tok(question, add_special_tokens=False)["input_ids"] + [assistant]
        target = tok(answer, add_special_tokens=False)["input_ids"] + [eos]
        ids += prefix + target
        labels += [-100] * len(prefix) + target
    for aux_ids, aux_labels in extra:
        ids, labels = ids + aux_ids, labels + aux_labels
    return ids, labels


def isolation_mask(segments: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, L, L) additive mask: causal, every turn sees the shared prefix (segment 0) and itself only.

    ``segments`` (B, L): 0 for the prefix, k for turn k, -1 for padding (which sees only itself).
    """
    L = segments.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal & (k != -1) & ((k == 0) | (k == q))
    allowed |= torch.eye(L, dtype=torch.bool)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


VIDEO_AUX_TURNS = ("frames", "firsts")


def video_aux_turn(tokenizer, contents, rng: random.Random, kind: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one dense auxiliary turn about a clip (``kind`` in ``VIDEO_AUX_TURNS``).

    ``frames``: every frame word in shuffled order, each followed by that frame's digit or
    ``none`` (``three 7 one none ...``); ``firsts``: the ten digits in shuffled order, each followed
    by the word of the frame it first appears in, or ``none``. Like ``aux_turn``, every answer is
    predicted at the position of what it is about (training only).
    """
    if kind not in VIDEO_AUX_TURNS:
        raise ValueError(f"Unknown video auxiliary turn {kind!r}; known: {list(VIDEO_AUX_TURNS)}")
    tid = tokenizer.convert_tokens_to_ids
    if kind == "frames":
        keys = list(range(len(contents)))
        answer = {f: str(contents[f][0].label) if contents[f] else "none" for f in keys}
        word = {f: FRAME_WORDS[f] for f in keys}
    else:
        keys = list(range(10))
        first = {}
        for f, objects in enumerate(contents):
            for o in objects:
                first.setdefault(o.label, FRAME_WORDS[f])
        answer = {d: first.get(d, "none") for d in keys}
        word = {d: str(d) for d in keys}
    rng.shuffle(keys)
    ids, labels = [], []
    for k in keys:
        ids += [tid(word[k]), tid(answer[k])]
        labels += [-100, tid(answer[k])]
    return ids, labels


def video_conversation(processor, contents, rng: random.Random, turns: int = 3, aux=(), visible=None):
    """Token ids, labels, segments and positions of one isolated conversation about a clip.

    The prefix is the evaluation prompt's (``USER:``, then ``frame one`` and the first frame's
    vision tokens, ...); then one isolated turn per video question (``video_questions``, more
    ``frame``/``first`` questions up to ``turns``), then the ``aux`` turns (``video_aux_turn``).
    ``visible`` (frame indices, None = all): answer as if only those frames' digits were there.
    """
    tok = processor.tokenizer
    tid = tok.convert_tokens_to_ids
    shown = [objects if visible is None or f in visible else [] for f, objects in enumerate(contents)]
    ids = [tid("USER:")]
    for f in range(len(contents)):
        ids += tok(f"frame {FRAME_WORDS[f]}", add_special_tokens=False)["input_ids"] + [tid("<image>")] * (PATCHES * PATCHES)
    labels, segments, positions = [-100] * len(ids), [0] * len(ids), list(range(len(ids)))
    start = len(ids)
    qa = video_questions(rng, contents, visible)
    asked = {q for _, q, _, _ in qa}
    for _ in range(8 * turns):
        if len(qa) >= turns:
            break
        extra = [x for x in video_questions(rng, contents, visible) if x[0] in ("frame", "first") and x[1] not in asked]
        if extra:
            pick = rng.choice(extra)
            asked.add(pick[1])
            qa.append(pick)
    parts = []
    for _, question, answer, _ in qa:
        prompt = tok(question, add_special_tokens=False)["input_ids"] + [tid("ASSISTANT:")]
        target = tok(answer, add_special_tokens=False)["input_ids"] + [tid("</s>")]
        parts.append((prompt + target, [-100] * len(prompt) + target))
    parts += [video_aux_turn(tok, shown, rng, kind) for kind in aux]
    for turn, (part_ids, part_labels) in enumerate(parts, start=1):
        ids, labels = ids + part_ids, labels + part_labels
        segments += [turn] * len(part_ids)
        positions += list(range(start, start + len(part_ids)))
    return ids, labels, segments, positions


BLOCK = 4  # side of a dropout block, in patches


def block_keep_mask(share: float, generator: torch.Generator) -> torch.Tensor:
    """Which of the 256 vision tokens (raster order) survive block dropout: the tokens of a random
    ``share`` (at least one) of the aligned ``BLOCK``×``BLOCK``-patch blocks.

    Content-blind like token dropout, but it also shows the model inputs where the kept tokens
    cluster in a few regions with little background around them (token dropout almost never
    does); without it, keeping only a question's evidence tokens derailed the model (it answered
    the wrong kind of word) while keeping as many random tokens did not.
    """
    per_side = PATCHES // BLOCK
    blocks = torch.randperm(per_side * per_side, generator=generator)[: max(1, round(per_side * per_side * share))]
    kept = torch.zeros(per_side, per_side, dtype=torch.bool)
    kept.view(-1)[blocks] = True
    return kept.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1).flatten()


def token_keep_mask(share: float, generator: torch.Generator) -> torch.Tensor:
    """Which of the 256 vision tokens survive plain token dropout: a random ``share`` of them (at least one)."""
    n = PATCHES * PATCHES
    kept = torch.zeros(n, dtype=torch.bool)
    kept[torch.randperm(n, generator=generator)[: max(1, int(n * share))]] = True
    return kept


@dataclass
class VisionDrop:
    """A training-time drop: vision tokens (0-based, raster order) removed before decoder layer ``layer``."""

    layer: int
    kept: torch.Tensor  # (256,) bool; (frames * 256,) for a clip


DROP_KINDS = ("tokens", "blocks", "objects")


def draw_drop(objects, rng: random.Random, keep: tuple, kinds: dict, layers, all_objects: float = 0.0) -> tuple[VisionDrop, list] | None:
    """A training drop and the objects that keep at least one token, or None when ten draws leave
    no object visible.

    Shapes (``kinds``: name -> weight), each with a kept share drawn log-uniformly from ``keep`` =
    [low, high] (small shares, where whole objects vanish, are common): ``tokens``, single tokens;
    ``blocks``, whole 4×4-patch blocks; ``objects``, every object kept whole or dropped whole
    (even odds; with probability ``all_objects`` every object is kept) and, half of the time, no
    background at all (else that share of it) — what a pruner that keeps only the evidence leaves
    (all objects and no background is the evidence of a count question). The conversation's questions are drawn from the
    whole scene and answered as if only the visible objects were there
    (``image_questions(visible=...)``: "Is there a 7?" is "no" when the 7 lost every token): from
    ``layer`` on, the model must answer as if the dropped tokens had never been there. This teaches
    it to read the image *after* that layer: information the first layers gathered from a token
    that is later dropped is worthless (a from-scratch decoder otherwise reads the answer in layer
    0, and no token dropping at layer >= 1 could ever cost it accuracy).
    """
    if not 0 < keep[0] <= keep[1] <= 1:
        raise ValueError(f"token_keep must be [low, high] with 0 < low <= high <= 1, got {list(keep)}")
    unknown = set(kinds) - set(DROP_KINDS)
    if unknown:
        raise ValueError(f"Unknown drop kinds {sorted(unknown)}; known: {list(DROP_KINDS)}")
    names, weights = zip(*kinds.items())
    for _ in range(10):
        share = math.exp(rng.uniform(math.log(keep[0]), math.log(keep[1])))
        generator = torch.Generator().manual_seed(rng.randrange(2**31))
        kind = rng.choices(names, weights)[0]
        if kind == "objects":
            kept = token_keep_mask(share, generator) if rng.random() < 0.5 else torch.zeros(PATCHES * PATCHES, dtype=torch.bool)
            keep_all = all_objects > 0 and rng.random() < all_objects
            for o in objects:
                kept[o.evidence()] = keep_all or rng.random() < 0.5
        else:
            kept = (block_keep_mask if kind == "blocks" else token_keep_mask)(share, generator)
        visible = [o for o in objects if kept[o.evidence()].any()]
        if visible:
            return VisionDrop(rng.choice(list(layers)), kept), visible
    return None


def draw_clip_drop(contents, rng: random.Random, keep: tuple, kinds: dict, layers, all_objects: float = 0.0) -> tuple[VisionDrop, set]:
    """A training drop over a clip's frames (``draw_drop``'s shapes, one shape and kept share for
    the clip, drawn frame by frame) and the frames whose digit keeps at least one token.

    A frame whose digit lost every token counts as empty (``video_questions(visible=...)``).
    """
    names, weights = zip(*kinds.items())
    share = math.exp(rng.uniform(math.log(keep[0]), math.log(keep[1])))
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    kind = rng.choices(names, weights)[0]
    keep_all = kind == "objects" and all_objects > 0 and rng.random() < all_objects
    background = kind != "objects" or rng.random() < 0.5
    masks = []
    for objects in contents:
        if kind == "objects":
            kept = token_keep_mask(share, generator) if background else torch.zeros(PATCHES * PATCHES, dtype=torch.bool)
            for o in objects:
                kept[o.evidence()] = keep_all or rng.random() < 0.5
        else:
            kept = (block_keep_mask if kind == "blocks" else token_keep_mask)(share, generator)
        masks.append(kept)
    visible = {f for f, objects in enumerate(contents) if any(masks[f][o.evidence()].any() for o in objects)}
    return VisionDrop(rng.choice(list(layers)), torch.cat(masks)), visible


def layer_masks(base: torch.Tensor, dropped: list[tuple[int, torch.Tensor]], depth: int) -> list[torch.Tensor]:
    """Per decoder layer, ``base`` (B, 1, L, L additive) with the columns of each sample's dropped
    tokens closed from its drop layer on (a dropped token still sees itself, so no row is empty).

    ``dropped[k]`` = (layer, positions) for sample k. Closing a token's column from layer l on is
    the same as removing its hidden state before layer l, as the engine does, with positions kept.
    """
    masks, current = [], base
    for i in range(depth):
        hit = [(k, pos) for k, (layer, pos) in enumerate(dropped) if layer == i and len(pos)]
        if hit:
            current = current.clone()
            for k, pos in hit:
                diagonal = current[k, 0, pos, pos].clone()
                current[k, 0, :, pos] = torch.finfo(current.dtype).min
                current[k, 0, pos, pos] = diagonal
        masks.append(current)
    return masks


FRAME_TAG_SCALE = 10.0  # logit scale of the frame tags (small: a tag must be a large component of the token to be read)


def frame_tag_loss(hidden: torch.Tensor, frames: int, clips: int, embeddings: torch.Tensor, tokenizer) -> torch.Tensor:
    """Cross-entropy of each vision token's hidden state against the frame word of its frame.

    ``hidden`` (clips * frames * 256, D): the vision tokens of ``clips`` clips in order; logits are
    the dot products with the (frozen) input embeddings of the frame words times
    ``FRAME_TAG_SCALE``. The frame markers of the prompt hold which frame comes next; this
    teaches the first decoder layers to copy it into every vision token ("I am in frame three")
    — a first-order signal for what the frame questions look up. Without it the decoder did not
    tell the frames apart after 200 steps (a linear probe read a token's frame at 0.35-0.43).
    """
    words = torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in FRAME_WORDS[:frames]], device=hidden.device)
    target = torch.arange(frames, device=hidden.device).repeat_interleave(PATCHES * PATCHES).repeat(clips)
    return nn.functional.cross_entropy(hidden.float() @ embeddings.detach()[words].float().T * FRAME_TAG_SCALE, target)


class LVLMModule:
    """Factory for the Lightning module of the whole-model stage."""

    @staticmethod
    def create(model, processor, lr: float, vision_lr: float, steps: int, token_keep=None, turns: int = 5, isolated: bool = False, aux=(),
               drop_kinds=None, frozen_layers: int = 0, drop_share: float = 0.5, drop_layers=(0,), all_objects: float = 0.0,
               video_turns: int = 3, video_aux=(), frame_tags: float = 0.0, frame_tag_layer: int = 1):
        """A LightningModule training the LVLM on conversations; input embeddings frozen.

        ``token_keep`` = [low, high]: a ``drop_share`` of the conversations lose vision tokens
        (``draw_drop``, shapes weighted by ``drop_kinds``, default single tokens) before a decoder
        layer drawn from ``drop_layers``, and are asked about what survives; ``isolated``: turns see
        only the image prefix (``isolation_mask``); the first ``frozen_layers`` decoder layers keep
        their current weights. A batch is a list of scenes, or (video stage) a dict of ``scenes``
        and ``clips``: clips give ``video_conversation``s (``video_turns`` questions, ``video_aux``
        turns, drops drawn by ``draw_clip_drop``) and, with ``frame_tags`` > 0, that weight times
        ``frame_tag_loss`` at the input of decoder layer ``frame_tag_layer``.
        """
        import lightning as L

        tok = processor.tokenizer
        image_id = tok.convert_tokens_to_ids("<image>")
        kinds = drop_kinds or {"tokens": 1.0}

        class Conversations(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = model
                for p in self.model.parameters():
                    p.requires_grad_(True)
                self.model.model.get_input_embeddings().weight.requires_grad_(False)
                for layer in self.model.model.language_model.layers[:frozen_layers]:
                    layer.requires_grad_(False)

            def training_step(self, batch, batch_idx):
                if isinstance(batch, dict):  # video stage: scenes and clips
                    loss = self.image_loss(batch["scenes"]) if batch["scenes"] else 0.0
                    loss = loss + self.video_loss(batch["clips"])
                else:
                    loss = self.image_loss(batch)
                self.log("loss", loss, prog_bar=True)
                return loss

            def image_loss(self, batch):
                """Loss of the conversations about a list of scenes."""
                convs, drops = [], []
                for b in batch:
                    drop, visible = None, None
                    if token_keep is not None:
                        rng = random.Random(f"drop-{b['rng_seed']}")
                        if rng.random() < drop_share and (drawn := draw_drop(b["objects"], rng, token_keep, kinds, drop_layers, all_objects)):
                            drop, visible = drawn[0], {o.label for o in drawn[1]}
                    convs.append(conversation(processor, b["image"], b["objects"], random.Random(b["rng_seed"]), turns, isolated, aux, visible))
                    drops.append(drop)
                length = max(len(c[0]) for c in convs)
                ids = torch.full((len(convs), length), tok.pad_token_id, dtype=torch.long)
                labels = torch.full((len(convs), length), -100, dtype=torch.long)
                segments = torch.full((len(convs), length), -1, dtype=torch.long)
                positions = torch.arange(length).repeat(len(convs), 1)
                for k, c in enumerate(convs):
                    n = len(c[0])
                    ids[k, :n], labels[k, :n], segments[k, :n] = torch.tensor(c[0]), torch.tensor(c[1]), 0
                    if isolated:
                        segments[k, :n], positions[k, :n] = torch.tensor(c[2]), torch.tensor(c[3])
                pixels = processor.image_processor([b["image"] for b in batch], return_tensors="pt")["pixel_values"]
                return self.forward_with_drops(ids, labels, pixels, segments, positions, drops).loss

            def video_loss(self, clips):
                """Loss of the isolated conversations about a list of clips (same frame count), plus the frame tags."""
                convs, drops = [], []
                for c in clips:
                    drop, visible = None, None
                    rng = random.Random(f"drop-{c['rng_seed']}")
                    if token_keep is not None and rng.random() < drop_share:
                        drop, visible = draw_clip_drop(c["contents"], rng, token_keep, kinds, drop_layers, all_objects)
                    convs.append(video_conversation(processor, c["contents"], random.Random(c["rng_seed"]), video_turns, video_aux, visible))
                    drops.append(drop)
                length = max(len(c[0]) for c in convs)
                ids = torch.full((len(convs), length), tok.pad_token_id, dtype=torch.long)
                labels = torch.full((len(convs), length), -100, dtype=torch.long)
                segments = torch.full((len(convs), length), -1, dtype=torch.long)
                positions = torch.arange(length).repeat(len(convs), 1)
                for k, c in enumerate(convs):
                    n = len(c[0])
                    ids[k, :n], labels[k, :n], segments[k, :n], positions[k, :n] = (torch.tensor(x) for x in c)
                pixels = processor.image_processor([f for c in clips for f in c["frames"]], return_tensors="pt")["pixel_values"]
                out = self.forward_with_drops(ids, labels, pixels, segments, positions, drops, hidden_states=frame_tags > 0)
                if frame_tags <= 0:
                    return out.loss
                frames = len(clips[0]["frames"])
                tags = frame_tag_loss(out.hidden_states[frame_tag_layer][ids.to(self.device) == image_id], frames, len(clips),
                                      self.model.model.get_input_embeddings().weight, tok)
                self.log("frame_tag_loss", tags)
                return out.loss + frame_tags * tags

            def forward_with_drops(self, ids, labels, pixels, segments, positions, drops, hidden_states: bool = False):
                """The model on whole conversations (``segments``: 0 prefix, k turn k, -1 padding),
                each sample's ``VisionDrop`` (or None) applied by per-layer masks.
                """
                dropped = []
                for k, drop in enumerate(drops):
                    vision = (ids[k] == image_id).nonzero().flatten()
                    dropped.append((drop.layer, vision[~drop.kept]) if drop else (-1, vision[:0]))
                base = isolation_mask(segments, torch.float32)
                decoder = self.model.model.language_model
                masks = layer_masks(base, dropped, len(decoder.layers))
                hooks = [layer.register_forward_pre_hook(lambda mod, args, kwargs, m=m: (args, {**kwargs, "attention_mask": m.to(self.device)}),
                                                         with_kwargs=True)
                         for layer, m in zip(decoder.layers, masks) if m is not base]
                try:
                    return self.model(input_ids=ids.to(self.device), pixel_values=pixels.to(self.device), attention_mask=base.to(self.device),
                                      position_ids=positions.to(self.device), labels=labels.to(self.device), output_hidden_states=hidden_states)
                finally:
                    for hook in hooks:
                        hook.remove()

            def configure_optimizers(self):
                vision = list(self.model.model.vision_tower.parameters()) + list(self.model.model.multi_modal_projector.parameters())
                vision_ids = {id(p) for p in vision}
                rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in vision_ids]
                opt = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": vision, "lr": vision_lr}],
                                        weight_decay=0.05, betas=(0.9, 0.98))
                sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, vision_lr], total_steps=steps, pct_start=0.05)
                return [opt], [{"scheduler": sched, "interval": "step"}]

        return Conversations()


@dataclass
class StageConfig:
    """One training stage (``configs/proxy.yaml``: ``align`` and ``lvlm``)."""

    steps: int = 300  # optimiser steps
    batch: int = 32  # scenes per step
    lr: float = 3e-3  # peak learning rate (one-cycle schedule)
    vision_lr: float = 1e-4  # peak learning rate of tower + projector (lvlm stage)
    token_keep: list | None = None  # [low, high] share of vision tokens kept by a drop, whose conversation asks about what survives (None: no drops)
    turns: int = 5  # questions per conversation (lvlm/robust): one per family, then more retrieval questions
    isolated: bool = False  # each turn sees only the image prefix and itself (no answer leaks between turns)
    aux: list = field(default_factory=list)  # dense auxiliary turns after the questions (``AUX_TURNS``), e.g. [digits]
    drop_kinds: dict = field(default_factory=lambda: {"tokens": 1.0})  # drop shapes and their weights: tokens, blocks, objects (see draw_drop)
    drop_share: float = 0.5  # share of the conversations given a vision-token drop (when token_keep is set)
    drop_layers: list = field(default_factory=lambda: [0])  # decoder layers a drop happens before (drawn uniformly; 0 = the input)
    all_objects: float = 0.0  # in an "objects" drop, probability that every object is kept (else each with even odds)
    content_ce: float = 0.0  # align stage: logit scale of the per-patch content-word cross-entropy (0: regression only)
    clips: int = 0  # video stage: clips per step, beside ``batch`` scenes
    frames: list = field(default_factory=lambda: [1, FRAMES])  # video stage: [min, max] frames per clip, drawn per step
    video_turns: int = 3  # video stage: questions per clip (one per family, then more frame/first questions)
    video_aux: list = field(default_factory=list)  # video stage: dense auxiliary turns after the questions (``VIDEO_AUX_TURNS``)
    frame_tags: float = 0.0  # video stage: weight of ``frame_tag_loss`` (0: none)
    frame_tag_layer: int = 1  # video stage: the decoder layer whose input the frame tags are read from


STAGES = ("align", "lvlm", "robust", "video")


@dataclass
class TrainConfig:
    """The whole recipe (``configs/proxy.yaml``)."""

    seed: int = 0  # everything (scenes, initialisation) follows from it
    output: str = "v2drop/assets/proxy"  # where the trained model and processor are saved
    workdir: str = "runs/proxy"  # checkpoints and logs
    threads: int = 2  # torch CPU threads
    precision: str = "32-true"  # Lightning precision (bf16 autocast is 10x slower on CPUs without bf16 units)
    model: ProxyConfig = field(default_factory=ProxyConfig)
    align: StageConfig = field(default_factory=lambda: StageConfig(steps=300, batch=32, lr=3e-3))
    lvlm: StageConfig = field(default_factory=lambda: StageConfig(steps=800, batch=16, lr=1.5e-3, vision_lr=1e-4))
    robust: StageConfig = field(default_factory=lambda: StageConfig(steps=600, batch=16, lr=7e-4, vision_lr=5e-5, token_keep=[0.05, 1.0]))
    video: StageConfig = field(default_factory=lambda: StageConfig(steps=0, batch=8, lr=1e-3, vision_lr=0.0, clips=4))
    frozen_decoder_layers: int = 0  # the first N decoder layers keep their initial weights in every stage (see README: proxy)
    checkpoint_every: int = 50  # steps between Lightning checkpoints (what an interrupted stage resumes from)
    monitor_every: int = 0  # every N steps print validation accuracy per family (0: never)
    monitor_samples: int = 100  # validation questions the monitor scores

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Build from YAML data; unknown keys are an error naming the valid ones."""
        import dataclasses

        def build(kind, values):
            valid = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - valid
            if unknown:
                raise ValueError(f"Unknown {kind.__name__} keys {sorted(unknown)}; valid keys: {sorted(valid)}")
            return values

        data = dict(build(cls, data or {}))
        if "model" in data:
            data["model"] = ProxyConfig(**build(ProxyConfig, data["model"]))
        for stage in STAGES:
            if stage in data:
                data[stage] = StageConfig(**{**asdict(getattr(cls(), stage)), **build(StageConfig, data[stage])})
        lo, hi = data["video"].frames if "video" in data else (1, FRAMES)
        if not 1 <= lo <= hi <= len(FRAME_WORDS):
            raise ValueError(f"video.frames must be [min, max] with 1 <= min <= max <= {len(FRAME_WORDS)}, got {[lo, hi]}")
        return cls(**data)


def _PrintLoss(stage: str, every: int = 25):
    """A callback printing the step, loss and elapsed time every ``every`` steps (for logs without a TTY)."""
    import time

    import lightning as L

    class PrintLoss(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.start = time.time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % every == 0 or step == trainer.max_steps:
                loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
                print(f"[{stage}] step {step}/{trainer.max_steps} loss {loss:.4f} {time.time() - self.start:.0f}s", flush=True)

    return PrintLoss()


@dataclass
class KeepGiven(Scorer):
    """Scores 1 for the given vision-token indices, 0 elsewhere (an oracle for the validity bar; not registered)."""

    keep: tuple = ()

    def score(self, state):
        """1 on the given indices of the current vision tokens, 0 elsewhere."""
        scores = torch.zeros(state.vision_idx.shape, dtype=torch.float32)
        index = torch.tensor([k for k in self.keep if k < scores.shape[1]], dtype=torch.long)
        scores[:, index] = 1.0
        return scores


BAR_CONDITIONS = ("full", "no image", "evidence", "random")


def bar_methods(sample, layer: int) -> dict[str, Method]:
    """The validity-bar conditions for one sample: no dropping, no image, its evidence only, as many random tokens."""
    n = len(sample.evidence)
    return {
        "full": Method.none(),
        "no image": Method("random", schedule=Schedule.one_shot(0, 0.0, min_keep=0)),
        "evidence": Method(KeepGiven(keep=tuple(sample.evidence)), schedule=Schedule.one_shot(layer, n, keep_mode="absolute", min_keep=0)),
        "random": Method("random", schedule=Schedule.one_shot(layer, n, keep_mode="absolute", min_keep=0)),
    }


def bar_table(lvlm, bench, samples, layer: int = 2, conditions=BAR_CONDITIONS, progress: bool = False) -> dict[str, dict[str, float]]:
    """Accuracy per condition and family (plus ``overall``) of the quality and validity bars."""
    from tqdm import tqdm

    correct: dict[str, dict[str, list[bool]]] = {}
    for sample in tqdm(samples, desc="check", disable=not progress):
        inputs = lvlm.prepare([lvlm.format_prompt(sample.question, n_images=len(sample.images))], [list(sample.images)])
        for name, method in bar_methods(sample, layer).items():
            if name in conditions:
                text = lvlm.generate_from_inputs(inputs, method, max_new_tokens=4).texts[0]
                correct.setdefault(name, {}).setdefault(sample.family, []).append(bench.is_correct(text, sample))
    table = {}
    for name, per_family in correct.items():
        table[name] = {f: sum(v) / len(v) for f, v in sorted(per_family.items())}
        table[name]["overall"] = sum(sum(v) for v in per_family.values()) / sum(len(v) for v in per_family.values())
    return table


def _Monitor(processor, every: int, n: int, benchmarks=("digits",)):
    """A callback printing the bar conditions on ``n`` validation questions of each benchmark every ``every`` steps."""
    import lightning as L

    from v2drop.benchmarks import get_benchmark
    from v2drop.lvlm import LVLM

    sets = [(get_benchmark(name), get_benchmark(name).load("validation", n)) for name in benchmarks]

    class Monitor(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % every == 0:
                for bench, samples in sets:
                    with torch.no_grad():
                        lvlm = LVLM(pl_module.model, processor)
                        table = bar_table(lvlm, bench, samples, layer=min(2, lvlm.depth - 1), conditions=("full", "evidence", "random"))
                    for name, row in table.items():
                        print(f"[monitor] step {trainer.global_step} {bench.name} {name:<8} " + " ".join(f"{k} {v:.2f}" for k, v in row.items()),
                              flush=True)
                pl_module.model.train()

    return Monitor()


def train(cfg: TrainConfig, resume: bool = True, progress: bool = True) -> Path:
    """Run the stages (resuming from the last checkpoint of each) and save the model and processor."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True)
    work = Path(cfg.workdir)
    processor = build_processor()
    model = build_model(cfg.model, processor.tokenizer)

    def conversations(stage: StageConfig):
        return LVLMModule.create(model, processor, stage.lr, stage.vision_lr, stage.steps, token_keep=stage.token_keep, turns=stage.turns,
                                 isolated=stage.isolated, aux=stage.aux, drop_kinds=stage.drop_kinds, frozen_layers=cfg.frozen_decoder_layers,
                                 drop_share=stage.drop_share, drop_layers=stage.drop_layers, all_objects=stage.all_objects,
                                 video_turns=stage.video_turns, video_aux=stage.video_aux, frame_tags=stage.frame_tags,
                                 frame_tag_layer=stage.frame_tag_layer)

    for name, stage, factory in (
        ("align", cfg.align, lambda: AlignModule.create(model, processor, cfg.align.lr, cfg.align.steps, cfg.align.content_ce)),
        ("lvlm", cfg.lvlm, lambda: conversations(cfg.lvlm)),
        ("robust", cfg.robust, lambda: conversations(cfg.robust)),
        ("video", cfg.video, lambda: conversations(cfg.video)),
    ):
        if stage.steps <= 0:
            continue
        done = work / name / "done.pt"
        _check_stage_record(work / name / "stage.json", cfg, name, resume)
        if resume and done.exists():
            model.load_state_dict(torch.load(done, weights_only=True))
            continue
        module = factory()
        ckpt_dir = work / name / "checkpoints"
        last = ckpt_dir / "last.ckpt"
        trainer = L.Trainer(
            max_steps=stage.steps, accelerator="cpu", devices=1, precision=cfg.precision, logger=False,
            enable_progress_bar=progress, enable_model_summary=False, gradient_clip_val=1.0, log_every_n_steps=10,
            callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=cfg.checkpoint_every, save_top_k=0), _PrintLoss(name)]
            + ([_Monitor(processor, cfg.monitor_every, cfg.monitor_samples, ("digits", "digits-video") if name == "video" else ("digits",))]
               if cfg.monitor_every and name != "align" else []),
        )
        offset = STAGES.index(name) * 10**6
        resuming = resume and last.exists()
        # Lightning cannot fast-forward an iterable stream: start it where the checkpoint stopped,
        # so an interrupted stage sees the scenes an uninterrupted one would (scenes are seeded by index).
        done_steps = torch.load(last, map_location="cpu", weights_only=False)["global_step"] if resuming else 0
        if name == "video":
            loader = torch.utils.data.DataLoader(ClipStream(cfg.seed + offset, stage.batch, stage.clips, stage.frames, start=done_steps),
                                                 batch_size=None, collate_fn=_collate)
        else:
            loader = torch.utils.data.DataLoader(SceneStream(cfg.seed + offset, start=done_steps * stage.batch), batch_size=stage.batch,
                                                 collate_fn=_collate)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(last) if resuming else None)
        done.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), done)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    return out


def _check_stage_record(path: Path, cfg: TrainConfig, name: str, resume: bool) -> None:
    """Record what a stage's checkpoints were trained with; refuse to resume them under a different recipe.

    A stage's weights depend on the seed, the model shape, its own settings and every earlier
    stage's, so those are what must match.
    """
    names = list(STAGES)
    record = {"seed": cfg.seed, "model": asdict(cfg.model), "frozen_decoder_layers": cfg.frozen_decoder_layers}
    record.update({n: asdict(getattr(cfg, n)) for n in names[: names.index(name) + 1]})
    record = json.loads(json.dumps(record))  # tuples -> lists, as read back
    if resume and path.exists():
        saved = json.loads(path.read_text())
        if saved != record:
            diff = sorted(k for k in set(saved) | set(record) if saved.get(k) != record.get(k))
            raise ValueError(f"{path.parent} was trained with different settings ({', '.join(diff)}); "
                             "use another workdir or --fresh to start over")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
