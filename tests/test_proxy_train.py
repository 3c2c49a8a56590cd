"""A miniature proxy trains a few steps through the real recipe and loads through v2drop.load."""

import random

import v2drop
from experiments.train_proxy import main as train_main
from v2drop.benchmarks import get_benchmark
from v2drop.proxy import TrainConfig, conversation


def test_miniature_training_and_load(tmp_path):
    out, work = tmp_path / "proxy", tmp_path / "work"
    args = ["--set", f"output={out}", "--set", f"workdir={work}", "--set", "model.layers=2", "--set", "model.hidden=32",
            "--set", "model.intermediate=64", "--set", "model.vision_hidden=32", "--set", "align.steps=2", "--set", "align.batch=2",
            "--set", "lvlm.steps=2", "--set", "lvlm.batch=2", "--set", "robust.steps=2", "--set", "robust.batch=2",
            "--set", "monitor_every=1", "--set", "monitor_samples=5"]
    train_main(args)
    assert (out / "model.safetensors").exists() and (work / "lvlm" / "done.pt").exists()
    lvlm = v2drop.load(str(out))
    sample = get_benchmark("digits").load("test", 1)[0]
    prompt = lvlm.format_prompt(sample.question)
    assert prompt == f"USER: <image>\n{sample.question} ASSISTANT:"
    result = lvlm.generate([prompt], [list(sample.images)], max_new_tokens=2)
    assert len(result.prompt_ids[0]) == 256 + len(lvlm.tokenizer(sample.question)["input_ids"]) + 2
    # The first training turn is laid out exactly like the evaluation prompt.
    image, objects, _ = get_benchmark("digits").scene("test", 0)
    ids, labels = conversation(lvlm.processor, image, objects, random.Random(0))
    first_answer = next(i for i, l in enumerate(labels) if l != -100)
    eval_ids = lvlm.prepare([lvlm.format_prompt(lvlm.tokenizer.decode(ids[257:first_answer - 1]))], [image])["input_ids"][0].tolist()
    assert ids[:first_answer] == eval_ids
    # A second run resumes: finished stages are not trained again.
    train_main(args)


def test_config_rejects_unknown_keys():
    import pytest

    with pytest.raises(ValueError, match=r"Unknown StageConfig keys \['step'\]"):
        TrainConfig.from_dict({"lvlm": {"step": 3}})


def test_isolated_turns_see_exactly_the_evaluation_prompt():
    """With isolated turns, the logits at every turn's answer position equal those of the evaluation prompt alone."""
    import torch

    from v2drop.proxy import ProxyConfig, build_model, build_processor, isolation_mask

    processor = build_processor()
    torch.manual_seed(0)
    model = build_model(ProxyConfig(hidden=32, intermediate=64, layers=2, vision_hidden=32), processor.tokenizer).eval()
    image, objects, _ = get_benchmark("digits").scene("train", 3)
    ids, labels, segments, positions = conversation(processor, image, objects, random.Random(1), turns=7, isolated=True)
    pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels, position_ids=torch.tensor([positions]),
                       attention_mask=isolation_mask(torch.tensor([segments]))).logits[0]
        answer_starts = [i for i in range(len(labels)) if labels[i] != -100 and (i == 0 or labels[i - 1] == -100)]
        assert len(answer_starts) == 7
        for start in answer_starts:
            turn = segments[start]
            first = segments.index(turn)
            prompt = ids[:257] + ids[first:start]
            assert positions[first:start] == list(range(257, 257 + start - first))  # the prompt's own position ids
            alone = model(input_ids=torch.tensor([prompt]), pixel_values=pixels, attention_mask=torch.ones(1, len(prompt), dtype=torch.long)).logits[0, -1]
            torch.testing.assert_close(logits[start - 1], alone, atol=1e-4, rtol=0)  # float noise only: a leak moves logits by O(1)
            text = processor.tokenizer.decode(prompt[257:])
            assert processor(text=f"USER: <image>\n{text}", images=[image])["input_ids"][0] == prompt
