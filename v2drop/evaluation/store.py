"""The run store: every evaluation's records and result, one folder per key, reused instead of rerun.

Every evaluation that keeps its records (``experiments.evaluate``, the analyses through
``analysis.common.run_methods``, a sweep's confirmation of its front) goes through
``evaluate_in_store``. Its ``RunKey`` holds everything that changes the outputs: the model's weights
(``LVLM.weights_fingerprint``) and name, the benchmark, its parameters, the split and the exact
samples (their ids), the method (``Method.to_dict()`` at the model's depth) and the engine
settings (``max_new_tokens``, attention implementation, dtype, batch size), and the image processor options
(``EvalConfig.processor_args``, e.g. pan-and-scan) when any are set. The folder is
``<store>/<model>-<benchmark>-<digest>/`` (the digest: a hash of the whole key) and holds
``key.json`` (the full key), ``records.jsonl`` (one record per finished sample, appended as they
finish) and ``result.json`` (the ``EvalResult``, written once every sample is done).

The store is ``EvalConfig.store`` when set, else ``$V2DROP_STORE``, else ``runs/store``. A key
whose ``result.json`` exists is read back: no model work. A key with records but no result
(an interrupted run) continues where it stopped: finished samples are skipped. That is the one
cache and the one resume. One process at a time evaluates a key: it holds an exclusive lock on the
folder's ``lock`` file, and a second process asking for the same key waits for it, then reads its
result back (a killed holder releases the lock; the next one resumes its records).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from v2drop.evaluation.config import EvalConfig, EvalResult

DEFAULT_STORE = Path("runs") / "store"
STORE_VARIABLE = "V2DROP_STORE"  # environment variable naming the default store (tests point it at a temporary one)


def _canonical(data) -> str:
    """``data`` as compact JSON with sorted keys: equal data, equal text."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class RunKey:
    """What defines an evaluation's outputs; equal keys give equal records (timings aside)."""

    weights: str  # LVLM.weights_fingerprint: a model retrained under the same name is another key
    model: str  # the model's name (EvalConfig.model)
    benchmark: str  # the registered benchmark name
    benchmark_args: str  # its constructor parameters, as canonical JSON
    split: str  # the split the samples are from
    n: int  # how many samples
    samples: str  # a hash of the samples' ids, in order
    method: str  # Method.to_dict() at the model's depth, as canonical JSON
    max_new_tokens: int  # greedy tokens generated per answer
    attn_implementation: str  # eager, sdpa or flash_attention_2
    dtype: str  # the model's dtype
    batch_size: int  # samples per generate call (padding can change answers)
    processor_args: str = "{}"  # EvalConfig.processor_args as canonical JSON; left out of the hash and file when empty

    def _data(self) -> dict:
        """The fields as plain data, ``processor_args`` only when set (keys of runs without it hash as they always
        did)."""
        data = asdict(self)
        if data["processor_args"] == "{}":
            del data["processor_args"]
        return data

    @classmethod
    def of(cls, lvlm, config: EvalConfig, split: str, samples: list, method) -> RunKey:
        """The key of evaluating ``samples`` of ``split`` under ``method`` (already at ``lvlm``'s depth) with
        ``config``."""
        ids = hashlib.blake2b("\n".join(str(s.id) for s in samples).encode(), digest_size=8).hexdigest()
        return cls(
            weights=lvlm.weights_fingerprint,
            model=str(config.model),
            benchmark=config.benchmark,
            benchmark_args=_canonical(config.benchmark_args or {}),
            split=str(split),
            n=len(samples),
            samples=ids,
            method=_canonical(method.to_dict()),
            max_new_tokens=config.max_new_tokens,
            attn_implementation=config.attn_implementation,
            dtype=config.dtype,
            batch_size=config.batch_size,
            processor_args=_canonical(config.processor_args or {}),
        )

    @property
    def digest(self) -> str:
        """A stable hash of the whole key (16 hex digits)."""
        return hashlib.blake2b(_canonical(self._data()).encode(), digest_size=8).hexdigest()

    @property
    def folder_name(self) -> str:
        """``<model>-<benchmark>-<digest>``, unsafe characters replaced."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{Path(self.model).name}-{self.benchmark}") + f"-{self.digest}"

    def to_json(self) -> dict:
        """The key as plain data (method and benchmark parameters as data, not text)."""
        data = self._data()
        data["method"] = json.loads(self.method)
        data["benchmark_args"] = json.loads(self.benchmark_args)
        if "processor_args" in data:
            data["processor_args"] = json.loads(self.processor_args)
        return data

    @classmethod
    def from_json(cls, data: dict) -> RunKey:
        """The inverse of ``to_json``; a mapping that is not a key is a ValueError."""
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or set(data) - {"processor_args"} != set(names) - {"processor_args"}:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a run key: expected the fields {names} (processor_args optional), got {got}")
        as_text = {k: _canonical(data[k]) for k in ("method", "benchmark_args", "processor_args") if k in data}
        return cls(**{**data, **as_text})

    def comparable(self) -> str:
        """The key without its method, as text: runs equal here differ only in the method (and share a no-dropping
        baseline)."""
        return _canonical({k: v for k, v in self._data().items() if k != "method"})


def store_dir(store: str | os.PathLike | None = None) -> Path:
    """The store directory: ``store``, else ``$V2DROP_STORE``, else ``runs/store``."""
    return Path(store or os.environ.get(STORE_VARIABLE) or DEFAULT_STORE)


def read_stored(folder: str | os.PathLike) -> EvalResult | None:
    """The finished result in a store folder (``reused`` set, ``records_path`` pointing into it), or None."""
    folder = Path(folder)
    path = folder / "result.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if _backfill_accounting(data, folder / "records.jsonl"):
        tmp = folder / "result.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)
    names = {f.name for f in fields(EvalResult)}
    result = EvalResult(**{k: v for k, v in data.items() if k in names})
    result.records_path = str(folder / "records.jsonl")
    result.reused = True
    return result


def _backfill_accounting(data: dict, records_path: Path) -> bool:
    """Add the accounting sections a result filed before they existed (``tokens``, ``time``,
    ``metrics.accuracy_ci95``) from its own records, in place; True when ``data`` changed."""
    from v2drop.evaluation.accounting import bootstrap_ci, time_section, token_section
    from v2drop.evaluation.records import read_records

    metrics = data.get("metrics") or {}
    missing = [k for k in ("tokens", "time") if data.get(k) is None] + (
        ["metrics.accuracy_ci95"] if metrics.get("accuracy_ci95") is None else []
    )
    if not missing or not records_path.exists():
        return False
    records = read_records(records_path)
    if not records:
        return False
    if data.get("tokens") is None:
        data["tokens"] = token_section(records)
    if data.get("time") is None:
        data["time"] = time_section(records)
    if metrics.get("accuracy_ci95") is None:
        metrics["accuracy_ci95"] = bootstrap_ci([float(bool(r["correct"])) for r in records])
    data.setdefault("notes", []).append(f"{', '.join(missing)}: added from records.jsonl after the run")
    return True


def no_drop_run(store: str | os.PathLike | None, key: RunKey) -> Path | None:
    """The folder of the finished no-dropping run filed under ``key`` but for the method (``RunKey.comparable``), or
    None when the store holds none."""
    from v2drop.evaluation.collect import method_drops

    for key_file in sorted(store_dir(store).glob("*/key.json")):
        folder = key_file.parent
        if not (folder / "result.json").exists():
            continue
        try:
            other = RunKey.from_json(json.loads(key_file.read_text()))
        except ValueError:
            continue
        if other.comparable() == key.comparable() and not method_drops(json.loads(other.method)):
            return folder
    return None


def agreement_in_store(store: str | os.PathLike | None, key: RunKey, records: list[dict]) -> tuple[float | None, list]:
    """``agreement_with_none`` of a run's records against the stored no-dropping run of the same key but for the
    method (never re-run), and the notes to file with it (one saying why when there is no such run)."""
    from v2drop.evaluation.accounting import agreement
    from v2drop.evaluation.records import read_records

    folder = no_drop_run(store, key)
    if folder is None:
        return None, [
            "agreement_with_none: no finished no-dropping run with the same key but the method in the store "
            "(run --method none on the same samples first)"
        ]
    return agreement(records, read_records(folder / "records.jsonl")), []


def evaluate_in_store(
    lvlm, benchmark, method, config: EvalConfig, samples: list | None = None, split: str | None = None
) -> EvalResult | None:
    """Evaluate into the store folder of the run's key (``config.store``), or read a finished key back.

    ``samples`` default to the first ``config.limit`` of ``split`` (default: ``config.split``
    resolved by the benchmark). Returns None on ranks other than 0 of a multi-device run.
    """
    split = benchmark.resolve_split(config.split if split is None else split)
    samples = benchmark.load(split, config.limit) if samples is None else samples
    method = method.rescaled(lvlm.depth)
    key = RunKey.of(lvlm, config, split, samples, method)
    folder = store_dir(config.store) / key.folder_name
    finished = read_stored(folder)
    if finished is not None:
        return finished
    folder.mkdir(parents=True, exist_ok=True)
    with key_lock(folder):
        finished = read_stored(folder)  # another process may have finished the key while this one waited
        if finished is not None:
            return finished
        return _evaluate_into(lvlm, benchmark, method, config, samples, split, key, folder)


@contextmanager
def key_lock(folder: Path):
    """Hold the exclusive lock of a store folder (its ``lock`` file) while evaluating into it, waiting (with a
    message naming the holder's pid) while another process holds it. Ranks a launcher started skip it: rank 0,
    which started them, holds it for the whole run."""
    from v2drop.evaluation.ranks import launched_rank

    if launched_rank():
        yield
        return
    import fcntl

    with open(folder / "lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            print(f"waiting for process {holder}, which is evaluating {folder} ...", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _evaluate_into(lvlm, benchmark, method, config, samples, split, key: RunKey, folder: Path) -> EvalResult | None:
    """Evaluate a key into its folder (the caller holds its lock) and file ``result.json`` once every sample is done."""
    from v2drop.evaluation.harness import evaluate

    (folder / "key.json").write_text(json.dumps(key.to_json(), indent=2))
    result = evaluate(
        lvlm, benchmark, method, config, records_path=folder / "records.jsonl", resume=True, samples=samples
    )
    if result is None:
        return None
    result.split = split
    result.key = key.to_json()
    if method.drops:
        from v2drop.evaluation.records import read_records

        records = read_records(folder / "records.jsonl")
        result.agreement_with_none, result.notes = agreement_in_store(config.store, key, records)
    tmp = folder / "result.json.tmp"
    tmp.write_text(json.dumps(result.to_json(), indent=2))
    tmp.replace(folder / "result.json")  # whole or absent: a killed write never leaves a half result
    return result
