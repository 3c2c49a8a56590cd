"""Bad input stops with a clear message."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from v2drop import LVLM, load
from v2drop.testing import image, prompt_for


def test_more_images_than_placeholders(tiny):
    lvlm = tiny("llava")
    with pytest.raises(ValueError, match=r"Prompt 0 has 1 image placeholder\(s\) \('<image>'\) but 2 image\(s\) were given"):
        lvlm.generate([prompt_for(lvlm, "how many ?")], [[image(0), image(1)]])


def test_images_list_must_match_prompts(tiny):
    lvlm = tiny("llava")
    with pytest.raises(ValueError, match="Got 2 prompts but 1 entries in images"):
        lvlm.generate([prompt_for(lvlm, "a ?"), prompt_for(lvlm, "b ?")], [image(0)])


def test_unknown_family():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1))
    with pytest.raises(ValueError, match=r"Unsupported model family 'llama'.*Supported families: llava, llava_next"):
        LVLM(model, processor=None)


def test_unknown_model_name(tmp_path):
    with pytest.raises(ValueError, match="Cannot load model"):
        load(str(tmp_path / "no-such-model"))


@pytest.mark.integration
def test_save_and_load_round_trip(tiny, tmp_path):
    lvlm = tiny("llava")
    lvlm.model.save_pretrained(tmp_path)
    lvlm.processor.save_pretrained(tmp_path)
    again = load(str(tmp_path), attn_implementation="eager")
    prompts, images = [prompt_for(lvlm, "how many ?")], [image(3)]
    a = lvlm.generate(prompts, images, max_new_tokens=4, stop_at_eos=False)
    b = again.generate(prompts, images, max_new_tokens=4, stop_at_eos=False)
    assert a.generated_ids == b.generated_ids
    torch.testing.assert_close(a.first_logits, b.first_logits, atol=1e-5, rtol=0)


@pytest.mark.integration
def test_qwen_save_and_load_round_trip(tiny, tmp_path):
    lvlm = tiny("qwen2_vl")
    lvlm.model.save_pretrained(tmp_path)
    lvlm.processor.save_pretrained(tmp_path)
    again = load(str(tmp_path))
    prompts, images = [prompt_for(lvlm, "how many ?")], [image(3, 48)]
    assert lvlm.generate(prompts, images, max_new_tokens=3).generated_ids == again.generate(prompts, images, max_new_tokens=3).generated_ids
