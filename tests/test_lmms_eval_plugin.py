"""The lmms-eval plugin: discovered through the entry point, answers generate_until requests on a tiny model."""

import pytest
import torch

lmms_eval = pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed (.ci/run installs it without dependencies)"
)
pytest.importorskip("accelerate", reason="lmms-eval's run-time needs are not installed: pip install -e '.[lmms]'")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402

from v2drop import Method  # noqa: E402
from v2drop.integrations.lmms_eval import sample_fields  # noqa: E402
from v2drop.testing import image  # noqa: E402


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    from v2drop.testing import build

    lvlm = build("llava")
    path = tmp_path_factory.mktemp("tiny-llava")
    lvlm.model.save_pretrained(path)
    lvlm.processor.save_pretrained(path)
    return str(path)


def _requests(questions, until=None, max_new_tokens=4):
    docs = [{"image": image(i), "question": q} for i, q in enumerate(questions)]
    reqs = [
        Instance(
            request_type="generate_until",
            idx=0,
            metadata={"task": "toy", "doc_id": i, "repeats": 1},
            arguments=(
                q,
                {"max_new_tokens": max_new_tokens, "until": until or []},
                lambda doc: [doc["image"]],
                i,
                "toy",
                "test",
            ),
        )
        for i, q in enumerate(questions)
    ]
    return {"toy": {"test": docs}}, reqs


def test_plugin_is_discovered_and_generates(saved_llava):
    cls = get_model("v2drop")
    assert cls.__module__ == "v2drop.integrations.lmms_eval"
    # as lmms-eval's CLI calls it: its --batch_size and --device come in the second argument
    model = cls.create_from_arg_string(
        f"pretrained={saved_llava},method=v2drop,schedule=v2drop-llava15-128,scorer_metric=l1",
        {"batch_size": "2", "max_batch_size": None, "device": "cpu"},
    )
    assert model.method.scorer.metric == "l1"
    assert (model.batch_size_per_gpu, model.rank, model.world_size) == (2, 0, 1)
    task_dict, reqs = _requests(["what is the digit ?", "how many ?", "what colour ?"])
    model.task_dict = task_dict
    answers = model.generate_until(reqs)
    # the same answers as our own generate with the same method, sample by sample
    method = Method.resolve("v2drop-llava15-128", depth=model.lvlm.depth)
    method = Method.from_dict({**method.to_dict(), "scorer": {"name": "v2drop", "metric": "l1"}})
    for i, q in enumerate(["what is the digit ?", "how many ?", "what colour ?"]):
        out = model.lvlm.generate([model.lvlm.format_prompt(q)], [[image(i)]], method=method, max_new_tokens=4)
        assert answers[i] == out.texts[0]
        # each answer carries the method and its vision tokens, also after lmms-eval strips it
        fields = sample_fields(answers[i].strip())
        trace = out.traces[0]
        assert fields == {
            "v2drop_method": "method=v2drop,schedule=v2drop-llava15-128,scorer_metric=l1",
            "vision_tokens": trace.vision_tokens,
            "average_vision_tokens": trace.average_vision_tokens,
        }
        assert fields["average_vision_tokens"] < fields["vision_tokens"]
    assert sample_fields("a plain answer") == {}


def test_plugin_stops_at_until_and_rejects_unknown_args(saved_llava, monkeypatch):
    cls = get_model("v2drop")
    model = cls.create_from_arg_string(f"pretrained={saved_llava},method=none")
    task_dict, reqs = _requests(["what is the digit ?"], max_new_tokens=6)
    model.task_dict = task_dict
    full = model.generate_until(reqs)[0]
    words = full.split()
    if len(words) > 1:  # cut at the second word
        _, reqs = _requests(["what is the digit ?"], until=[" " + words[1]], max_new_tokens=6)
        assert model.generate_until(reqs)[0] == words[0]
    with pytest.raises(ValueError, match="Unknown v2drop model_args"):
        cls.create_from_arg_string(f"pretrained={saved_llava},shedule=v2drop-llava15-128")
    # lmms-eval always passes its own batch_size (and device when given): in model_args they are an error
    for arg, flag in (("batch_size=2", "--batch_size 2"), ("device=cpu", "--device cpu")):
        with pytest.raises(ValueError, match=f"lmms-eval's own options; pass {flag} instead"):
            cls.create_from_arg_string(f"pretrained={saved_llava},{arg}", {"batch_size": 1, "device": "cpu"})
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        cls.create_from_arg_string(f"pretrained={saved_llava}", {"batch_size": "auto"})
    if not torch.cuda.is_available():  # the hint names lmms-eval's own --device option
        with pytest.raises(ValueError, match="no usable CUDA GPU .*use --device cpu"):
            cls.create_from_arg_string(f"pretrained={saved_llava}", {"batch_size": 1, "device": "cuda"})
    # under torchrun / accelerate launch: the rank and world size lmms-eval's evaluator splits the documents by
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    ranked = cls.create_from_arg_string(f"pretrained={saved_llava}", {"batch_size": 1})
    assert (ranked.rank, ranked.world_size) == (3, 4)
    with pytest.raises(ValueError, match="Unknown preset"):
        cls.create_from_arg_string(f"pretrained={saved_llava},method=v2drop,schedule=no-such-preset")


