"""Video inputs (Qwen2-VL / Qwen2.5-VL grids, LLaVA-OneVision frames): exact without dropping, traced with it."""

import pytest
import torch

from v2drop import Method, Schedule


def qwen_video_inputs(lvlm, frames=4, side=8):
    """Raw Qwen video inputs: ``frames`` frames of side x side patches (temporal patch 2, merge 2)."""
    tok = lvlm.tokenizer
    torch.manual_seed(0)
    grid = torch.tensor([[frames // 2, side, side]])
    pixels = torch.randn(int(grid.prod()), 3 * 2 * 8 * 8)
    n = int(grid.prod()) // 4
    text = "USER: <|vision_start|>" + "<|video_pad|>" * n + "<|vision_end|>\nhow many ? ASSISTANT:"
    ids = tok(text, return_tensors="pt")["input_ids"]
    types = (ids == tok.convert_tokens_to_ids("<|video_pad|>")).int() * 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types,
            "pixel_values_videos": pixels, "video_grid_thw": grid}


def onevision_video_inputs(lvlm, frames=4):
    tok = lvlm.tokenizer
    torch.manual_seed(0)
    pixels = torch.randn(1, frames, 3, 32, 32)
    with torch.no_grad():
        n = lvlm.model.model.get_video_features(pixel_values_videos=pixels).pooler_output.reshape(-1, 64).shape[0]
    text = "USER: " + "<video>" * n + "\nhow many ? ASSISTANT:"
    ids = tok(text, return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_video_no_drop_exact_and_drop_traced(tiny, family):
    lvlm = tiny(family)
    inputs = onevision_video_inputs(lvlm) if family == "llava_onevision" else qwen_video_inputs(lvlm)
    out = lvlm.generate_from_inputs(inputs, Method.none(), max_new_tokens=4, stop_at_eos=False)
    with torch.no_grad():
        ref = lvlm.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        logits = lvlm.model(**inputs).logits[:, -1].float()
    assert out.generated_ids == ref[:, inputs["input_ids"].shape[1]:].tolist()
    torch.testing.assert_close(out.first_logits, logits, atol=1e-5, rtol=0)

    n_video = int(lvlm.adapter.vision_mask(inputs["input_ids"]).sum())
    schedule = Schedule.progressive([1, 3], [0.5, 0.5])
    dropped = lvlm.generate_from_inputs(inputs, Method("uniform", schedule=schedule), max_new_tokens=4, stop_at_eos=False)
    assert dropped.traces[0].vision_tokens_per_layer == schedule.tokens_per_layer(lvlm.depth, n_video)
    if family != "llava_onevision":
        # Qwen grids are known: uniform keeps an even share of every frame.
        frames = lvlm.adapter.vision_coords(inputs, lvlm.adapter.vision_mask(inputs["input_ids"]))[0, :, 0]
        kept = torch.tensor(dropped.traces[0].stages[0]["kept"])
        per_frame = torch.bincount(frames[kept], minlength=2)
        assert per_frame.tolist() == [n_video // 4, n_video // 4]
