"""A sweep's typed config: the study, the search space, trial and confirmation evaluation, wandb.

Loaded with ``v2drop.config`` (defaults <- YAML <- ``--set key=value``): an unknown key in any
section, e.g. ``--set eval.limt=5``, is an error listing the valid keys before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from v2drop.config import config_from_dict, load_config
from v2drop.evaluation.config import EvalSettings

# objective name -> (metric key in EvalResult.metrics, optimisation direction)
OBJECTIVES = {
    "accuracy": ("accuracy", "maximize"),
    "prefill_latency": ("prefill_latency_median_s", "minimize"),
    "generation_latency": ("generation_latency_median_s", "minimize"),
    "flops": ("flops_ratio", "minimize"),
    "average_tokens": ("average_vision_tokens", "minimize"),
    # requests/s of the trial's method served by vLLM through the plugin (v2drop.search.served; vLLM needed)
    "served_throughput": ("served_requests_per_s", "maximize"),
}
SAMPLERS = ("tpe", "nsga2", "gp", "random")


@dataclass
class SearchSpace:
    """What a trial may choose (``search:`` in a sweep YAML)."""

    # scorer name -> {parameter: [choices]}; "all" (or "*", also as a key) = every registered scorer with defaults
    scorers: Any = field(default_factory=lambda: {"v2drop": {}})
    exclude: list[str] = field(
        default_factory=lambda: ["given"]
    )  # fnmatch patterns left out of "all" ("given" is an oracle)
    # one-shot, progressive (decoder stages), pre-llm (one stage before the LLM), pre-llm+one-shot, pre-llm+progressive,
    # vision (one stage inside the vision encoder)
    kinds: list[str] = field(default_factory=lambda: ["progressive"])
    scorer_kinds: dict = field(
        default_factory=dict
    )  # scorer name -> its own kinds (e.g. {fastv: [one-shot]}), searched as "<name>.kind"
    weights: dict = field(
        default_factory=dict
        # scorer with parts (composite) -> [low, high] of each part's weight, searched as "<name>.weights.<part>",
        # normalised to sum 1
    )
    position_policy: dict = field(
        default_factory=dict
    )  # scorer name -> "preserve" (default) or "renumber" for its trials
    stages: list[int] = field(default_factory=lambda: [2, 3])  # [min, max] stages of a progressive schedule
    layers: list[int | None] = field(default_factory=lambda: [1, None])  # [first, last] drop layer; None = depth - 1
    # [first, last] encoder layer l of a kind-"vision" stage (vision:<l>, searched as vision_layer)
    vision_layers: list[int] = field(default_factory=lambda: [1, 1])
    # the hidden_states index of the feature-selection layer of the tower vision_layers are written for (23: LLaVA-1.5's
    # CLIP); trials' encoder stages move proportionally to the model's tower (Schedule.fit_tower); None = as given
    tower_reference: int | None = None
    # a plain list: OmegaConf would warn on every integer bound (``[0, 0.5]``) of a list[float]
    keep: list = field(
        default_factory=lambda: [0.0, 0.9]
    )  # [low, high] relative keep fraction per stage (the pre-LLM one too)


@dataclass
class ConfirmConfig:
    """Where the Pareto set is evaluated again once the trials are done (``confirm:``)."""

    split: str | None = None  # benchmark split; None = the benchmark's default split
    limit: int | None = None  # first N samples of it; None = all


@dataclass
class WandbConfig:
    """Logging of the study to Weights & Biases (``wandb:``); no login is ever asked for."""

    mode: str | None = None  # offline, online or disabled; None = $WANDB_MODE if set, else offline
    project: str = "v2drop"  # wandb project
    per_trial_runs: bool = False  # also one wandb run per trial, grouped by study


@dataclass
class ServedConfig:
    """How vLLM serves each trial under the ``served_throughput`` objective (``served:``, as in serve_bench)."""

    max_num_seqs: int = 16  # vLLM's largest batch of running requests
    kv_cache_gib: float = 1.0  # vLLM's KV-cache space in GiB (a real 7B checkpoint's context needs more)
    max_model_len: int | None = None  # vLLM's longest request in tokens; None = the checkpoint's context length


SAMPLE_RULES = ("stratified", "first")


@dataclass
class SweepEval(EvalSettings):
    """How each trial is evaluated (``eval:``): the ``EvalSettings``, the benchmark's data and how the trial sample is
    drawn.
    """

    device: str = "cpu"  # where the model runs (cpu, cuda, cuda:N); a --workers worker sees only its own GPU, as cuda
    dtype: str = "float32"  # float32, bfloat16 or float16
    attn_implementation: str = "sdpa"  # eager, sdpa or flash_attention_2
    data_dir: str | None = (
        None  # local copy of a real benchmark (as ``experiments.evaluate --data-dir``); None = the hub
    )
    benchmark_args: dict = field(
        default_factory=dict
    )  # benchmark constructor parameters (as ``--benchmark-args``: circular, num_frames, ...)
    # how the `limit` trial samples are drawn from `split`: stratified (per family, seeded by `seed`) or first
    sample: str = "stratified"
    pool: int | None = None  # stratified: draw from the first N samples of `split`; None = the whole split


def _trial_eval() -> SweepEval:
    return SweepEval(split="validation", limit=100, batch_size=8, max_new_tokens=4, warmup=2)


@dataclass
class SweepConfig:
    """A whole sweep (one YAML file in ``configs/sweep``; every key can be overridden with ``--set``)."""

    study: str = "v2drop-proxy-digits"  # study name (shared by every worker)
    model: str = "proxy"  # model for v2drop.load
    benchmark: str = "digits"  # registered benchmark
    trials: int = 24  # trials this worker runs (stops early when the study has `total_trials`)
    total_trials: int | None = None  # stop every worker once the study holds this many finished trials
    sampler: str = "tpe"  # tpe, nsga2, gp or random
    seed: int = 0  # sampler seed
    objectives: list[str] = field(
        default_factory=lambda: ["accuracy", "prefill_latency"]
    )  # names in OBJECTIVES; first is usually accuracy
    max_average_tokens: float | None = None  # constraint: average retained vision tokens at most this
    # constraint in either convention: N (= max_average_tokens: N) or {tokens: N, count: average | entering}
    budget: Any = None  # None = no budget; give this or max_average_tokens, not both
    enqueue_presets: list[str] = field(
        default_factory=lambda: ["v2drop-llava15-192", "v2drop-llava15-128", "v2drop-llava15-64"]
    )  # presets tried first; fnmatch patterns allowed ("*-llava15-128")
    enqueue_none: bool = True  # a no-dropping trial first
    search: SearchSpace = field(default_factory=SearchSpace)  # what a trial may choose
    eval: SweepEval = field(
        default_factory=_trial_eval
    )  # how each trial is evaluated (a sample of the validation split) and on which data
    # bound (MiB) of the per-sample cache of processor outputs and vision features reused by every trial; 0 = off
    vision_cache_mb: int = 2048
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)  # split and limit the Pareto set is confirmed on
    storage: str | None = None  # Optuna storage URL or journal file; None = journal file <run_dir>/journal.log
    run_dir: str | None = None  # artifacts; None = runs/<study>
    store: str | None = None  # run store the confirmed front is evaluated into; None = $V2DROP_STORE, else runs/store
    heartbeat: int = 30  # seconds between RDB heartbeats (a dead worker's trial is failed after 2x)
    retries: int = 2  # times a failed trial is retried (RDB storages)
    wandb: WandbConfig = field(default_factory=WandbConfig)  # logging to Weights & Biases
    served: ServedConfig = field(default_factory=ServedConfig)  # vLLM's settings for the served_throughput objective

    @classmethod
    def from_dict(cls, data: dict) -> SweepConfig:
        """Build from config data (e.g. a parsed YAML file); unknown keys are errors naming the valid ones."""
        return config_from_dict(cls, data)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides=(), data: dict | None = None) -> SweepConfig:
        """Defaults <- the YAML file ``path`` <- ``data`` <- ``key=value`` overrides."""
        return load_config(cls, path, overrides=overrides, data=data)

    def resolved_run_dir(self) -> Path:
        """Where the artifacts go."""
        return Path(self.run_dir or Path("runs") / self.study)
