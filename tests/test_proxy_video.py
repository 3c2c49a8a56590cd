"""The proxy's video stage: frame markers, clip conversations, clip drops, frame tags, the clip stream."""

import random

import numpy as np
import pytest
import torch

from experiments.proxy.data import isolation_mask
from experiments.proxy.model import FRAME_WORDS, ProxyConfig, build_model, build_processor, build_tokenizer
from experiments.proxy.train import TrainConfig
from experiments.proxy.video import (
    FRAME_TAG_SCALE,
    ClipStream,
    draw_clip_drop,
    frame_tag_loss,
    video_aux_turn,
    video_conversation,
)
from v2drop.benchmarks import get_benchmark
from v2drop.benchmarks.digits import Object, video_questions
from v2drop.config import config_from_dict
from v2drop.lvlm import LVLM


def _digit(label: int, row: int = 0, col: int = 0) -> Object:
    mask = np.zeros((64, 64), dtype=bool)
    mask[row * 16 + 2 : row * 16 + 10, col * 16 + 2 : col * 16 + 10] = True
    return Object(label, "white", row, col, mask)


def test_multi_image_prompts_mark_every_frame():
    """One image: the plain prompt; several: "frame one <image>", "frame two <image>", ...; past the eighth, "frame"
    alone.
    """
    processor = build_processor()
    lvlm = LVLM(
        build_model(ProxyConfig(hidden=32, intermediate=64, layers=2, vision_hidden=32), processor.tokenizer), processor
    )
    assert lvlm.format_prompt("Q?") == "USER: <image>\nQ? ASSISTANT:"
    assert (
        lvlm.format_prompt("Q?", n_images=3)
        == "USER: frame one <image>\nframe two <image>\nframe three <image>\nQ? ASSISTANT:"
    )
    nine = lvlm.format_prompt("Q?", n_images=9)
    assert nine.count("<image>") == 9 and "frame eight <image>\nframe <image>\nQ?" in nine


def test_video_training_turns_see_exactly_the_evaluation_prompt():
    """Every question turn of a clip conversation has the evaluation prompt's ids and positions, and its logits."""
    processor = build_processor()
    torch.manual_seed(0)
    model = build_model(ProxyConfig(hidden=32, intermediate=64, layers=2, vision_hidden=32), processor.tokenizer).eval()
    lvlm = LVLM(model, processor)
    frames, contents, _ = get_benchmark("digits-video").clip("train", 5, frames=3)
    ids, labels, segments, positions = video_conversation(
        processor, contents, random.Random(1), turns=4, aux=["frames", "firsts"]
    )
    prefix = segments.index(1)
    assert prefix == 1 + 3 * (2 + 256)
    pixels = processor.image_processor(frames, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor([ids]),
            pixel_values=pixels,
            position_ids=torch.tensor([positions]),
            attention_mask=isolation_mask(torch.tensor([segments])),
        ).logits[0]
        starts = [
            i
            for i in range(len(labels))
            if labels[i] != -100
            and labels[i - 1] == -100
            and ids[i - 1] == processor.tokenizer.convert_tokens_to_ids("ASSISTANT:")
        ]
        assert len(starts) == 4
        for start in starts:
            first = segments.index(segments[start])
            question = processor.tokenizer.decode(ids[first : start - 1])
            inputs = lvlm.prepare([lvlm.format_prompt(question, n_images=3)], [frames])
            assert inputs["input_ids"][0].tolist() == ids[:prefix] + ids[first:start]
            assert positions[first:start] == list(range(prefix, prefix + start - first))
            alone = model(**inputs).logits[0, -1]
            torch.testing.assert_close(logits[start - 1], alone, atol=1e-4, rtol=0)


def test_video_aux_turns_name_every_frame_and_every_digit():
    """``frames``: each frame word once, answered by its digit or none; ``firsts``: each digit once, by the frame it
    first shows in.
    """
    tok = build_tokenizer()
    contents = [[_digit(4)], [], [_digit(7)], [_digit(4)]]
    ids, labels = video_aux_turn(tok, contents, random.Random(0), "frames")
    words, answers = tok.convert_ids_to_tokens(ids[0::2]), tok.convert_ids_to_tokens(ids[1::2])
    assert sorted(words) == sorted(FRAME_WORDS[:4])
    expected = {"one": "4", "two": "none", "three": "7", "four": "4"}
    assert answers == [expected[w] for w in words]
    assert labels[0::2] == [-100] * 4 and labels[1::2] == ids[1::2]
    ids, labels = video_aux_turn(tok, contents, random.Random(0), "firsts")
    words, answers = tok.convert_ids_to_tokens(ids[0::2]), tok.convert_ids_to_tokens(ids[1::2])
    assert sorted(words) == [str(d) for d in range(10)]
    first = {"4": "one", "7": "three"}
    assert answers == [first.get(w, "none") for w in words]
    with pytest.raises(ValueError, match=r"Unknown video auxiliary turn 'digits'; known: \['frames', 'firsts'\]"):
        video_aux_turn(tok, contents, random.Random(0), "digits")


