"""What defines an evaluation run (typed, loaded with ``v2drop.config``) and what it returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class EvalSettings:
    """How samples are run and measured: the part of an evaluation a sweep's ``eval`` section sets."""

    split: str | None = None  # benchmark split; None = the benchmark's default split
    limit: int | None = None  # evaluate the first N samples only; None = all
    batch_size: int = 1  # samples per generate call
    max_new_tokens: int = 8  # greedy tokens generated per answer
    warmup: int = 2  # samples run (and discarded) before timing starts
    threads: int | None = 2  # torch CPU threads; None leaves the current setting
    measure_memory: bool = (
        True  # record peak memory of the language-model part (CUDA: every batch; CPU: see memory_batches)
    )
    memory_batches: int = (
        2  # CPU: the first N batches run once more, untimed, under the RSS sampler (it would slow the timed run)
    )
    accelerator: str = "auto"  # Lightning accelerator; auto = gpu when device is cuda, else cpu
    devices: int | str = 1  # Lightning devices per machine (a count or "auto"); several shard the samples
    num_nodes: int = 1  # Lightning num_nodes: machines, each running `devices` ranks
    workers: int = (
        2  # data-loader worker processes decoding and processing batches while the model runs; 0 = in the main process
    )
    prefetch_factor: int = 2  # batches each worker prepares ahead (with workers > 0)


@dataclass
class EvalConfig(EvalSettings):
    """Everything that defines an evaluation run (written into every result file)."""

    model: str = "proxy"  # hub id, local directory or bundled name
    benchmark: str = "digits"  # a registered benchmark name
    method: Any = "none"  # preset name, YAML path, method config data (Method.to_dict()) or "none"
    attn_implementation: str = "sdpa"  # eager, sdpa or flash_attention_2
    dtype: str = "float32"  # float32, bfloat16 or float16
    device: str = "cpu"  # where the model runs
    device_map: str | None = None  # from_pretrained device_map (e.g. "auto" for one GPU); overrides device
    data_dir: str | None = None  # local copy of a real benchmark (same schema as its Hugging Face dataset)
    benchmark_args: dict = field(default_factory=dict)  # benchmark constructor parameters (circular, num_frames, ...)
    processor_args: dict = field(default_factory=dict)  # image processor options (Gemma 3: do_pan_and_scan=true)
    progress: bool = True  # show a progress bar
    label: str | None = None  # the method's name in reports (experiments.report); None = the method's scorer name
    store: str | None = None  # run store directory (v2drop.evaluation.store); None = $V2DROP_STORE, else runs/store
    seeds: int | None = None  # stochastic method: seeds 0..N-1, one store key each (deterministic: once); None = once


@dataclass
class EvalResult:
    """Aggregates, the resolved config and the environment of one evaluation."""

    config: dict  # the EvalConfig as plain data
    environment: dict  # machine, library versions, threads (v2drop.cost.environment)
    metrics: dict  # accuracy, tokens, FLOPs, latencies, memory, relative accuracies
    per_family: dict  # benchmark metric per question family
    method: dict  # the method as config data (rescaled to the model's depth)
    records_path: str | None = None  # JSONL file with one record per sample
    baseline: dict | None = None  # the no-dropping accuracies the relative figures use
    split: str | None = None  # the split actually evaluated (config.split resolved by the benchmark)
    key: dict | None = None  # the run store key (v2drop.evaluation.store.RunKey) the result is filed under
    reused: bool = False  # True when read back from the run store (no model work was done)
    tokens: dict | None = None  # vision tokens per layer, their average, entering the LLM, KV-cache entries
    time: dict | None = None  # vision, scoring, prefill, decode and ttft seconds, each {"median", "total"}
    agreement_with_none: float | None = None  # share of answers equal to the stored no-dropping run's (None: no run)
    notes: list = field(default_factory=list)  # why a figure is missing (e.g. no no-dropping run to compare with)
    seeds: dict | None = None  # config.seeds of a stochastic method: per-seed accuracies, their mean and interval

    def to_json(self) -> dict:
        """Plain data for ``json.dump``."""
        return asdict(self)
