"""The evaluation harness: one benchmark, one model, one method -> per-sample records and aggregates.

Runs through Lightning's ``Trainer.predict`` (one CPU device by default; ``devices`` and
``num_nodes`` shard the samples over several processes, GPUs or machines, each sample predicted
exactly once: ``v2drop.evaluation.ranks``). Samples are light (their media decoded on demand);
``workers`` loader processes decode and process each batch while the model runs the previous one.
Records are appended to a JSONL file as samples finish, so an interrupted run continues with
``resume=True``.
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from v2drop.cost import environment, prefill_flops, sample_encoder_flops, sample_prefill_flops
from v2drop.evaluation.accounting import bootstrap_ci, sample_times, sample_tokens, time_section, token_section
from v2drop.evaluation.collect import vs_none
from v2drop.evaluation.config import EvalConfig, EvalResult
from v2drop.evaluation.ranks import (
    ShardSampler,
    earlier_records,
    launched_rank,
    merge_records,
    rank_file,
    read_finished,
)
from v2drop.evaluation.records import append_records, repair_tail, vision_runs
from v2drop.lvlm import LVLM
from v2drop.method import Method


def evaluate(
    lvlm: LVLM,
    benchmark,
    method: Method,
    config: EvalConfig,
    records_path: str | os.PathLike | None = None,
    resume: bool = False,
    baseline: dict | None = None,
    samples: list | None = None,
) -> EvalResult | None:
    """Run ``benchmark`` on ``lvlm`` under ``method`` and aggregate (None on ranks other than 0).

    Parameters
    ----------
    records_path : path, optional
        JSONL file receiving one record per sample as it finishes. Must not exist unless
        ``resume`` is set, in which case finished samples are skipped. With several ranks
        (``config.devices``, ``config.num_nodes``; required then) each rank appends to
        ``<stem>.rank<k>.jsonl`` beside it and rank 0 merges them into it in sample order
        (``v2drop.evaluation.ranks``); the file always ends in sample order.
    baseline : dict, optional
        A no-dropping result (``EvalResult.to_json()``) to report accuracies relative to.
    samples : list of Sample, optional
        Evaluate these instead of ``config.limit`` samples of ``config.split`` (None: the
        benchmark's default split).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    split = (
        benchmark.resolve_split(config.split) if samples is None else None
    )  # caller-chosen samples: split unknown here
    samples = samples if samples is not None else benchmark.load(split, config.limit)
    if not samples:
        raise ValueError(f"Benchmark {benchmark.name!r} split {split or config.split!r} has no samples")
    for sample in samples:
        check_sample(sample, benchmark)
    done: dict[str, dict] = {}
    if records_path is not None:
        records_path = Path(records_path)
        # Ranks a launcher started find the files rank 0 created for this very run: only the
        # launching process can tell an earlier run's records.
        earlier = earlier_records(records_path)
        if earlier is not None and not resume and not launched_rank():
            raise ValueError(
                f"{earlier} already exists; pass resume=True (--resume) to continue it, or choose another path"
            )
        # The same finished set on every rank: no rank appends a record before all of them have
        # joined the process group inside Trainer.predict.
        done = read_finished(records_path)
        records_path.parent.mkdir(parents=True, exist_ok=True)
        records_path.touch()
    todo = [s for s in samples if s.id not in done]
    method = method.rescaled(lvlm.depth)
    if todo and config.warmup:
        for sample in todo[: config.warmup]:
            _predict(lvlm, benchmark, method, [sample], config)
    new = _run_lightning(lvlm, benchmark, method, todo, config, records_path) if todo else []
    if new is None or (not todo and launched_rank()):
        return None  # a rank other than 0: rank 0 merges every rank's records and aggregates them once
    if records_path is not None:
        new = merge_records(records_path, [s.id for s in samples])
    wanted = {s.id for s in samples}
    records = [r for r in new if r["id"] in wanted]
    result = _aggregate(lvlm, benchmark, method, config, records, records_path)
    result.split = split
    return apply_baseline(result, baseline) if baseline is not None else result


