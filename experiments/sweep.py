"""Search drop layers and keep fractions with Optuna; write and log the accuracy–cost Pareto front.

    python -m experiments.sweep [--config configs/sweep/default.yaml] [--set key=value ...]
                                [--storage URL] [--study NAME] [--trials N] [--workers N]

Run the same command with the same ``--study`` and ``--storage`` on any number of machines
to share one study; re-running a finished or interrupted command resumes it. ``--workers N``
starts N worker processes on this machine, all on the run's storage, worker ``i`` seeing only GPU
``i`` (``CUDA_VISIBLE_DEVICES``; with ``--set eval.device=cuda``), each running ``--trials``
trials; once all are done the artifacts are written and the front confirmed once. Artifacts go to
``runs/<study>/``: trials.csv, pareto.csv, pareto_confirmed.csv, pareto.png, config.json, and the
wandb run (offline by default: ``wandb sync runs/<study>/wandb/offline-run-*``). Every input is
checked before the model loads and the study is created: a mistake is one ``error: ...`` line and
exit status 2 (``--debug`` or ``V2DROP_DEBUG=1``: traceback). See docs/sweeps.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from v2drop.cli import parse_config, run
from v2drop.search import SweepConfig, format_front, run_sweep

ROOT = str(Path(__file__).resolve().parents[1])


def main(argv=None) -> dict:
    """Parse, validate, run the sweep, print the front; bad input: ``error: ...``, exit status 2."""
    return run(_main, argv)


@dataclass
class SweepCommand(SweepConfig):
    """The command's options: a ``SweepConfig`` and how this machine runs it."""

    workers: int = (
        1  # worker processes on this machine, worker i on GPU i (CUDA_VISIBLE_DEVICES), each running `trials`
    )
    trials_only: bool = (
        False  # run this worker's trials and stop: no artifacts, no confirmation (how --workers starts its workers)
    )
    progress: bool = True  # show progress bars

    def __post_init__(self):
        if not isinstance(self.workers, int) or self.workers < 1 or (self.workers > 1 and self.trials_only):
            raise ValueError(
                f"--workers must be a whole number >= 1 (and not given with --trials-only), got {self.workers}"
            )

    def sweep(self) -> SweepConfig:
        """The ``SweepConfig`` part."""
        return SweepConfig(**{f.name: getattr(self, f.name) for f in fields(SweepConfig)})


CONFIG = SweepCommand


def _main(argv) -> dict:
    args = parse_config(SweepCommand, argv, __doc__, config="configs/sweep/default.yaml")
    cfg = args.sweep()
    start = time.time()
    if args.trials_only:
        result = run_sweep(cfg, progress=args.progress, finish=False)
        print(f"worker {os.getpid()} done ({(time.time() - start) / 60:.1f} min)")
        return result
    if args.workers > 1:
        result = run_workers(cfg, args.workers, argv, progress=args.progress)
    else:
        result = run_sweep(cfg, progress=args.progress)
    print(
        f"\nPareto front of {cfg.study} ({len(result['rows'])} complete trials, {(time.time() - start) / 60:.1f} min):"
    )
    print(format_front(result["front"], result["confirmed"]))
    print(f"\nartifacts in {result['run_dir']}")
    return result


def worker_devices(n: int) -> list[str | None]:
    """The ``CUDA_VISIBLE_DEVICES`` of each of ``n`` workers: the visible GPUs in turn (several workers per GPU when
    there are fewer GPUs than workers); None for every worker on a machine without CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
    else:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    return [gpus[i % len(gpus)] if gpus else None for i in range(n)]


def run_workers(cfg: SweepConfig, n: int, argv: list[str], progress: bool = True) -> dict:
    """Check everything, start ``n`` processes of this command (its command line ``argv``) with ``--trials-only``
    (same config and storage, one GPU each), wait for all, then write the artifacts and confirm the front once."""
    from v2drop.search import finish_sweep
    from v2drop.search.checks import check_sweep_run

    check_sweep_run(cfg)  # a mistake is reported once, before any worker starts or the study exists
    # the same command line, then (later layers win) one worker's part and one wandb run for the study
    argv = [sys.executable, "-m", "experiments.sweep", *argv, "--set", "wandb.mode=disabled"]
    argv += ["--workers", "1", "--trials-only", "--no-progress"]
    workers = []
    try:
        for i, device in enumerate(worker_devices(n)):
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [ROOT, env.get("PYTHONPATH")])
            )  # `-m experiments.sweep` from any cwd
            if device is not None:
                env["CUDA_VISIBLE_DEVICES"] = device
            workers.append(subprocess.Popen(argv, env=env))
            print(
                f"worker {i}: pid {workers[-1].pid}"
                + (f", CUDA_VISIBLE_DEVICES={device}" if device is not None else "")
            )
        codes = [w.wait() for w in workers]
    except BaseException:  # Ctrl-C or an error here: stop the workers this command started; finished trials stay stored
        for w in workers:
            if w.poll() is None:
                w.terminate()
        for w in workers:
            w.wait()
        raise
    failed = [(i, c) for i, c in enumerate(codes) if c != 0]
    if failed:
        raise RuntimeError(
            f"worker(s) {', '.join(f'{i} (exit status {c})' for i, c in failed)} failed; the finished trials are "
            f"kept in the storage: rerun the same command to resume the study"
        )
    return finish_sweep(cfg, progress=progress)


if __name__ == "__main__":
    main()
