"""The controls ``pool`` and ``downsample``: fewer vision tokens, none chosen (``v2drop/scorers/controls.py``).

Pooling is checked on hand-worked grids and, end to end, against the model run by transformers on
a prompt whose images are the hand-pooled features; downsampling against the model's own vision
tower run on the resized image (position embeddings interpolated by transformers' CLIP).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from prellm_helpers import prellm_state

import v2drop
from v2drop import Method, Schedule
from v2drop.benchmarks import get_benchmark
from v2drop.models.llava import resized_pixels
from v2drop.schedule import PRE_LLM
from v2drop.scorers.controls import DownsampleScorer, PoolScorer, proportional_share, target_grid
from v2drop.testing import image, prompt_for


def grid_coords(rows: int, cols: int, image_idx: int = 0) -> torch.Tensor:
    """(1, rows · cols, 3) raster coordinates of one image's token grid."""
    k = torch.arange(rows * cols)
    return torch.stack([torch.full_like(k, image_idx), k // cols, k % cols], -1)[None]


def pooled_by(state, k: int):
    """(added hidden states, their sources, kept) of pool at a count of ``k`` on the one sample of ``state``."""
    scorer = PoolScorer()
    sel = scorer.select(state, scorer.score(state), [k])
    assert sel.added_at_source
    return sel.added_hidden[0], sel.added_source[0].tolist(), sel.keep[0].tolist()


@pytest.mark.parametrize(
    ("rows", "cols", "k", "grid"),
    [
        (24, 24, 192, (13, 14)),  # LLaVA-1.5's budgets
        (24, 24, 128, (11, 11)),
        (24, 24, 64, (8, 8)),
        (16, 16, 85, (9, 9)),  # the proxy at a third
        (4, 4, 4, (2, 2)),
        (2, 8, 4, (1, 4)),  # floor(sqrt(4 * 2 / 8)) = 1 row
        (3, 3, 9, (3, 3)),  # covered: the grid itself
        (3, 3, 0, (0, 0)),
    ],
)
def test_target_grid_keeps_the_aspect_and_stays_within_the_budget(rows, cols, k, grid):
    assert target_grid(rows, cols, k) == grid


def test_proportional_share_gives_leftovers_to_the_largest_remainders():
    assert proportional_share(10, [6, 3, 3]) == [5, 3, 2]  # 5, 2.5, 2.5: the earlier .5 first
    assert proportional_share(7, [64, 64]) == [4, 3]
    assert sum(proportional_share(128, [576, 576, 100])) == 128


def test_pool_4x4_to_2x2_is_the_mean_of_each_quarter():
    values = torch.arange(16.0)  # the token at (r, c) holds 4r + c
    hidden = torch.cat([torch.zeros(1), values, torch.zeros(2)])[None, :, None].expand(1, 19, 2).clone()
    hidden[..., 1] *= -1
    state = prellm_state(hidden, 16, coords=grid_coords(4, 4))
    pooled, source, kept = pooled_by(state, 4)
    expected = torch.tensor([[2.5, 4.5], [10.5, 12.5]]).flatten()  # (0+1+4+5)/4, (2+3+6+7)/4, ...
    torch.testing.assert_close(pooled, torch.stack([expected, -expected], -1), rtol=0, atol=0)
    assert source == [5, 7, 13, 15]  # each cell's centre token ⌊(2i+1)·4/4⌋ = rows/cols 1 and 3
    assert kept == []


def test_pool_3x3_to_2x2_averages_overlapping_adaptive_cells():
    hidden = torch.cat([torch.zeros(1), torch.arange(9.0)])[None, :, None]
    state = prellm_state(hidden, 9, coords=grid_coords(3, 3))
    pooled, source, _ = pooled_by(state, 4)
    # cells span rows/cols [0, 2) and [1, 3): (0+1+3+4)/4 = 2, (1+2+4+5)/4 = 3, (3+4+6+7)/4 = 5, (4+5+7+8)/4 = 6
    assert pooled.flatten().tolist() == [2.0, 3.0, 5.0, 6.0]
    assert source == [0, 2, 6, 8]  # centres ⌊(2i+1)·3/4⌋ = rows/cols 0 and 2


def test_pool_without_a_grid_pools_in_one_dimension_and_keeps_covered_images():
    """Two images of one sample: a 2x2 grid (its share covers it: kept) and 5 tokens on no grid (pooled in 1-D)."""
    coords = torch.cat(
        [grid_coords(2, 2, 0), torch.tensor([[[1, 0, 0], [1, 0, 2], [1, 1, 1], [1, 3, 0], [1, 3, 3]]])], 1
    )
    hidden = torch.cat([torch.zeros(1), torch.arange(9.0)])[None, :, None]
    state = prellm_state(hidden, 9, coords=coords)
    pooled, source, kept = pooled_by(state, 6)  # shares of 6 over 4 + 5 tokens: 3 (of 2.67) and 3 (of 3.33)
    assert kept == []  # 3 < 4: the grid is pooled too, to target_grid(2, 2, 3) = 1 x 2
    # (0+2)/2, (1+3)/2 | 5 values into 3 windows: [4, 5], [5, 6, 7], [7, 8]
    assert pooled.flatten().tolist() == [1.0, 2.0, 4.5, 6.0, 7.5]
    pooled, source, kept = pooled_by(state, 8)  # shares 4 and 4: the grid is kept, the 5 tokens pooled to 4
    assert kept == [0, 1, 2, 3] and pooled.flatten().tolist() == [4.5, 5.5, 6.5, 7.5]


def _short_prompt(inputs: dict, image_token: int, per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt ids with each run of image placeholders cut to its first ``per_image`` tokens, and the mask of
    the placeholders left."""
    ids = inputs["input_ids"][0][inputs["attention_mask"][0].bool()]
    keep, run = [], 0
    for token in ids.tolist():
        run = run + 1 if token == image_token else 0
        keep.append(token != image_token or run <= per_image)
    short = ids[torch.tensor(keep)][None]
    return short, short == image_token


def _logits_of(lvlm, ids: torch.Tensor, placeholder: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Last-token logits of transformers' model on ``ids`` with ``features`` at the placeholders (contiguous
    positions)."""
    with torch.no_grad():
        embeds = lvlm.model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter(placeholder[..., None], features.to(embeds.dtype))
        return lvlm.model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).logits[:, -1].float()


def test_pool_before_the_llm_is_the_model_fed_pooled_features_with_text_between_images(tiny):
    """Two 8x8 images with text between: pool to 32 (4x4 each) equals transformers on the 2x2-average-pooled
    features in the images' own places (each pooled token stays with its image, the text between stays between)."""
    lvlm = tiny("llava")
    prompt = "USER: <image> and then <image>\nwhat is the digit ? ASSISTANT:"
    inputs = lvlm.prepare([prompt], [[image(0), image(1)]])
    method = Method("pool", schedule=Schedule.one_shot(PRE_LLM, 32, "absolute"), position_policy="renumber")
    out = lvlm.generate_from_inputs(inputs, method, max_new_tokens=1, stop_at_eos=False)
    assert out.traces[0].vision_tokens_per_layer == [32] * lvlm.depth
    with torch.no_grad():
        feats = lvlm.model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    pooled = [F.avg_pool2d(f.T.reshape(1, -1, 8, 8), 2).flatten(2)[0].T for f in feats]  # (16, D) each
    short, placeholder = _short_prompt(inputs, lvlm.adapter.image_token_id, 16)
    expected = _logits_of(lvlm, short, placeholder, torch.cat(pooled))
    torch.testing.assert_close(out.first_logits, expected, atol=1e-5, rtol=0)
    merged = out.traces[0].stages[0]["merged"]
    assert merged == sorted(merged) and len(merged) == 32


def test_downsample_is_the_vision_tower_on_the_resized_image(tiny):
    """The tokens are transformers' own CLIP tower (position embeddings interpolated) and projector on the image
    resized to the target grid, exactly; the answer is the model's on a prompt of that many placeholders."""
    lvlm = tiny("llava")
    prompt = prompt_for(lvlm, "what is the digit ?")
    inputs = lvlm.prepare([prompt], [image(3)])
    method = Method("downsample", schedule=Schedule.one_shot(PRE_LLM, 20, "absolute"), position_policy="renumber")
    out = lvlm.generate_from_inputs(inputs, method, max_new_tokens=1, stop_at_eos=False)
    assert target_grid(8, 8, 20) == (4, 5)
    assert out.traces[0].vision_tokens_per_layer == [20] * lvlm.depth
    small = resized_pixels(inputs["pixel_values"], 4, 5, patch=4)
    assert small.shape[-2:] == (16, 20)
    with torch.no_grad():
        tower = lvlm.model.model.get_image_features(pixel_values=small, interpolate_pos_encoding=True)
    features = tower.pooler_output[0]
    assert features.shape[0] == 20
    short, placeholder = _short_prompt(inputs, lvlm.adapter.image_token_id, 20)
    torch.testing.assert_close(out.first_logits, _logits_of(lvlm, short, placeholder, features), atol=1e-5, rtol=0)
    # the resize is the processor's own up to its 8-bit rounding: the processor on the image resized by PIL
    proc = lvlm.processor.image_processor
    ref = proc(image(3).resize((20, 16), resample=3), return_tensors="pt", do_resize=False, do_center_crop=False)
    assert (ref["pixel_values"] - small).abs().max() < 0.03  # about 2 of 255 levels (CLIP std ~0.27)


def test_downsample_refuses_decoder_stages_and_families_without_a_fixed_grid(tiny):
    with pytest.raises(ValueError, match="runs at the pre_llm stage only, not before decoder layer 2"):
        Method("downsample", schedule=Schedule.one_shot(2, 0.5))
    lvlm = tiny("qwen2_vl")
    method = Method("downsample", schedule=Schedule.one_shot(PRE_LLM, 0.5))
    with pytest.raises(ValueError, match="'qwen2_vl' cannot re-encode an image at a smaller token grid"):
        lvlm.generate([prompt_for(lvlm, "how many ?")], [image(0, 48)], method=method, max_new_tokens=1)


@pytest.mark.parametrize("name", ["downsample", "pool"])
def test_presets_reduce_the_proxy_tokens_to_the_grid_of_their_budget(name):
    """On the proxy (16 x 16 = 256 tokens) the presets' absolute 192/128/64 become 13x14, 11x11 and 8x8 grids."""
    lvlm = v2drop.load("proxy")
    sample = get_benchmark("digits").load("test", 1)[0]
    for budget, count in ((192, 182), (128, 121), (64, 64)):
        method = Method.from_preset(f"{name}-llava15-{budget}")
        assert method.position_policy == "renumber" and method.schedule.pre_llm is not None
        out = lvlm.generate(
            [lvlm.format_prompt(sample.question)], [list(sample.images)], method=method, max_new_tokens=2
        )
        trace = out.traces[0]
        assert trace.vision_tokens == 256 and trace.vision_tokens_per_layer == [count] * lvlm.depth
        assert trace.stages[0]["kept"] == [] and len(trace.stages[0]["merged"]) == count


def test_downsample_scorer_declares_what_it_needs():
    assert DownsampleScorer.needs_reencode and not PoolScorer.needs_reencode