def check_sample(sample, benchmark) -> None:
    """Fail before any long work on a sample the model cannot take; cheap: media are found and their headers read, not
    decoded.

    A medium that passes here but cannot be decoded fails when its batch is prepared, with a
    ValueError naming the sample.
    """
    if not sample.media:
        what = "frames" if benchmark.modality == "video" else "image"
        raise ValueError(f"Sample {sample.id!r} of {benchmark.modality} benchmark {benchmark.name!r} has no {what}")
    refs = sample.refs()
    for i, ref in enumerate(refs):
        try:
            ref.check()
        except ValueError as err:
            raise ValueError(f"Sample {sample.id!r}: medium {i} cannot be read ({err})") from None
    if refs:
        return
    for i, image in enumerate(
        sample.images
    ):  # pixels given in memory: decoding a lazily opened file is all that can fail
        try:
            image.load()
        except Exception as err:  # PIL raises many types for truncated or corrupt files
            raise ValueError(f"Sample {sample.id!r}: image {i} cannot be decoded ({err})") from None


class BatchInputs:
    """Sample indices -> model inputs (decode, resize, processor) for a ``DataLoader``'s ``collate_fn``, run in its
    workers.

    Holds the light samples and the processor only (``InputBuilder``), never the model. A batch
    whose media cannot be decoded comes back as ``{"ids", "error"}``: ``predict_step`` raises the
    error in the main process, so it reads as the sample's ValueError rather than a worker traceback.
    """

    def __init__(self, samples: list, builder, processor_kwargs: dict | None = None):
        self.samples = samples
        self.builder = builder
        self.processor_kwargs = processor_kwargs

    def __call__(self, indices: list[int]) -> dict:
        """``{"indices", "ids", "arrays"}`` (the prepared inputs as numpy arrays), or ``{"indices", "ids", "error"}``;
        without a builder only ``{"indices", "ids"}`` (the main process prepares the batch)."""
        batch = [self.samples[i] for i in indices]
        ids = [s.id for s in batch]
        if self.builder is None:
            return {"indices": list(indices), "ids": ids}
        try:
            inputs = prepare_batch(
                self.builder, batch, device="cpu", dtype=torch.float32, processor_kwargs=self.processor_kwargs
            )
        except ValueError as err:
            return {"indices": list(indices), "ids": ids, "error": err}
        # As numpy arrays the batch is pickled through the worker's pipe: tensors would be passed as
        # shared-memory file descriptors, whose hand-over prints a traceback when an interrupted run
        # stops its workers mid-transfer. Pixels stay float32 here (numpy has no bfloat16).
        return {"indices": list(indices), "ids": ids, "arrays": {k: v.numpy() for k, v in inputs.items()}}


