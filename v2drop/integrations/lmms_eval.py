"""lmms-eval model plugin: run any v2drop scorer and schedule inside the standard harness.

Install (``docs/benchmarks.md``, "lmms-eval"): the ``lmms`` extra brings what lmms-eval 0.6.1 needs
at run time, and lmms-eval itself goes in without its declared dependencies (they pull torchvision):

    pip install -e ".[lmms]"
    pip install --no-deps "lmms-eval>=0.6.1,<0.7"
    python -m lmms_eval --model v2drop --model_args pretrained=proxy,method=v2drop-llava15-128 \\
        --tasks v2drop_digits --include_path tasks/ --batch_size 1 --output_path results/v2drop --log_samples

``write_task`` writes a local task (a parquet file, a task YAML and its functions). Registered
through the ``lmms_eval.models`` entry point (see ``pyproject.toml``), so lmms-eval finds it without
a change on its side. ``--model_args`` keys: ``pretrained`` (hub id, local directory or ``proxy``),
``method`` (scorer name, preset, YAML or ``none``), ``schedule`` (preset or YAML), ``scorer_<param>``
(a scorer parameter, e.g. ``scorer_metric=l1``), ``processor_<option>`` (an image processor option asked for at
call time, e.g. Gemma 3's ``processor_do_pan_and_scan=True``), ``dtype``, ``attn_implementation``, ``max_frames``
(frames sampled from a video file); batch size and device are lmms-eval's ``--batch_size`` and
``--device``. Videos are given to the model as their sampled frames, as our harness does. Decoding
is greedy. Every answer carries the method and its vision tokens (``Answer.info``); a task's
``process_results`` that adds ``sample_fields(results[0])`` writes them into each logged sample
(``write_task``'s tasks do), and the run's averages go to the results JSON's ``throughput``.
"""

from __future__ import annotations

import os
import warnings

import yaml
from lmms_eval.api.model import lmms
from tqdm import tqdm

import v2drop
from v2drop.lvlm import check_processor_kwargs
from v2drop.method import resolve_method

# Our benchmark name -> the lmms-eval 0.6.1 task (or group) that evaluates the same split with the
# reference scorer our ``answer_reading="lmms-eval"`` reproduces.
LMMS_EVAL_TASKS = {
    "pope": "pope",
    "mme": "mme",
    "gqa": "gqa",
    "mmbench": "mmbench_en_dev",
    "scienceqa-img": "scienceqa_img",
    "textvqa": "textvqa_val",
    "mvbench": "mvbench",
    "videomme": "videomme",
}


def lmms_eval_task(benchmark: str) -> str:
    """The lmms-eval task name of one of our real benchmarks; a ValueError listing the mapped ones otherwise."""
    try:
        return LMMS_EVAL_TASKS[benchmark]
    except KeyError:
        raise ValueError(
            f"No lmms-eval task for benchmark {benchmark!r}; mapped: {', '.join(sorted(LMMS_EVAL_TASKS))}"
        ) from None


def manifest():
    """The entry-point payload lmms-eval reads: model id ``v2drop`` and this module's class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="v2drop", simple_class_path=f"{__name__}.V2DropLMM")


def video_frames(path: str, n: int):
    """``n`` frames sampled uniformly from a video file (needs PyAV, ``pip install av``): a ``Clip``, a sequence of
    the frames that also carries the video's frame rate and the frames' indices (``decode_video``)."""
    from pathlib import Path

    from v2drop.benchmarks.media import decode_video

    return decode_video(Path(path), n)


TASK_YAML = """\
task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function {name}_utils.doc_to_visual
doc_to_text: !function {name}_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
process_results: !function {name}_utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
  - metric: vision_tokens
    aggregation: mean
    higher_is_better: false
  - metric: average_vision_tokens
    aggregation: mean
    higher_is_better: false
  - metric: v2drop_method
    aggregation: !function {name}_utils.method_of_run
    higher_is_better: false
"""

TASK_UTILS = """\
\"\"\"The lmms-eval functions of the local task {name} (v2drop benchmark {benchmark!r}).\"\"\"

from v2drop.integrations.lmms_eval import task_functions

