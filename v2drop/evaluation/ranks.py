"""Evaluation on several devices or machines: which samples a rank predicts, where its records go, the merge.

Lightning's DDP launcher re-executes the command once per extra local rank (with ``LOCAL_RANK``,
``NODE_RANK``, ``WORLD_SIZE`` set); torchrun or SLURM start every rank themselves. Each rank
predicts a contiguous block of whole batches of the samples still to do (the batches one process
would run, so padded batches give the same answers), appends its records to
``records.rank<k>.jsonl`` beside ``records.jsonl``, and rank 0 merges every file into
``records.jsonl`` in sample order once all ranks have finished. Resuming reads ``records.jsonl``
and every rank file, whatever world size wrote them, so no finished sample is predicted again.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from torch.utils.data import Sampler

from v2drop.evaluation.records import read_records

# Set by the launchers (Lightning's subprocess launcher, torchrun, SLURM) in the processes they start.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def launched_rank() -> bool:
    """True in a process a launcher started for a rank other than global rank 0."""
    return any(os.environ.get(name, "0").strip() not in ("", "0") for name in RANK_VARIABLES)


def rank_file(records_path: str | os.PathLike, rank: int) -> Path:
    """Where rank ``rank`` appends its records: ``records.rank<k>.jsonl`` beside ``records.jsonl``."""
    path = Path(records_path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def rank_files(records_path: str | os.PathLike) -> list[Path]:
    """The rank files beside ``records_path`` that exist (of any earlier world size), by rank."""
    path = Path(records_path)
    pattern = re.compile(rf"{re.escape(path.stem)}\.rank(\d+){re.escape(path.suffix)}")
    found = [
        (int(m.group(1)), p)
        for p in path.parent.glob(f"{path.stem}.rank*{path.suffix}")
        if (m := pattern.fullmatch(p.name))
    ]
    return [p for _, p in sorted(found)]


def earlier_records(records_path: str | os.PathLike) -> Path | None:
    """The first records file of an earlier run at ``records_path`` (itself or a rank file), or None."""
    path = Path(records_path)
    if path.exists():
        return path
    return next(iter(rank_files(path)), None)


def read_finished(records_path: str | os.PathLike) -> dict[str, dict]:
    """Finished records by id from ``records_path`` and its rank files (torn last lines ignored; first copy wins)."""
    done: dict[str, dict] = {}
    for path in [Path(records_path)] + rank_files(records_path):
        if path.exists():
            for record in read_records(path):
                done.setdefault(record["id"], record)
    return done


def shard(n: int, batch_size: int, rank: int, world_size: int) -> range:
    """Indices of ``range(n)`` that ``rank`` predicts: a contiguous block of whole batches, possibly empty.

    Whole batches, so every batch is one a single process would run; the first ``n_batches %
    world_size`` ranks take one batch more than the others.
    """
    assert 0 <= rank < world_size and batch_size >= 1
    n_batches = -(-n // batch_size)
    per, extra = divmod(n_batches, world_size)
    first = rank * per + min(rank, extra)
    last = first + per + (rank < extra)
    return range(min(first * batch_size, n), min(last * batch_size, n))


class ShardSampler(Sampler[int]):
    """This process's ``shard`` of ``range(n)``, the rank read from ``torch.distributed`` when iterated.

    Lightning's own predict sampler deals samples out round-robin (so batches differ from one
    process's) and fails on a rank that gets none; the rank is read late because the process group
    exists only once ``Trainer.predict`` has set it up.
    """

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size = n, batch_size

    def _indices(self) -> range:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return shard(self.n, self.batch_size, dist.get_rank(), dist.get_world_size())
        return range(self.n)

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def merge_records(records_path: str | os.PathLike, order: list[str]) -> list[dict]:
    """Rewrite ``records_path`` with every finished record (its own and its rank files'), in ``order``, and remove the
    rank files.

    Ids not in ``order`` (an earlier run over more samples) keep their place after the others.
    The new file replaces the old one atomically, and the rank files go only after it, so a crash
    at any point loses no record (``read_finished`` drops the duplicates).
    """
    path = Path(records_path)
    done = read_finished(path)
    position = {sample_id: i for i, sample_id in enumerate(order)}
    records = sorted(done.values(), key=lambda r: position.get(r["id"], len(order)))
    tmp = path.with_name(path.name + ".merging")
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for rank_path in rank_files(path):
        rank_path.unlink()
    return records
