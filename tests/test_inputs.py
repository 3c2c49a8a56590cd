"""Bad input stops with a clear message."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from v2drop import LVLM, load
from v2drop.testing import build_real, image, photo, prompt_for, video_frames


def test_more_images_than_placeholders(tiny):
    lvlm = tiny("llava")
    with pytest.raises(
        ValueError, match=r"Prompt 0 has 1 image placeholder\(s\) \('<image>'\) but 2 image\(s\) were given"
    ):
        lvlm.generate([prompt_for(lvlm, "how many ?")], [[image(0), image(1)]])


def test_images_list_must_match_prompts(tiny):
    lvlm = tiny("llava")
    with pytest.raises(ValueError, match="Got 2 prompts but 1 entries in images"):
        lvlm.generate([prompt_for(lvlm, "a ?"), prompt_for(lvlm, "b ?")], [image(0)])


def test_unknown_family():
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    )
    with pytest.raises(
        ValueError, match=r"Unsupported model family 'llama'.*Supported families: gemma3, internvl, llava, llava_next"
    ):
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
    assert (
        lvlm.generate(prompts, images, max_new_tokens=3).generated_ids
        == again.generate(prompts, images, max_new_tokens=3).generated_ids
    )


# -- loading without torchvision ------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_anyres_checkpoint_loads_and_runs_without_torchvision(family, tmp_path):
    """A saved checkpoint with the real preprocessing loads through ``v2drop.load`` (torchvision is not installed
    here)."""
    lvlm = build_real(family)
    lvlm.model.save_pretrained(tmp_path)
    lvlm.processor.save_pretrained(tmp_path)
    again = load(str(tmp_path))
    expected = {"llava_next": "LlavaNextProcessor", "llava_onevision": "OnevisionProcessorLite"}[family]
    assert type(again.processor).__name__ == expected
    prompts, images = [prompt_for(lvlm, "how many ?")], [photo(0, 1000, 700)]
    a = lvlm.generate(prompts, images, max_new_tokens=3, stop_at_eos=False)
    b = again.generate(prompts, images, max_new_tokens=3, stop_at_eos=False)
    assert a.prompt_ids == b.prompt_ids and a.generated_ids == b.generated_ids
    if family == "llava_onevision":
        video = [video_frames(0, 4, 320, 240)]
        a = lvlm.generate(["USER: <video>\nhow many ? ASSISTANT:"], videos=video, max_new_tokens=3, stop_at_eos=False)
        b = again.generate(["USER: <video>\nhow many ? ASSISTANT:"], videos=video, max_new_tokens=3, stop_at_eos=False)
        assert a.prompt_ids == b.prompt_ids and a.generated_ids == b.generated_ids


@pytest.mark.integration
def test_qwen_video_round_trip(tiny, tmp_path):
    lvlm = tiny("qwen2_5_vl")
    lvlm.model.save_pretrained(tmp_path)
    lvlm.processor.save_pretrained(tmp_path)
    again = load(str(tmp_path))
    assert again.processor.second_per_grid and again.processor.video_size == lvlm.processor.video_size
    prompt, video = (
        ["USER: <|vision_start|><|video_pad|><|vision_end|>\nhow many ? ASSISTANT:"],
        [video_frames(0, 4, 48, 40)],
    )
    a = lvlm.generate(prompt, videos=video, max_new_tokens=3, stop_at_eos=False)
    b = again.generate(prompt, videos=video, max_new_tokens=3, stop_at_eos=False)
    assert a.prompt_ids == b.prompt_ids and a.generated_ids == b.generated_ids


def test_processor_needing_a_missing_package_names_it(tiny, tmp_path, monkeypatch):
    """A family without a stand-in whose processor cannot be imported fails with what to install."""
    import transformers

    from v2drop.lvlm import load_processor

    lvlm = tiny("llava")
    lvlm.model.config.save_pretrained(tmp_path)

    def needs_torchvision(*args, **kwargs):
        raise ImportError(
            "LlavaVideoProcessor requires the Torchvision library but it was not found in your environment"
        )

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs_torchvision)
    with pytest.raises(ImportError, match=r"Cannot build the processor of .* \(llava\).*pip install torchvision"):
        load_processor(str(tmp_path))


def test_video_placeholders_must_match_videos(tiny):
    lvlm = tiny("qwen2_vl")
    with pytest.raises(ValueError, match=r"The prompt has 0 '<\|video_pad\|>' placeholder\(s\) but 1 input\(s\)"):
        lvlm.prepare([prompt_for(lvlm, "how many ?")], [image(0)], [video_frames(0, 2, 32, 32)])
