"""Checks that run before any model loads, study is created or run directory is touched.

Every command (and the Python API behind it: ``run_evaluation``, ``run_sweep``, ``v2drop.load``)
calls these first, so a mistake costs a second, not a model load or half a run. Each raises
``ValueError`` (or ``FileNotFoundError`` for a missing file) with one line naming the bad value
and what would be valid; nothing here creates a file or a directory.
"""

from __future__ import annotations

import importlib.util
import json
import operator
import os
import tempfile
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16", "auto")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def check_int(name: str, value: Any, minimum: int = 1, optional: bool = False) -> int | None:
    """``value`` as an int when it is a whole number >= ``minimum`` (None allowed when ``optional``)."""
    if value is None and optional:
        return None
    what = f"a whole number >= {minimum}" + (" or None" if optional else "")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if isinstance(value, bool) or number < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return number


def check_dtype(dtype: Any) -> None:
    """A dtype ``v2drop.load`` accepts: a torch.dtype or one of ``DTYPES``."""
    import torch

    if isinstance(dtype, torch.dtype) or dtype in DTYPES:
        return
    raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")


def check_attn(attn: str) -> None:
    """An attention implementation of ``ATTN_IMPLEMENTATIONS`` whose package is installed."""
    if attn not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation {attn!r} is not supported; choose one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "attn_implementation 'flash_attention_2' needs the flash-attn package, which is not installed; "
            'install it on a CUDA machine (pip install -e ".[flash]") or use sdpa'
        )


def check_device(device: Any) -> None:
    """A device that exists on this machine (``cpu``, ``cuda``/``cuda:N`` with CUDA, ``mps`` on Apple)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device {device!r} asks for CUDA, but this machine has no usable CUDA GPU "
                f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA); use --device "
                "cpu"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r}: there are only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r} asks for Apple MPS, which is not available here; use --device cpu")
        return
    raise ValueError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or mps")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _can_write_in(directory: Path) -> bool:
    """True when a file can be created in ``directory`` (tried for real: root passes every ``os.access`` test,
    and a read-only mount passes the permission bits)."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _can_append(path: Path) -> bool:
    """True when the existing file ``path`` opens for appending (its content and times are left as they are)."""
    try:
        with open(path, "ab"):
            return True
    except OSError:
        return False


def check_writable(path: str | os.PathLike, directory: bool = False) -> None:
    """Fail now when ``path`` (a file, or a directory when ``directory``) could not be written later; leaves nothing
    behind.
    """
    path = Path(path)
    kind = "directory" if directory else "file"
    if path.exists():
        if directory and not path.is_dir():
            raise ValueError(f"Cannot use {str(path)!r} as a directory: it is a file")
        if not directory and path.is_dir():
            raise ValueError(f"Cannot write {str(path)!r}: it is a directory, not a file")
        if not (_can_write_in(path) if directory else _can_append(path)):
            raise ValueError(
                f"Cannot write to {kind} {str(path)!r}: it is read-only (check its permissions or choose another path)"
            )
        return
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ValueError(f"Cannot create {kind} {str(path)!r}: {str(base)!r} is a file, not a directory")
    if not _can_write_in(base):
        raise ValueError(f"Cannot create {kind} {str(path)!r}: directory {str(base)!r} is not writable")


def check_method_file(spec: str | None, flag: str = "--schedule") -> None:
    """A ``--method``/``--schedule`` YAML file must hold a method (``scorer``/``schedule``) or a bare schedule
    (``stages``).
    """
    if not spec or not Path(spec).is_file():
        return  # a preset name, or a missing file (resolve_method names it)
    from v2drop.config import read_yaml

    data = read_yaml(spec, what=f"{flag}")
    wanted = {"stages", "schedule", "scorer"}
    if not wanted & set(data):
        raise ValueError(
            f"{flag} file {str(spec)!r} is not a method or schedule: it has keys {sorted(data)[:8]}, "
            f"but a schedule file holds 'stages' (a method file 'scorer' and 'schedule'); or give a preset name"
        )


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The data in a JSON file; missing is a FileNotFoundError, broken a ValueError, both naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} {str(path)!r} does not exist" + (" (it is a directory)" if path.is_dir() else "")
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{what} {str(path)!r} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {what} {str(path)!r}: {err}") from None


def read_result(path: str | os.PathLike, what: str = "baseline result") -> dict:
    """An ``EvalResult`` JSON (as ``result.json`` holds it): a mapping with ``metrics.accuracy``."""
    data = read_json(path, what)
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict) or "accuracy" not in data["metrics"]:
        raise ValueError(f"{what} {str(path)!r} is not an evaluation result (a result.json with metrics.accuracy)")
    return data


def model_config(name: str):
    """The model's ``transformers`` config (config.json only, no weights): an unreachable model fails here."""
    from transformers import AutoConfig

    from v2drop.bundled import LOCAL_MODELS

    path = LOCAL_MODELS.get(name, name)
    if name in LOCAL_MODELS and not Path(path).is_dir():
        raise ValueError(
            f"The bundled model {name!r} is missing at {path}; train it with `python -m experiments.train_proxy`"
        )
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"Cannot load model {name!r}: not a local directory with a config.json, and the hub is unreachable "
            f"or has no such repo ({first})"
        ) from None


