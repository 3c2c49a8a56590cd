"""With no dropping, the engine reproduces the model's own forward and generate exactly."""

import pytest
import torch

from v2drop import Method, Schedule
from v2drop.testing import batch_for

FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_no_drop_matches_transformers(tiny, family, attn, batch):
    lvlm = tiny(family, attn)
    prompts, images = batch_for(lvlm, batch, family)
    inputs = lvlm.prepare(prompts, images)
    if batch > 1 and family != "llava_onevision" and family != "llava_next":
        assert (inputs["attention_mask"] == 0).any(), "the batch should exercise padding"
    out = lvlm.generate_from_inputs(inputs, Method.none(), max_new_tokens=6, stop_at_eos=False)

    with torch.no_grad():
        ref_tokens = lvlm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        ref_logits = lvlm.model(**inputs).logits[:, -1].float()
    assert out.generated_ids == ref_tokens[:, inputs["input_ids"].shape[1] :].tolist()
    torch.testing.assert_close(out.first_logits, ref_logits, atol=1e-5, rtol=0)
    assert out.prompt_ids == [ids[m.bool()].tolist() for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_keep_everything_schedule_is_exact(tiny, family):
    lvlm = tiny(family)
    prompts, images = batch_for(lvlm, 2, family)
    inputs = lvlm.prepare(prompts, images)
    base = lvlm.generate_from_inputs(inputs, Method.none(), max_new_tokens=5, stop_at_eos=False)
    keep_all = Method("v2drop", schedule=Schedule.progressive([1, 3], [1.0, 1.0]))
    out = lvlm.generate_from_inputs(inputs, keep_all, max_new_tokens=5, stop_at_eos=False)
    assert out.generated_ids == base.generated_ids
    assert torch.equal(out.first_logits, base.first_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_prompt_runs_without_dropping(tiny, family):
    lvlm = tiny(family)
    method = Method("v2drop", schedule=Schedule.progressive([1, 3], [0.5, 0.0]))
    out = lvlm.generate(["USER: what is the digit ? ASSISTANT:"], method=method, max_new_tokens=3, stop_at_eos=False)
    base = lvlm.generate(["USER: what is the digit ? ASSISTANT:"], max_new_tokens=3, stop_at_eos=False)
    assert out.generated_ids == base.generated_ids
    assert out.traces[0].stages == [] and set(out.traces[0].vision_tokens_per_layer) == {0}