def test_plugin_processor_args_ask_for_pan_and_scan(saved_llava, tmp_path):
    """``processor_<option>`` model_args reach the processor: on Gemma 3 the answers are ``generate`` with
    pan-and-scan; an option the family's processor does not take fails at construction, naming what it accepts."""
    from v2drop.testing import build, photo

    gemma = build("gemma3")
    gemma.model.save_pretrained(tmp_path)
    gemma.processor.save_pretrained(tmp_path)
    cls = get_model("v2drop")
    model = cls.create_from_arg_string(
        f"pretrained={tmp_path},method=none,processor_do_pan_and_scan=True,processor_pan_and_scan_min_crop_size=8"
    )
    assert model.processor_kwargs == {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 8}
    picture = photo(0, 96, 32)
    _, reqs = _requests(["how many ?"], max_new_tokens=4)
    model.task_dict = {"toy": {"test": [{"image": picture, "question": "how many ?"}]}}
    answer = model.generate_until(reqs)[0]
    prompt = [model.lvlm.format_prompt("how many ?")]
    out = model.lvlm.generate(prompt, [[picture]], max_new_tokens=4, processor_kwargs=model.processor_kwargs)
    assert (
        answer == out.texts[0]
        and len(model.lvlm.prepare(prompt, [[picture]], processor_kwargs=model.processor_kwargs)["pixel_values"]) == 4
    )
    with pytest.raises(ValueError, match="not supported by LlavaProcessor; it accepts no call-time options"):
        cls.create_from_arg_string(f"pretrained={saved_llava},processor_do_pan_and_scan=True")


def test_task_name_mapping_covers_every_real_benchmark():
    """Each real benchmark maps to an lmms-eval task whose scoring module is in the installed package."""
    from pathlib import Path

    from v2drop.benchmarks import list_benchmarks
    from v2drop.integrations.lmms_eval import LMMS_EVAL_TASKS, lmms_eval_task

    real = set(list_benchmarks()) - {"digits", "digits-video"}
    assert set(LMMS_EVAL_TASKS) == real
    tasks = Path(lmms_eval.__file__).parent / "tasks"
    folders = {"scienceqa_img": "scienceqa", "textvqa_val": "textvqa", "mmbench_en_dev": "mmbench"}
    for name in sorted(real):
        task = lmms_eval_task(name)
        folder = tasks / folders.get(task, task)
        assert (folder / ("en_utils.py" if task.startswith("mmbench") else "utils.py")).is_file(), (name, task)
    with pytest.raises(ValueError, match="No lmms-eval task for benchmark 'digits'"):
        lmms_eval_task("digits")


def test_write_task_files_and_bad_input(tmp_path):
    """A local task is a parquet file of the samples (images decoded as PIL), its YAML and its functions."""
    import datasets
    import yaml

    from v2drop.benchmarks import get_benchmark
    from v2drop.integrations.lmms_eval import write_task

    assert write_task(tmp_path, "digits", limit=3, name="mine") == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.parquet", "mine.yaml", "mine_utils.py"]
    rows = datasets.load_dataset("parquet", data_files=str(tmp_path / "mine.parquet"), split="train")
    samples = get_benchmark("digits").load(None, 3)
    assert rows["question"] == [s.question for s in samples] and rows["answer"] == [s.answer for s in samples]
    assert rows[0]["image"].tobytes() == samples[0].images[0].convert(rows[0]["image"].mode).tobytes()
    text = (tmp_path / "mine.yaml").read_text().replace("!function", "")
    assert yaml.safe_load(text)["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "mine.parquet")
    with pytest.raises(ValueError, match="write_task writes image benchmarks; 'digits-video' is a video"):
        write_task(tmp_path, "digits-video", limit=1)


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """Four digits samples written as a local lmms-eval task (parquet + YAML + utils.py)."""
    from v2drop.integrations.lmms_eval import write_task

    directory = tmp_path_factory.mktemp("lmms-tasks")
    return write_task(directory, "digits", limit=4), directory


@pytest.mark.integration
@pytest.mark.parametrize("method", ["v2drop-llava15-128", "none"])
def test_lmms_eval_cli_runs_a_local_task(local_task, tmp_path, method):
    """The documented command: `python -m lmms_eval --model v2drop ...` on a local task, with the bundled proxy."""
    import json
    import os
    import subprocess
    import sys

    name, directory = local_task
    out = tmp_path / method
    cmd = [
        sys.executable, "-m", "lmms_eval", "--model", "v2drop",
        "--model_args", f"pretrained=proxy,method={method}",
        "--tasks", name, "--include_path", str(directory), "--batch_size", "1", "--limit", "2",
        "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # lmms-eval exits 0 after an evaluation error too: the results file is the proof of a finished run
    (results_file,) = (out / "proxy").glob("*_results.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model_args"] == f"pretrained=proxy,method={method}"
    assert 0.0 <= results["results"][name]["accuracy,none"] <= 1.0
    (samples_file,) = (out / "proxy").glob(f"*_samples_{name}.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert [s["doc_id"] for s in samples] == [0, 1]
    for s in samples:
        assert s["v2drop_method"] == f"method={method}"
        assert s["vision_tokens"] == 256  # the proxy's 16 x 16 patches of a digits scene
        if method == "none":
            assert s["average_vision_tokens"] == 256
        else:
            assert 0 < s["average_vision_tokens"] < 256
    mean = sum(s["average_vision_tokens"] for s in samples) / len(samples)
    assert results["results"][name]["average_vision_tokens,none"] == pytest.approx(mean)
    assert results["results"][name]["vision_tokens,none"] == 256
    assert results["results"][name]["v2drop_method,none"] == f"method={method}"
    assert results["throughput"]["avg_retained_vision_tokens"] == pytest.approx(mean)