def model_depth(name: str) -> int:
    """Decoder layers of model ``name``, read from its config.json."""
    config = model_config(name)
    text = getattr(config, "text_config", None) or config
    depth = getattr(text, "num_hidden_layers", None)
    if not isinstance(depth, int):
        raise ValueError(f"model {name!r}: its config.json gives no num_hidden_layers, so it is not a supported LVLM")
    return depth


def check_settings(settings) -> None:
    """The numbers of an ``EvalSettings`` (or ``EvalConfig``) in range."""
    check_int("limit", settings.limit, 1, optional=True)
    check_int("batch_size", settings.batch_size, 1)
    check_int("max_new_tokens", settings.max_new_tokens, 1)
    check_int("warmup", settings.warmup, 0)
    check_int("threads", settings.threads, 1, optional=True)
    check_int("memory_batches", settings.memory_batches, 0)
    check_int("workers", settings.workers, 0)
    check_int("prefetch_factor", settings.prefetch_factor, 1)
    if settings.accelerator not in ("auto", "cpu", "gpu", "cuda", "mps", "tpu"):
        raise ValueError(f"accelerator {settings.accelerator!r} is not a Lightning accelerator; use auto, cpu or gpu")
    if settings.devices != "auto":
        check_int("devices", settings.devices, 1)
    check_int("num_nodes", settings.num_nodes, 1)


def check_eval_config(config) -> None:
    """Everything of an ``EvalConfig`` checkable without data or model: numbers, dtype, device, attention."""
    check_settings(config)
    check_dtype(config.dtype)
    check_attn(config.attn_implementation)
    if config.device_map is None:
        check_device(config.device)
    elif config.device_map not in ("auto", "cpu", "balanced", "sequential") and not isinstance(config.device_map, dict):
        check_device(config.device_map)
    if config.device_map not in (None, "cpu") and (config.devices != 1 or config.num_nodes != 1):
        # device_map spreads one model over the GPUs; each rank needs a whole model on its own device
        raise ValueError(
            f"device_map {config.device_map!r} cannot be combined with devices={config.devices!r}, "
            f"num_nodes={config.num_nodes!r}; use --device cuda with --devices N (each rank holds the whole model)"
        )


def check_presets(names, key: str = "enqueue_presets") -> None:
    """Every name is a shipped preset (or a YAML file that exists)."""
    from v2drop.presets import list_presets

    presets = list_presets()
    for name in names:
        if name not in presets and not (str(name).endswith((".yaml", ".yml")) and Path(name).is_file()):
            raise ValueError(f"{key} names unknown preset {name!r}; available presets: {', '.join(presets)}")


def sweep_budget(cfg):
    """A sweep's token constraint as a ``v2drop.budgets.Budget`` (from ``budget`` or ``max_average_tokens``, an
    ``average`` budget), or None; both given is a one-line ValueError."""
    from v2drop.budgets import Budget

    if cfg.budget is not None and cfg.max_average_tokens is not None:
        raise ValueError(
            f"budget={cfg.budget!r} and max_average_tokens={cfg.max_average_tokens!r} both bound the tokens; "
            "give one (budget: N is max_average_tokens: N; budget: {tokens: N, count: entering} counts entering ones)"
        )
    if cfg.max_average_tokens is not None:
        return Budget(cfg.max_average_tokens, "average")
    return Budget.parse(cfg.budget, "budget")


def check_served(cfg, flags: bool = False) -> None:
    """vLLM's serving settings (``max_num_seqs``, ``kv_cache_gib``, ``max_model_len``) of a sweep's ``served:``, or of
    experiments.serve_bench's options when ``flags`` (errors then name ``--max-num-seqs``, ...)."""

    def name(key: str) -> str:
        return "--" + key.replace("_", "-") if flags else f"served.{key}"

    check_int(name("max_num_seqs"), cfg.max_num_seqs, 1)
    check_int(name("max_model_len"), cfg.max_model_len, 1, optional=True)
    gib = cfg.kv_cache_gib
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not gib > 0:
        raise ValueError(f"{name('kv_cache_gib')} must be a positive number of GiB, got {gib!r}")


def check_sweep(cfg) -> None:
    """The parts of a ``SweepConfig`` the search-space validation does not cover: counts, eval settings, presets."""
    check_int("trials", cfg.trials, 1)
    check_int("total_trials", cfg.total_trials, 1, optional=True)
    check_int("heartbeat", cfg.heartbeat, 1)
    check_int("retries", cfg.retries, 0)
    check_int("confirm.limit", cfg.confirm.limit, 1, optional=True)
    check_served(cfg.served)
    if cfg.max_average_tokens is not None and not cfg.max_average_tokens > 0:
        raise ValueError(
            f"max_average_tokens must be a positive number of tokens or None, got {cfg.max_average_tokens!r}"
        )
    sweep_budget(cfg)
    try:
        check_settings(cfg.eval)
    except ValueError as err:
        raise ValueError(f"eval.{err}") from None
    if cfg.eval.devices != 1 or cfg.eval.num_nodes != 1:  # Lightning's launcher would re-run the whole sweep per rank
        raise ValueError(
            f"eval.devices={cfg.eval.devices!r}, eval.num_nodes={cfg.eval.num_nodes!r}: a sweep runs its trials "
            "in one process; use 1 and 1 (several devices are for experiments.evaluate)"
        )
    from v2drop.search.space import expand_presets

    expand_presets(cfg.enqueue_presets)  # names or fnmatch patterns; one that matches no preset is an error
