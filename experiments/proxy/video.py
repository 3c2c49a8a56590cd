"""The optional video stage: clips of 1–8 frames beside the image conversations (off in the shipped recipe,
``video.steps: 0``).

A multi-image prompt marks every frame (``frame three <image>``, ``model.CHAT_TEMPLATE``); a clip
gives isolated video questions, dense ``frames``/``firsts`` turns and clip drops
(``draw_clip_drop``) as the image stages do, and ``frame_tag_loss`` can teach the first decoder
layer to copy each frame's marker into its vision tokens. Why the shipped recipe leaves the stage
off is in ``docs/proxy.md``.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from experiments.proxy.data import pad_conversations, question_turn
from experiments.proxy.drops import VisionDrop, check_drop_settings, draw_shape, shape_mask
from experiments.proxy.model import FRAME_WORDS, VISION_TOKENS
from v2drop.benchmarks.digits import Digits, DigitsVideo, video_questions

VIDEO_AUX_TURNS = ("frames", "firsts")  # the dense auxiliary turns ``video_aux_turn`` builds
FRAME_TAG_SCALE = 10.0  # logit scale of the frame tags (small: a tag must be a large component of the token to be read)


class ClipStream(torch.utils.data.IterableDataset):
    """An endless, seeded stream of video-stage steps, each ``scenes`` training scenes and ``clips`` training clips.

    Every clip of a step has the same frame count, drawn per step from ``frames`` = [min, max];
    ``start`` = steps already done.
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


def video_aux_turn(tokenizer, contents, rng: random.Random, kind: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one dense auxiliary turn about a clip (``kind`` in ``VIDEO_AUX_TURNS``).

    ``frames``: every frame word in shuffled order, each followed by that frame's digit or
    ``none`` (``three 7 one none ...``); ``firsts``: the ten digits in shuffled order, each followed
    by the word of the frame it first appears in, or ``none``. Like ``data.aux_turn``, every answer
    is predicted at the position of what it is about (training only).
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
        ids += tok(f"frame {FRAME_WORDS[f]}", add_special_tokens=False)["input_ids"] + [tid("<image>")] * VISION_TOKENS
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
    parts = [question_turn(tok, question, answer) for _, question, answer, _ in qa]
    parts += [video_aux_turn(tok, shown, rng, kind) for kind in aux]
    for turn, (part_ids, part_labels) in enumerate(parts, start=1):
        ids, labels = ids + part_ids, labels + part_labels
        segments += [turn] * len(part_ids)
        positions += list(range(start, start + len(part_ids)))
    return ids, labels, segments, positions


def draw_clip_drop(
    contents, rng: random.Random, keep, kinds: dict, layers, all_objects: float = 0.0
) -> tuple[VisionDrop, set]:
    """A training drop over a clip's frames and the frames whose digit keeps at least one token.

    ``drops.draw_drop``'s shapes, one shape and kept share for the clip, drawn frame by frame. A
    frame whose digit lost every token counts as empty (``video_questions(visible=...)``).
    """
    check_drop_settings(keep, kinds)
    share, generator, kind = draw_shape(rng, keep, kinds)
    keep_all = kind == "objects" and all_objects > 0 and rng.random() < all_objects
    background = kind != "objects" or rng.random() < 0.5
    masks = [shape_mask(kind, share, generator, objects, rng, background, keep_all) for objects in contents]
    visible = {f for f, objects in enumerate(contents) if any(masks[f][o.evidence()].any() for o in objects)}
    return VisionDrop(rng.choice(list(layers)), torch.cat(masks)), visible


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
    target = torch.arange(frames, device=hidden.device).repeat_interleave(VISION_TOKENS).repeat(clips)
    return nn.functional.cross_entropy(hidden.float() @ embeddings.detach()[words].float().T * FRAME_TAG_SCALE, target)


def video_loss(module, clips) -> torch.Tensor:
    """Loss of ``module`` (a ``train.ConversationModule``) on isolated conversations about clips of one frame count,
    plus the frame tags.
    """
    stage, tok = module.stage, module.processor.tokenizer
    convs, drops = [], []
    for c in clips:
        drop, visible = None, None
        rng = random.Random(f"drop-{c['rng_seed']}")
        if stage.token_keep is not None and rng.random() < stage.drop_share:
            drop, visible = draw_clip_drop(
                c["contents"], rng, stage.token_keep, stage.drop_kinds, stage.drop_layers, stage.all_objects
            )
        convs.append(
            video_conversation(
                module.processor,
                c["contents"],
                random.Random(c["rng_seed"]),
                stage.video_turns,
                stage.video_aux,
                visible,
            )
        )
        drops.append(drop)
    ids, labels, segments, positions = pad_conversations(convs, tok.pad_token_id)
    pixels = module.processor.image_processor([f for c in clips for f in c["frames"]], return_tensors="pt")[
        "pixel_values"
    ]
    out = module.forward_with_drops(ids, labels, pixels, segments, positions, drops, hidden_states=stage.frame_tags > 0)
    if stage.frame_tags <= 0:
        return out.loss
    vision = ids.to(module.device) == tok.convert_tokens_to_ids("<image>")
    tags = frame_tag_loss(
        out.hidden_states[stage.frame_tag_layer][vision],
        len(clips[0]["frames"]),
        len(clips),
        module.model.model.get_input_embeddings().weight,
        tok,
    )
    module.log("frame_tag_loss", tags)
    return out.loss + stage.frame_tags * tags
