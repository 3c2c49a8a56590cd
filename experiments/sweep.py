"""Search drop layers and keep fractions with Optuna; write and log the accuracy–cost Pareto front.

    python -m experiments.sweep [--config configs/sweep/default.yaml] [--set key=value ...]
                                [--storage URL] [--study-name NAME] [--trials N] [--workers N]

Run the same command with the same ``--study-name`` and ``--storage`` on any number of machines
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

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from v2drop.cli import run
from v2drop.config import config_from_dict, parse_overrides, read_yaml
from v2drop.search import SweepConfig, format_front, run_sweep

ROOT = str(Path(__file__).resolve().parents[1])


def main(argv=None) -> dict:
    """Parse, validate, run the sweep, print the front; bad input: ``error: ...``, exit status 2."""
    return run(_main, argv)


def _main(argv) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/sweep/default.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config value")
    p.add_argument("--storage", default=None, help="Optuna storage URL or journal file path")
    p.add_argument("--study-name", default=None)
    p.add_argument("--trials", type=int, default=None, help="trials this worker (each of --workers) runs")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes on this machine, worker i on GPU i (CUDA_VISIBLE_DEVICES)",
    )
    p.add_argument(
        "--trials-only",
        action="store_true",
        help="run this worker's trials and stop: no artifacts, no confirmation (how --workers starts its workers)",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    flags = {
        k: v
        for k, v in (("storage", args.storage), ("study", args.study_name), ("trials", args.trials))
        if v is not None
    }
    cfg = config_from_dict(SweepConfig, read_yaml(args.config, what="sweep config"), parse_overrides(args.set), flags)
    if args.workers < 1 or (args.workers > 1 and args.trials_only):
        raise ValueError(
            f"--workers must be a whole number >= 1 (and not given with --trials-only), got {args.workers}"
        )
    start = time.time()
    if args.trials_only:
        result = run_sweep(cfg, progress=not args.no_progress, finish=False)
        print(f"worker {os.getpid()} done ({(time.time() - start) / 60:.1f} min)")
        return result
    if args.workers > 1:
        result = run_workers(cfg, args, progress=not args.no_progress)
    else:
        result = run_sweep(cfg, progress=not args.no_progress)
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


def run_workers(cfg: SweepConfig, args, progress: bool = True) -> dict:
    """Check everything, start ``args.workers`` processes of this command with ``--trials-only`` (same config and
    storage, one GPU each), wait for all, then write the artifacts and confirm the front once."""
    from v2drop.search import finish_sweep
    from v2drop.search.checks import check_sweep_run

    check_sweep_run(cfg)  # a mistake is reported once, before any worker starts or the study exists
    argv = [sys.executable, "-m", "experiments.sweep", "--config", args.config, "--trials-only", "--no-progress"]
    for item in args.set:
        argv += ["--set", item]
    for flag, value in (("--storage", args.storage), ("--study-name", args.study_name), ("--trials", args.trials)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--set", "wandb.mode=disabled"]  # one wandb run for the study, written by finish_sweep
    workers = []
    try:
        for i, device in enumerate(worker_devices(args.workers)):
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
