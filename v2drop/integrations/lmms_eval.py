"""lmms-eval model plugin: run any v2drop scorer and schedule inside the standard harness.

lmms-eval finds tasks only through its task YAML files, which its wheels do not ship; install it
from its source tag (``docs/benchmarks.md``, "lmms-eval"), then this package:

    git clone --branch v0.6.1 https://github.com/EvolvingLMMs-Lab/lmms-eval && pip install -e ./lmms-eval
    pip install -e .
    lmms-eval --model v2drop --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=v2drop,schedule=v2drop-llava15-128
    \
        --tasks pope,mme --batch_size 1

Registered through the ``lmms_eval.models`` entry point (see ``pyproject.toml``), so lmms-eval
finds it without a change on its side. ``--model_args`` keys: ``pretrained`` (hub id, local
directory or ``proxy``), ``method`` (scorer name, preset, YAML or ``none``), ``schedule`` (preset
or YAML), ``scorer_<param>`` (a scorer parameter, e.g. ``scorer_metric=l1``), ``device``, ``dtype``,
``attn_implementation``, ``batch_size``, ``max_frames`` (frames sampled from a video file).
Videos are given to the model as their sampled frames, as our harness does. Decoding is greedy.
"""

from __future__ import annotations

import warnings

import yaml
from lmms_eval.api.model import lmms
from tqdm import tqdm

import v2drop
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


def video_frames(path: str, n: int) -> list:
    """``n`` frames sampled uniformly from a video file (needs PyAV, ``pip install av``)."""
    from pathlib import Path

    from v2drop.benchmarks.media import decode_video

    return decode_video(Path(path), n)


class V2DropLMM(lmms):
    """An lmms-eval model running a v2drop ``LVLM`` under a token-dropping method."""

    def __init__(
        self,
        pretrained: str = "proxy",
        method: str = "none",
        schedule: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        batch_size: int | str = 1,
        max_frames: int | str = 8,
        **kwargs,
    ):
        super().__init__()
        unknown = [k for k in kwargs if not k.startswith("scorer_")]
        if unknown:
            raise ValueError(
                f"Unknown v2drop model_args {unknown}; valid: pretrained, method, schedule, scorer_<param>, device, "
                "dtype, attn_implementation, batch_size, max_frames"
            )
        scorer_args = {k[len("scorer_") :]: yaml.safe_load(str(v)) for k, v in kwargs.items()}
        self.lvlm = v2drop.load(pretrained, attn_implementation=attn_implementation, dtype=dtype, device=device)
        self.method = resolve_method(method, schedule, scorer_args)
        self.batch_size_per_gpu = int(batch_size)
        self.max_frames = int(max_frames)

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
            out = self.lvlm.generate(prompts, images, method=self.method, max_new_tokens=max(limits))
            for ids, limit, stop in zip(out.generated_ids, limits, stops):
                text = self.lvlm.tokenizer.decode(ids[:limit], skip_special_tokens=True).strip()
                for s in stop:
                    if s and s in text:
                        text = text.split(s, 1)[0]
                answers.append(text)
                self.cache_hook.add_partial("generate_until", None, text)
        return answers

    def loglikelihood(self, requests):
        """Not supported: token dropping is evaluated on generated answers."""
        raise NotImplementedError("v2drop supports generate_until tasks only")

    def generate_until_multi_round(self, requests):
        """Not supported (single-turn evaluation)."""
        raise NotImplementedError("v2drop supports single-round generate_until tasks only")