doc_to_visual, doc_to_text, process_results, method_of_run = task_functions({benchmark!r})
"""


def write_task(
    directory, benchmark: str = "digits", split: str | None = None, limit: int | None = None, name: str | None = None
) -> str:
    """Write an image benchmark's samples as a local lmms-eval task in ``directory``; returns the task name.

    Three files: ``<name>.parquet`` (the samples, images included), ``<name>.yaml`` (the task, reading
    the parquet file by its absolute path) and ``<name>_utils.py`` (its ``doc_to_*`` and
    ``process_results``, from ``task_functions``). Run it with ``--tasks <name> --include_path <directory>``.
    """
    from pathlib import Path

    import datasets

    from v2drop.benchmarks import get_benchmark

    bench = get_benchmark(benchmark)
    if bench.modality != "image":
        raise ValueError(f"write_task writes image benchmarks; {benchmark!r} is a {bench.modality} benchmark")
    name = name or "v2drop_" + benchmark.replace("-", "_")
    samples = bench.load(split, limit)
    rows = {
        "id": [s.id for s in samples],
        "question": [s.question for s in samples],
        "answer": [s.answer for s in samples],
        "family": [s.family for s in samples],
        "choices": [list(s.choices) for s in samples],
        "image": [s.images[0] for s in samples],
    }
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "family": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
            "image": datasets.Image(),
        }
    )
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    parquet = directory / f"{name}.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(parquet))
    (directory / f"{name}.yaml").write_text(TASK_YAML.format(name=name, parquet=parquet))
    (directory / f"{name}_utils.py").write_text(TASK_UTILS.format(name=name, benchmark=benchmark))
    return name


def task_functions(benchmark: str):
    """``doc_to_visual``, ``doc_to_text``, ``process_results`` and ``method_of_run`` of a task written by
    ``write_task``.

    ``process_results`` scores with the benchmark's own ``is_correct`` (``accuracy``) and adds
    ``sample_fields`` of the answer, so every logged sample carries the method and its vision tokens;
    the vision-token fields aggregate by their mean and ``v2drop_method`` by ``method_of_run``.
    """
    from v2drop.benchmarks import get_benchmark
    from v2drop.benchmarks.base import Sample

    bench = get_benchmark(benchmark)

    def doc_to_visual(doc):
        """The row's image."""
        return [doc["image"].convert("RGB")]

    def doc_to_text(doc, lmms_eval_specific_kwargs=None):
        """The row's question, as our harness asks it."""
        return doc["question"]

    def process_results(doc, results):
        """``accuracy`` by the benchmark's ``is_correct``, plus the answer's ``sample_fields``."""
        sample = Sample(doc["id"], doc["question"], doc["answer"], doc["family"], choices=tuple(doc["choices"]))
        answer = results[0]
        return {"accuracy": float(bench.is_correct(str(answer), sample)), **sample_fields(answer)}

    def method_of_run(methods):
        """The run's one method (its samples' ``v2drop_method``, several joined by ``; ``)."""
        return "; ".join(sorted(set(methods)))

    return doc_to_visual, doc_to_text, process_results, method_of_run


class Answer(str):
    """An answer string that also carries what the method did to its sample (``info``: method, vision tokens)."""

    info: dict

    def __new__(cls, text: str, info: dict):
        """``text`` as a ``str`` (tasks read it as one), with ``info`` attached."""
        out = super().__new__(cls, text)
        out.info = info
        return out

    def strip(self, chars=None):
        """The stripped answer, still carrying ``info`` (lmms-eval strips answers before ``process_results``)."""
        return Answer(super().strip(chars), self.info)


def sample_fields(answer) -> dict:
    """Per-sample fields for a task's ``process_results``: the method and the vision tokens of one v2drop answer.

    ``v2drop_method`` (the method's ``model_args``), ``vision_tokens`` (in the prompt) and
    ``average_vision_tokens`` (retained, averaged over the decoder layers); empty for another model's answer.
    lmms-eval writes what ``process_results`` returns into every logged sample.
    """
    return dict(answer.info) if isinstance(answer, Answer) else {}


