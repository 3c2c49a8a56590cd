"""The one cost model (analytic FLOPs, KV-cache size) and measurement (peak memory, timing, environment).

FLOPs follow ``docs/methods.md``: a decoder layer over ``n`` tokens costs 4·n·d² + 2·n²·d + 3·n·d·m
(d = hidden size, m = MLP size), plus each drop stage's scorer (``Scorer.flops``) on the tokens
present just before the stage; a pre-LLM stage (layer -1) counts its scorer on the prompt's
vision tokens and shrinks every decoder layer's token count. The vision encoder is counted apart
(``encoder_flops``): a ViT layer over ``n`` tokens costs 4·n·c² + 2·n²·c + 2·n·c·m (c, m its
hidden and MLP sizes; two MLP matrices), so vision-encoder stages save in the layers after them.
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

# -- analytic cost ---------------------------------------------------------------------------------


def layer_flops(n: int, hidden: int, mlp: int) -> float:
    """FLOPs of one decoder layer over ``n`` tokens: 4·n·d² + 2·n²·d + 3·n·d·m."""
    return 4 * n * hidden**2 + 2 * n**2 * hidden + 3 * n * hidden * mlp


def prefill_flops(text_config, tokens_per_layer: Sequence[int], scorer_flops: float = 0.0) -> float:
    """Analytic prefill FLOPs for the tokens present in each layer, plus the scorer's cost."""
    d, m = text_config.hidden_size, text_config.intermediate_size
    return sum(layer_flops(n, d, m) for n in tokens_per_layer) + scorer_flops


def method_prefill_flops(
    text_config,
    text_tokens: int,
    vision_tokens: int,
    vision_per_layer: Sequence[int],
    stage_layers: Sequence[int],
    scorer=None,
) -> float:
    """Prefill FLOPs of a prompt of ``text_tokens`` text and ``vision_tokens`` vision tokens under a method.

    ``vision_per_layer`` are the vision tokens present in each decoder layer. Each stage (before
    layer ``l`` in ``stage_layers``) adds the FLOPs of the scorer running there
    (``scorer.at(l).flops``) on the vision tokens present just before it (those of layer
    ``l - 1``, or the prompt's for a stage before layer 0 and for the pre-LLM stage, layer -1)
    and the sequence they are part of. A pre-LLM stage's effect on the decoder is already in
    ``vision_per_layer`` (layer 0 sees what it kept).
    """
    tokens = [text_tokens + v for v in vision_per_layer]
    scoring = 0.0
    if scorer is not None:
        hidden = text_config.hidden_size
        for layer in stage_layers:
            present = vision_per_layer[layer - 1] if layer > 0 else vision_tokens
            scoring += scorer.at(layer).flops(n_vision=present, n_tokens=text_tokens + present, hidden=hidden)
    return prefill_flops(text_config, tokens, scoring)


def sample_prefill_flops(text_config, trace, n_prompt: int, scorer=None) -> float:
    """Prefill FLOPs of one sample the engine ran, from its ``SampleTrace``, prompt length and the method's scorer."""
    text_tokens = n_prompt - trace.vision_tokens
    stage_layers = [s["layer"] for s in trace.stages]
    return method_prefill_flops(
        text_config, text_tokens, trace.vision_tokens, trace.vision_tokens_per_layer, stage_layers, scorer
    )


def encoder_layer_flops(n: int, hidden: int, mlp: int) -> float:
    """FLOPs of one vision-encoder (ViT) layer over ``n`` tokens: 4·n·c² + 2·n²·c + 2·n·c·m."""
    return 4 * n * hidden**2 + 2 * n**2 * hidden + 2 * n * hidden * mlp


def encoder_flops(vision_config, tokens_per_layer: Sequence[int]) -> float:
    """Vision-encoder FLOPs for the tokens present in each encoder layer that ran (``vision_config``: the tower's)."""
    c, m = vision_config.hidden_size, vision_config.intermediate_size
    return float(sum(encoder_layer_flops(n, c, m) for n in tokens_per_layer))