def test_video_questions_answer_as_if_only_the_visible_frames_had_digits():
    """``visible``: a frame whose digit was dropped counts as empty; with None the benchmark's own samples come out."""
    contents = [[_digit(4)], [], [_digit(7)], [_digit(4)]]
    for seed in range(40):
        full = video_questions(random.Random(seed), contents)
        part = video_questions(random.Random(seed), contents, visible={2, 3})
        assert [q for _, q, _, _ in full] == [q for _, q, _, _ in part]  # same questions, same RNG use
        for (family, question, answer, _), (_, _, full_answer, _) in zip(part, full):
            if family == "frames":
                assert (answer, full_answer) == ("2", "3")
            elif family == "frame":
                assert answer == (full_answer if "three" in question or "four" in question else "none")
            elif "4" in question:
                assert (answer, full_answer) == ("four", "one")
            else:
                assert answer == full_answer == "three"
    bench = get_benchmark("digits-video")
    frames, contents, rng = bench.clip("test", 2)
    samples = [s for s in bench.load("test", 12) if s.id.startswith("test-2-")]
    assert [(s.family, s.question, s.answer, s.evidence) for s in samples] == [
        (f, q, a, tuple(e)) for f, q, a, e in video_questions(rng, contents)
    ]


def test_clip_drops_keep_whole_objects_and_report_the_visible_frames():
    """One shape and share per clip; the visible frames are exactly those whose digit keeps a token."""
    frames, contents, _ = get_benchmark("digits-video").clip("train", 3)
    with_digit = [f for f in range(8) if contents[f]]
    assert len(with_digit) >= 3
    partial = False
    for kind in ("tokens", "blocks", "objects"):
        for seed in range(20):
            drop, visible = draw_clip_drop(contents, random.Random(seed), (0.05, 0.5), {kind: 1.0}, [1, 2])
            assert drop.kept.shape == (8 * 256,) and drop.layer in (1, 2)
            kept = set(drop.kept.nonzero().flatten().tolist())
            assert visible == {f for f in with_digit if kept & set(contents[f][0].evidence(f * 256))}
            partial |= 0 < len(visible) < len(with_digit)
            if kind == "objects":
                assert all(set(contents[f][0].evidence(f * 256)) <= kept or f not in visible for f in with_digit)
    assert partial
    for seed in range(5):
        drop, visible = draw_clip_drop(
            contents, random.Random(seed), (0.05, 0.5), {"objects": 1.0}, [2], all_objects=1.0
        )
        assert visible == set(with_digit)


def test_frame_tag_loss_is_the_cross_entropy_against_the_frame_words():
    """Hand-made hidden states: the loss equals the cross-entropy of scaled dot products with the frame-word
    embeddings."""
    tok = build_tokenizer()
    torch.manual_seed(0)
    embeddings = torch.randn(len(tok), 8)
    hidden = torch.randn(2 * 3 * 256, 8)  # two clips of three frames
    words = [tok.convert_tokens_to_ids(w) for w in ("one", "two", "three")]
    logits = hidden @ embeddings[words].T * FRAME_TAG_SCALE
    target = torch.tensor([0] * 256 + [1] * 256 + [2] * 256 + [0] * 256 + [1] * 256 + [2] * 256)
    expected = -logits.log_softmax(-1)[torch.arange(len(target)), target].mean()
    torch.testing.assert_close(frame_tag_loss(hidden, 3, 2, embeddings, tok), expected)
    tagged = embeddings[words].repeat_interleave(256, 0).repeat(2, 1) * 10  # states that carry their frame word
    assert frame_tag_loss(tagged, 3, 2, embeddings, tok) < frame_tag_loss(tagged.roll(256, 0), 3, 2, embeddings, tok)


def test_clip_stream_gives_fixed_size_steps_and_resumes_where_it_stopped():
    """Each step: ``scenes`` scenes and ``clips`` clips of one frame count in range; a stream started at step k repeats
    step k.
    """
    stream = iter(ClipStream(5, scenes=2, clips=3, frames=[2, 4]))
    steps = [next(stream) for _ in range(4)]
    for step in steps:
        assert len(step["scenes"]) == 2 and len(step["clips"]) == 3
        counts = {len(c["frames"]) for c in step["clips"]}
        assert len(counts) == 1 and 2 <= counts.pop() <= 4
        assert all(len(c["contents"]) == len(c["frames"]) for c in step["clips"])
    resumed = next(iter(ClipStream(5, scenes=2, clips=3, frames=[2, 4], start=3)))
    assert [c["rng_seed"] for c in resumed["clips"]] == [c["rng_seed"] for c in steps[3]["clips"]]
    assert [s["rng_seed"] for s in resumed["scenes"]] == [s["rng_seed"] for s in steps[3]["scenes"]]


def test_config_rejects_frame_counts_past_the_frame_words():
    """``video.frames`` beyond the eight frame words is a one-line error naming the range."""
    with pytest.raises(ValueError, match=r"video.frames must be \[min, max\] with 1 <= min <= max <= 8, got \[2, 9\]"):
        config_from_dict(TrainConfig, {"video": {"frames": [2, 9]}})
