"""The lmms-eval plugin: discovered through the entry point, answers generate_until requests on a tiny model."""

import pytest

lmms_eval = pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed (.ci/run installs it without dependencies)"
)

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402

from v2drop import Method  # noqa: E402
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
    model = cls.create_from_arg_string(
        f"pretrained={saved_llava},method=v2drop,schedule=v2drop-llava15-128,scorer_metric=l1,batch_size=2"
    )
    assert model.method.scorer.metric == "l1"
    task_dict, reqs = _requests(["what is the digit ?", "how many ?", "what colour ?"])
    model.task_dict = task_dict
    answers = model.generate_until(reqs)
    # the same answers as our own generate with the same method, sample by sample
    method = Method.resolve("v2drop-llava15-128", depth=model.lvlm.depth)
    method = Method.from_dict({**method.to_dict(), "scorer": {"name": "v2drop", "metric": "l1"}})
    for i, q in enumerate(["what is the digit ?", "how many ?", "what colour ?"]):
        out = model.lvlm.generate([model.lvlm.format_prompt(q)], [[image(i)]], method=method, max_new_tokens=4)
        assert answers[i] == out.texts[0]


def test_plugin_stops_at_until_and_rejects_unknown_args(saved_llava):
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
    with pytest.raises(ValueError, match="Unknown preset"):
        cls.create_from_arg_string(f"pretrained={saved_llava},method=v2drop,schedule=no-such-preset")


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
