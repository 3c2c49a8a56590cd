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
            "--set", "lvlm.steps=2", "--set", "lvlm.batch=2"]
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