def _end_with_parent(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """Make a loader worker end when the evaluating process does, even killed (SIGKILL: it cannot stop its workers).

    An orphaned worker blocks on its full result pipe and keeps the parent's stdout and stderr
    open, so whoever waits for the killed run's output would wait forever. Linux only (prctl).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def prepare_batch(builder, batch: list, **where) -> dict:
    """Model inputs for samples (their images decoded now, through the bounded media cache) with ``builder.prepare``:
    an ``InputBuilder`` (``where``: device, dtype and processor_kwargs) in a loader worker, or the ``LVLM`` itself in
    the main process."""
    images = [list(s.images) for s in batch]
    prompts = [builder.format_prompt(s.question, n_images=len(imgs)) for s, imgs in zip(batch, images)]
    return builder.prepare(prompts, images, **where)


def _predict(
    lvlm: LVLM,
    benchmark,
    method: Method,
    batch: list,
    config: EvalConfig,
    memory_pass: bool = False,
    inputs: dict | None = None,
    data_wait: float = 0.0,
) -> list[dict]:
    """Generate answers for a batch of samples and turn them into records (``memory_pass``: CPU
    peak memory from one more, untimed run of the batch; ``inputs``: the batch already prepared by
    a loader worker (tensors or numpy arrays), else prepared here; ``data_wait``: seconds the model waited for the
    batch)."""
    start = time.perf_counter()
    if inputs is None:  # LVLM.prepare: on the model's device, through a sweep's vision cache when one is attached
        inputs = prepare_batch(lvlm, batch, processor_kwargs=config.processor_args)
    else:
        inputs = {k: torch.as_tensor(v).to(lvlm.device) for k, v in inputs.items()}
        dtype = lvlm.model.dtype
        inputs = {
            k: v.to(dtype) if v.is_floating_point() and k.startswith("pixel_values") else v for k, v in inputs.items()
        }
    on_cuda = lvlm.device.type == "cuda"
    out = lvlm.generate_from_inputs(
        inputs, method, config.max_new_tokens, measure_memory=config.measure_memory and on_cuda
    )
    peak = out.peak_memory_bytes
    if config.measure_memory and not on_cuda and memory_pass:
        peak = lvlm.generate_from_inputs(inputs, method, config.max_new_tokens, measure_memory=True).peak_memory_bytes
    cfg = lvlm.adapter.text_config
    records = []
    for i, sample in enumerate(batch):
        trace = out.traces[i]
        n_prompt = len(out.prompt_ids[i])
        prediction = out.texts[i]
        record = {
            "id": sample.id,
            "family": sample.family,
            "question": sample.question,
            "prediction": prediction,
            "reference": sample.answer,
            "correct": bool(benchmark.is_correct(prediction, sample)),
            "prompt_tokens": n_prompt,
            "vision_tokens": trace.vision_tokens,
            "vision_tokens_per_layer": trace.vision_tokens_per_layer,
            "average_vision_tokens": trace.average_vision_tokens,
            "flops": sample_prefill_flops(cfg, trace, n_prompt, method.scorer),
            "flops_no_drop": prefill_flops(cfg, [n_prompt] * lvlm.depth),
            "prefill_seconds": out.prefill_seconds / len(batch),
            "vision_seconds": out.vision_seconds / len(batch),
            "generate_seconds": out.generate_seconds / len(batch),
            "scoring_seconds": out.scoring_seconds / len(batch),
            "peak_memory_bytes": peak,
            "batch_size": len(batch),
            "kept": trace.stages,
            "vision_runs": vision_runs(lvlm.adapter.vision_mask(torch.tensor([out.prompt_ids[i]]))[0].tolist()),
            "data_wait_seconds": data_wait / len(batch),
        }
        encoder = (
            sample_encoder_flops(lvlm.model.config.vision_config, trace) if trace.encoder_tokens_per_layer else None
        )
        if encoder is not None:  # vision-encoder stages: the tower's FLOPs, apart from the LLM's
            record["encoder_flops"], record["encoder_flops_no_drop"] = encoder
            record["encoder_tokens_per_layer"] = trace.encoder_tokens_per_layer
        tokens = sample_tokens(record)
        record["entering_llm_vision_tokens"] = tokens["entering_llm"]
        record["kv_cache_tokens"] = tokens["kv_cache_tokens"]
        times = sample_times(record)
        record["decode_seconds"], record["ttft_seconds"] = times["decode"], times["ttft"]
        records.append(record)
    step = (time.perf_counter() - start) / len(batch)
    for record in records:
        record["step_seconds"] = step  # the model's share of the batch's wall time, beside data_wait_seconds
    return records


def _run_lightning(lvlm, benchmark, method, samples, config: EvalConfig, records_path) -> list[dict] | None:
    """Predict every sample once through ``Trainer.predict``, appending records as batches finish
    (this rank's records; None on ranks other than 0, once every rank has finished)."""
    import logging

    import lightning as L
    from torch.utils.data import DataLoader

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no device banners per run
    # lightning 2.6 vs torch 2.13's pytree: a LeafSpec warning inside Lightning, printed once per Trainer
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*does not have many workers")  # workers is the user's setting

    class Predictor(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lvlm_model = lvlm.model  # registered so Lightning places it on the right device
            self.allow_zero_length_dataloader_with_multiple_devices = True  # a rank may get no batch (ShardSampler)
            self.ready_at = 0.0

        def on_predict_start(self):
            self.ready_at = time.perf_counter()

        def predict_step(self, batch, batch_idx):
            # From the end of the last step (or the start) to now the model had nothing to do: loading the batch.
            wait = time.perf_counter() - self.ready_at
            if "error" in batch:
                raise batch["error"]
            chosen = [samples[i] for i in batch["indices"]]
            assert [s.id for s in chosen] == batch["ids"], "the loader returned a batch out of order"
            out = _predict(
                lvlm, benchmark, method, chosen, config, batch_idx < config.memory_batches, batch.get("arrays"), wait
            )
            self.ready_at = time.perf_counter()
            return out

    class RecordWriter(L.Callback):
        def __init__(self):
            self.records: list[dict] = []
            self.path = None

        def on_predict_start(self, trainer, pl_module):
            if records_path is not None:
                # One writer per file: a single process appends to records_path itself, each of several ranks to its own
                # file.
                self.path = records_path if trainer.world_size == 1 else rank_file(records_path, trainer.global_rank)
                repair_tail(self.path)

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.records.extend(outputs)
            if self.path is not None:
                append_records(outputs, self.path)

    writer = RecordWriter()
    accelerator = (
        config.accelerator if config.accelerator != "auto" else ("gpu" if config.device.startswith("cuda") else "cpu")
    )
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        use_distributed_sampler=False,  # ShardSampler: whole batches per rank, each sample once
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=config.progress,
        callbacks=[writer],
        inference_mode=True,
    )
    if trainer.world_size > 1 and records_path is None:
        raise ValueError(
            f"evaluating on {trainer.world_size} ranks (devices={config.devices!r}, num_nodes={config.num_nodes}) "
            "needs a records path: rank 0 merges the ranks' records files"
        )
    # Workers decode, resize and process each batch (BatchInputs) while the model runs the previous
    # ones; the main process holds only light samples. Batches come back in order; ShardSampler
    # gives each rank whole batches, each sample once. With a sweep's vision cache attached the
    # batches are prepared here instead, through the cache, so every trial after the first reuses them.
    cached = lvlm.vision_cache is not None
    workers = {"num_workers": 0 if cached else config.workers}
    if workers["num_workers"]:
        workers.update(
            prefetch_factor=config.prefetch_factor, persistent_workers=False, worker_init_fn=_end_with_parent
        )
    loader = DataLoader(
        range(len(samples)),
        sampler=ShardSampler(len(samples), config.batch_size),
        batch_size=config.batch_size,
        collate_fn=BatchInputs(samples, None if cached else lvlm.inputs, config.processor_args),
        **workers,
    )
    sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.predict(Predictor(), dataloaders=loader, return_predictions=False)
    except SystemExit as err:
        # Lightning turns Ctrl-C into sys.exit(1) after its teardown; callers (and the CLI's resume
        # hint) need to see the interrupt as what it was.
        if isinstance(err.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt("evaluation interrupted") from None
        raise
    finally:
        if sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)  # Lightning leaves Ctrl-C ignored after an interrupt
    # After predict, not in a callback: a rank with no samples skips the predict hooks. The process
    # group outlives predict, so this waits until every rank's records file is complete.
    trainer.strategy.barrier("v2drop-records")
    return writer.records if trainer.global_rank == 0 else None


def _data_wait_share(records: list[dict]) -> float | None:
    """Share of the evaluation's wall time the model spent waiting for batches (None for records written before it was
    measured).
    """
    timed = [r for r in records if "data_wait_seconds" in r and "step_seconds" in r]
    if not timed:
        return None
    wait = sum(r["data_wait_seconds"] for r in timed)
    return wait / max(wait + sum(r["step_seconds"] for r in timed), 1e-12)


def _aggregate(lvlm, benchmark, method, config, records, records_path) -> EvalResult:
    """Benchmark metric per family and overall, tokens, FLOPs, latency medians and memory."""
    scores = benchmark.aggregate(records)
    med = lambda key: statistics.median(r[key] for r in records)  # noqa: E731  (warm-up runs are never recorded)
    flops = sum(r["flops"] for r in records) / len(records)
    flops_full = sum(r["flops_no_drop"] for r in records) / len(records)
    peaks = [r["peak_memory_bytes"] for r in records if r.get("peak_memory_bytes") is not None]
    metrics = {
        "accuracy": scores["accuracy"],
        "accuracy_ci95": bootstrap_ci([float(bool(r["correct"])) for r in records]),
        "n": len(records),
        "average_vision_tokens": sum(r["average_vision_tokens"] for r in records) / len(records),
        "vision_tokens": sum(r["vision_tokens"] for r in records) / len(records),
        "flops": flops,
        "flops_ratio": flops / flops_full if flops_full else 1.0,
        "prefill_latency_median_s": med("prefill_seconds"),
        "generation_latency_median_s": med("generate_seconds"),
        "scoring_share_of_prefill": (
            sum(r["scoring_seconds"] for r in records) / max(sum(r["prefill_seconds"] for r in records), 1e-12)
        ),
        "peak_memory_mb_max": max(peaks) / 2**20 if peaks else None,
        "peak_memory_mb_median": statistics.median(peaks) / 2**20 if peaks else None,
        "data_wait_share": _data_wait_share(records),
    }
    encoded = [r for r in records if "encoder_flops" in r]
    if encoded:  # vision-encoder stages: the tower's FLOPs and their share of the tower without dropping
        metrics["encoder_flops"] = sum(r["encoder_flops"] for r in encoded) / len(encoded)
        metrics["encoder_flops_ratio"] = sum(r["encoder_flops"] for r in encoded) / max(
            sum(r["encoder_flops_no_drop"] for r in encoded), 1e-12
        )
    metrics.update({k: v for k, v in scores.items() if k not in ("accuracy", "per_family", "n")})
    per_family = scores.get("per_family", {})
    return EvalResult(
        config=asdict(config),
        environment=environment(lvlm),
        metrics=metrics,
        per_family=per_family,
        method=method.to_dict(),
        records_path=str(records_path) if records_path else None,
        tokens=token_section(records),
        time=time_section(records),
        agreement_with_none=1.0 if not method.drops else None,
        notes=[]
        if not method.drops
        else ["agreement_with_none: evaluated outside the run store, no no-dropping run to compare with"],
    )


def apply_baseline(result: EvalResult, baseline: dict) -> EvalResult:
    """Add the figures relative to a no-dropping result (``EvalResult.to_json()``), computed by ``vs_none``:
    ``relative_accuracy``, ``relative_per_family`` and ``relative_accuracy_mean_of_families``."""
    base_fam = baseline.get("per_family") or {}
    overall, _ = vs_none({"accuracy": result.metrics["accuracy"]}, {"accuracy": baseline["metrics"]["accuracy"]})
    per_family, mean = vs_none(result.per_family, base_fam)
    result.metrics["relative_accuracy"] = overall.get("accuracy")
    result.metrics["relative_accuracy_mean_of_families"] = mean
    result.metrics["relative_per_family"] = per_family
    result.baseline = {"accuracy": baseline["metrics"]["accuracy"], "per_family": baseline.get("per_family")}
    return result