def sample_encoder_flops(vision_config, trace) -> tuple[float, float] | None:
    """(encoder FLOPs, encoder FLOPs without dropping) of one sample run with vision-encoder stages, or None.

    From the trace's ``encoder_tokens_per_layer``; without dropping, the tower runs all of its
    ``num_hidden_layers`` on the tokens of its first layer (as transformers' tower does).
    """
    tokens = getattr(trace, "encoder_tokens_per_layer", None)
    if not tokens:
        return None
    full = [tokens[0]] * vision_config.num_hidden_layers
    return encoder_flops(vision_config, tokens), encoder_flops(vision_config, full)


def kv_cache_bytes(text_config, tokens_per_layer: Sequence[int], bytes_per_value: int = 2) -> int:
    """Size of the KV cache holding ``tokens_per_layer`` tokens in each layer (keys + values; 2 bytes = bf16)."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return sum(tokens_per_layer) * 2 * kv_heads * head_dim * bytes_per_value


# -- measurement -----------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work on ``device`` (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Seconds since creation (or since entering ``with``): CUDA events on a GPU, ``perf_counter`` elsewhere.

    ``elapsed()`` reads the time so far; as a context manager, ``seconds`` holds the total on exit.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds = 0.0
        self._start()

    def _start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._begin = torch.cuda.Event(enable_timing=True)
            self._begin.record()
        else:
            self._begin = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds from the start to now (waits for queued GPU work)."""
        if self.device.type != "cuda":
            return time.perf_counter() - self._begin
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self._begin.elapsed_time(end) / 1e3

    def __enter__(self) -> Timer:
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = self.elapsed()


class PeakMemory:
    """Context manager measuring the peak memory growth (bytes, ``peak_bytes``) of the code it wraps.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at entry (allocator peak).
    CPU: a background thread samples the process's resident set size (``/proc/self/statm``) every
    ``interval`` seconds; the figure is the largest RSS seen minus the RSS at entry. So that RSS
    follows live tensors, glibc is told to serve allocations of 64 KiB and more with ``mmap``
    (returned to the system when freed) and free heap memory is trimmed at entry; without that, a
    run that follows a bigger one reuses cached pages and shows no growth. Short spikes between
    samples can be missed: treat CPU figures as comparisons between runs, not absolutes. The
    sampler thread and the mmap setting slow the wrapped code (about 2x on the proxy): never time
    code inside it on CPU. On exit, also by an exception, the thread stops and the normal
    threshold is restored.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.0005):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        _set_mmap_threshold(_MEASURE_THRESHOLD, trim=True)
        try:
            self._start = _rss()
            self._peak = self._start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        except BaseException:
            _set_mmap_threshold(_NORMAL_THRESHOLD)
            raise
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        try:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, _rss()) - self._start
        finally:
            _set_mmap_threshold(_NORMAL_THRESHOLD)

    @property
    def sampling(self) -> bool:
        """Whether the CPU sampler thread is running."""
        return self._thread is not None and self._thread.is_alive()


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MEASURE_THRESHOLD = 64 * 1024
# Where glibc's dynamic threshold settles; mmap for every 64 KiB tensor would make later, timed
# code pay a page fault per allocation.
_NORMAL_THRESHOLD = 32 * 2**20
_mmap_threshold: int | None = None  # the last value this module gave glibc (None: never set, or not glibc)


def mmap_threshold() -> int | None:
    """glibc's M_MMAP_THRESHOLD as last set by ``PeakMemory`` (None if it never set one)."""
    return _mmap_threshold


def _set_mmap_threshold(value: int, trim: bool = False) -> None:
    """glibc only: allocations of ``value`` bytes and more via mmap; ``trim`` returns free heap memory."""
    global _mmap_threshold
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, value)  # M_MMAP_THRESHOLD; also stops glibc raising it dynamically
        if trim:
            libc.malloc_trim(0)
        _mmap_threshold = value
    except (OSError, AttributeError):  # not glibc: RSS figures include cached memory
        pass


def _rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def environment(lvlm=None) -> dict:
    """Versions, device, dtype, attention implementation, threads and git commit, for result files."""
    import transformers

    import v2drop

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "v2drop": v2drop.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": _git_commit(),
    }
    if lvlm is not None:
        env.update(
            model=lvlm.name,
            device=str(lvlm.device),
            dtype=str(lvlm.model.dtype).replace("torch.", ""),
            attn_implementation=lvlm.model.config._attn_implementation,
        )
    return env


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
