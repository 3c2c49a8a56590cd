"""Hub-id loading: a saved checkpoint of every family loads through the path a hub id takes (``v2drop.load`` behind
``experiments.evaluate`` and the lmms-eval plugin), gets its family's adapter from ``config.model_type`` and answers
as the model it was saved from. A local directory stands in for the hub id; nothing is downloaded (HF_HUB_OFFLINE)."""

import json

import pytest
import torch

from experiments import evaluate
from v2drop import load
from v2drop.benchmarks import get_benchmark
from v2drop.evaluation.harness import prepare_batch
from v2drop.models import FAMILIES as ADAPTERS
from v2drop.testing import FAMILIES, build_real, photo, prompt_for, widened_qwen2vl

# the adapter and the processor each family's checkpoint gets (stand-ins where the real processor needs torchvision)
EXPECTED = {
    "llava": ("LlavaAdapter", "LlavaProcessor"),
    "llava_next": ("LlavaNextAdapter", "LlavaNextProcessor"),
    "llava_onevision": ("LlavaOnevisionAdapter", "OnevisionProcessorLite"),
    "qwen2_vl": ("Qwen2VLAdapter", "QwenProcessorLite"),
    "qwen2_5_vl": ("Qwen2VLAdapter", "QwenProcessorLite"),
    "qwen3_vl": ("Qwen3VLAdapter", "Qwen3ProcessorLite"),
    "internvl": ("InternVLAdapter", "InternVLProcessorLite"),
    "gemma3": ("Gemma3Adapter", "Gemma3Processor"),
    "qwen3_vl_moe": ("Qwen3VLAdapter", "Qwen3ProcessorLite"),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub access: a local path must be enough."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def saved(family: str, path):
    """``build_real(family)`` (the real checkpoint's preprocessing, tiny weights) saved as a checkpoint at ``path``."""
    lvlm = build_real(family)
    lvlm.model.save_pretrained(path)
    lvlm.processor.save_pretrained(path)
    return lvlm


def digits(n: int = 2):
    """The first ``n`` digits test questions (small images, so the real-geometry models stay quick)."""
    return get_benchmark("digits").load("test", n)


def test_every_family_has_an_expected_adapter():
    assert set(EXPECTED) == set(FAMILIES)  # a family added to the tiny builders must be added here too
    assert set(EXPECTED) <= set(ADAPTERS.names())


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_by_model_type_and_evaluates(family, tmp_path):
    """``v2drop.load`` on the directory picks the family's adapter and processor; generating two tokens, and
    ``experiments.evaluate --model <dir>``, give the saved model's own tokens and answers."""
    original = saved(family, tmp_path / "ckpt")
    lvlm = load(str(tmp_path / "ckpt"))
    assert lvlm.model.config.model_type == family
    assert (type(lvlm.adapter).__name__, type(lvlm.processor).__name__) == EXPECTED[family]
    assert type(lvlm.adapter) is ADAPTERS.get(family)
    samples = digits()
    a = original.generate_from_inputs(prepare_batch(original, samples), None, max_new_tokens=2, stop_at_eos=False)
    b = lvlm.generate_from_inputs(prepare_batch(lvlm, samples), None, max_new_tokens=2, stop_at_eos=False)
    assert a.prompt_ids == b.prompt_ids and a.generated_ids == b.generated_ids
    assert min(t.vision_tokens for t in b.traces) > 0

    result = evaluate.main(
        [
            "--model",
            str(tmp_path / "ckpt"),
            "--benchmark",
            "digits",
            "--limit",
            "2",
            "--max-new-tokens",
            "2",
            "--warmup",
            "0",
            "--workers",
            "0",
            "--no-progress",
            "--store",
            str(tmp_path / "store"),
        ]
    )
    records = [json.loads(line) for line in open(result["records_path"])]
    by_id = {r["id"]: r for r in records}
    with_stop = original.generate_from_inputs(prepare_batch(original, samples), None, max_new_tokens=2)
    for i, sample in enumerate(samples):
        assert by_id[sample.id]["prediction"] == with_stop.texts[i]
        assert by_id[sample.id]["vision_tokens"] == a.traces[i].vision_tokens


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_lmms_eval_plugin_loads_every_family(family, tmp_path):
    """The lmms-eval model built from ``pretrained=<dir>`` (as from a hub id) runs the family's adapter and answers as
    the saved model."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (.ci/run installs it without dependencies)")
    pytest.importorskip("accelerate", reason="lmms-eval's run-time needs are not installed: pip install -e '.[lmms]'")
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    original = saved(family, tmp_path)
    model = get_model("v2drop").create_from_arg_string(
        f"pretrained={tmp_path},method=v2drop-llava15-128", {"batch_size": 1, "device": "cpu"}
    )
    assert (type(model.lvlm.adapter).__name__, type(model.lvlm.processor).__name__) == EXPECTED[family]
    sample = digits(1)[0]
    model.task_dict = {"toy": {"test": [{"image": sample.images[0], "question": sample.question}]}}
    request = Instance(
        request_type="generate_until",
        idx=0,
        metadata={"task": "toy", "doc_id": 0, "repeats": 1},
        arguments=(sample.question, {"max_new_tokens": 2, "until": []}, lambda doc: [doc["image"]], 0, "toy", "test"),
    )
    answer = model.generate_until([request])[0]
    prompt = original.format_prompt(sample.question)
    expected = original.generate([prompt], [[sample.images[0]]], method="v2drop-llava15-128", max_new_tokens=2)
    assert answer == expected.texts[0]
    assert answer.info["vision_tokens"] == expected.traces[0].vision_tokens
    assert answer.info["average_vision_tokens"] < answer.info["vision_tokens"]


def test_widened_qwen2vl_loads_with_the_requested_geometry(tmp_path):
    """``widened_qwen2vl``'s checkpoint loads through ``v2drop.load`` as Qwen2-VL with the asked width and depth,
    heads of 64 and M-RoPE sections summing to half of 64, Qwen's image processing (a 112-pixel square: 16 merged
    tokens; 576 with ``min_pixels`` 672²), vLLM's tokenizer names, and the same weights for the same seed (other
    weights for another)."""
    with pytest.raises(ValueError, match="multiple of 64"):
        widened_qwen2vl(tmp_path / "bad", hidden=100)
    path = widened_qwen2vl(tmp_path / "a", hidden=128, layers=3, seed=1)
    lvlm = load(path)
    assert (type(lvlm.adapter).__name__, type(lvlm.processor).__name__) == EXPECTED["qwen2_vl"]
    text = lvlm.model.config.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (128, 512, 3)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (2, 2, 64)
    assert text.rope_parameters["mrope_section"] == [8, 12, 12]
    vision = lvlm.model.config.vision_config
    assert (vision.hidden_size, vision.embed_dim, vision.num_heads, vision.depth) == (128, 64, 2, 2)
    assert lvlm.model.generation_config.eos_token_id == lvlm.processor.tokenizer.eos_token_id is not None  # as vLLM
    tokenizer_config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert tokenizer_config["extra_special_tokens"] == {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    out = lvlm.generate([prompt_for(lvlm, "what is the digit ?")], [[photo(0, 112, 112)]], max_new_tokens=1)
    assert out.prompt_ids[0].count(lvlm.model.config.image_token_id) == 16 and len(out.generated_ids[0]) == 1
    weights = lvlm.model.state_dict()
    with pytest.raises(ValueError, match="min_pixels"):
        widened_qwen2vl(tmp_path / "bad", hidden=128, min_pixels=3000)
    large = load(widened_qwen2vl(tmp_path / "b", hidden=128, layers=3, seed=1, min_pixels=672 * 672))
    out = large.generate([prompt_for(large, "what is the digit ?")], [[photo(0, 112, 112)]], max_new_tokens=1)
    assert out.prompt_ids[0].count(large.model.config.image_token_id) == 576  # resized to 672 x 672
    same = large.model.state_dict()
    other = load(widened_qwen2vl(tmp_path / "c", hidden=128, layers=3, seed=2)).model.state_dict()
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(weights[k], same[k]) for k in weights) and not torch.equal(weights[name], other[name])