class V2DropLMM(lmms):
    """An lmms-eval model running a v2drop ``LVLM`` under a token-dropping method.

    ``batch_size`` and ``device`` are lmms-eval's own options (``--batch_size``, ``--device``), which it
    passes to the constructor; under ``torchrun`` or ``accelerate launch`` each process reports the rank
    and world size lmms-eval splits the documents by (``RANK``, ``WORLD_SIZE``) and, when ``device`` is
    CUDA, runs on its own GPU (``cuda:<LOCAL_RANK>``).
    """

    def __init__(
        self,
        pretrained: str = "proxy",
        method: str = "none",
        schedule: str | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        max_frames: int | str = 8,
        batch_size: int | str = 1,
        device: str | None = None,
        max_batch_size: int | str | None = None,  # lmms-eval's --max_batch_size, for 'auto' batch sizes: unused
        **kwargs,
    ):
        super().__init__()
        unknown = [k for k in kwargs if not k.startswith(("scorer_", "processor_"))]
        if unknown:
            raise ValueError(
                f"Unknown v2drop model_args {unknown}; valid: pretrained, method, schedule, scorer_<param>, "
                "processor_<option>, dtype, attn_implementation, max_frames (batch size and device are lmms-eval's "
                "--batch_size and --device)"
            )
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r} (v2drop has no 'auto')")
        scorer_args = {
            k[len("scorer_") :]: yaml.safe_load(str(v)) for k, v in kwargs.items() if k.startswith("scorer_")
        }
        self.processor_kwargs = {
            k[len("processor_") :]: yaml.safe_load(str(v)) for k, v in kwargs.items() if k.startswith("processor_")
        }
        self.method = resolve_method(method, schedule, scorer_args)
        self.method_args = ",".join(
            f"{k}={v}" for k, v in {"method": method, "schedule": schedule, **kwargs}.items() if v is not None
        )
        self.batch_size_per_gpu = int(batch_size)
        self.max_frames = int(max_frames)
        # the rank and world size lmms-eval's evaluator splits the documents by (torchrun / accelerate launch set them)
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        device = device or "cpu"
        if self._world_size > 1 and device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.lvlm = v2drop.load(pretrained, attn_implementation=attn_implementation, dtype=dtype, device=device)
        check_processor_kwargs(self.lvlm.processor, self.processor_kwargs)  # a bad option fails now, not mid-run

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """The model from ``--model_args``, plus the ``batch_size``/``device`` lmms-eval passes from its own options."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        taken = [k for k in ("batch_size", "max_batch_size", "device") if k in args]
        if taken:
            flags = " ".join(f"--{k} {args[k]}" for k in taken)
            raise ValueError(
                f"{', '.join(taken)} in --model_args: these are lmms-eval's own options; pass {flags} instead"
            )
        return super().create_from_arg_string(arg_string, additional_config)

    @property
    def device(self):
        """The torch device of the model (lmms-eval gathers per-rank request counts on it)."""
        return self.lvlm.device

    def _visuals(self, request) -> list:
        """The request's images, with each video file replaced by its sampled frames."""
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        out = []
        for v in visuals or []:
            out.extend(video_frames(v, self.max_frames) if isinstance(v, str) else [v])
        return out

    def generate_until(self, requests) -> list[str]:
        """Greedy answers, cut at the first of the request's ``until`` strings."""
        answers = []
        for start in tqdm(range(0, len(requests), self.batch_size_per_gpu), disable=len(requests) < 2, desc="v2drop"):
            chunk = requests[start : start + self.batch_size_per_gpu]
            prompts, images, limits, stops = [], [], [], []
            for req in chunk:
                context, gen_kwargs = req.args[0], dict(req.args[1] or {})
                if float(gen_kwargs.get("temperature", 0) or 0) > 0:
                    warnings.warn("v2drop decodes greedily; temperature is ignored", stacklevel=2)
                visuals = self._visuals(req)
                prompts.append(self.lvlm.format_prompt(context, n_images=len(visuals)))
                images.append(visuals)
                limits.append(int(gen_kwargs.get("max_new_tokens", 128)))
                until = gen_kwargs.get("until") or []
                stops.append([until] if isinstance(until, str) else list(until))
            out = self.lvlm.generate(
                prompts, images, method=self.method, max_new_tokens=max(limits), processor_kwargs=self.processor_kwargs
            )
            for ids, limit, stop, trace in zip(out.generated_ids, limits, stops, out.traces):
                text = self.lvlm.tokenizer.decode(ids[:limit], skip_special_tokens=True).strip()
                for s in stop:
                    if s and s in text:
                        text = text.split(s, 1)[0]
                info = {
                    "v2drop_method": self.method_args,
                    "vision_tokens": trace.vision_tokens,
                    "average_vision_tokens": trace.average_vision_tokens,
                }
                answers.append(Answer(text, info))
                self.cache_hook.add_partial("generate_until", None, text)
            # lmms-eval's generation-metrics log: the run's averages land in the results JSON ("throughput");
            # imported here, as importing lmms_eval.models loads the entry points, this module among them
            from lmms_eval.models.model_utils.gen_metrics import log_metrics

            seconds = out.prefill_seconds + out.generate_seconds
            n_generated = sum(min(len(ids), limit) for ids, limit in zip(out.generated_ids, limits))
            vision = [t.vision_tokens for t in out.traces]
            retained = [t.average_vision_tokens for t in out.traces]
            log_metrics(
                total_elapsed_time=seconds,
                total_gen_tokens=n_generated,
                avg_speed=n_generated / seconds if seconds > 0 else 0.0,
                additional_metrics={
                    "vision_tokens": sum(vision) / len(vision),
                    "retained_vision_tokens": sum(retained) / len(retained),
                },
            )
        return answers

    def loglikelihood(self, requests):
        """Not supported: token dropping is evaluated on generated answers."""
        raise NotImplementedError("v2drop supports generate_until tasks only")

    def generate_until_multi_round(self, requests):
        """Not supported (single-turn evaluation)."""
        raise NotImplementedError("v2drop supports single-round generate_until tasks only")
