"""Measurements shared by the harness and the benchmarks: peak memory, analytic FLOPs, environment."""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from pathlib import Path

import torch


class PeakMemory:
    """Context manager measuring the peak memory growth (bytes) of the code it wraps.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at entry (allocator peak).
    CPU: a background thread samples the process's resident set size (``/proc/self/statm``) every
    ``interval`` seconds; the figure is the largest RSS seen minus the RSS at entry. So that RSS
    follows live tensors, glibc is told to serve allocations of 64 KiB and more with ``mmap``
    (returned to the system when freed) and free heap memory is trimmed at entry; without that, a
    run that follows a bigger one reuses cached pages and shows no growth. Short spikes between
    samples can be missed: treat CPU figures as comparisons between runs, not absolutes. The
    sampler thread and the mmap setting slow the wrapped code (about 2x on the proxy): never time
    code inside it on CPU; the normal threshold is restored on exit.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.0005):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_memory()
            self._start = _rss()
            self._peak = self._start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, _rss()) - self._start
            _restore_malloc()


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _release_free_memory() -> None:
    """glibc only: large allocations via mmap (freed to the system at once), then trim the heap."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD; also stops glibc raising it dynamically
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS figures include cached memory
        pass


def _restore_malloc() -> None:
    """Serve allocations below 32 MiB from the heap again (where glibc's dynamic threshold settles):
    mmap for every 64 KiB tensor makes later, timed code pay a page fault per allocation."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 32 * 2**20)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def layer_flops(n: int, hidden: int, mlp: int) -> float:
    """FLOPs of one decoder layer over ``n`` tokens (METHODS.md): 4·n·d² + 2·n²·d + 3·n·d·m."""
    return 4 * n * hidden**2 + 2 * n**2 * hidden + 3 * n * hidden * mlp


def prefill_flops(text_config, tokens_per_layer: list[int], scorer_flops: float = 0.0) -> float:
    """Analytic prefill FLOPs for the tokens present in each layer, plus the scorer's cost."""
    d, m = text_config.hidden_size, text_config.intermediate_size
    return sum(layer_flops(n, d, m) for n in tokens_per_layer) + scorer_flops


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
