"""Search drop layers and keep fractions with Optuna; write and log the accuracy–cost Pareto front.

    python -m experiments.sweep [--config configs/sweep/default.yaml] [--set key=value ...]
                                [--storage URL] [--study-name NAME] [--trials N]

Run the same command with the same ``--study-name`` and ``--storage`` on any number of machines
to share one study; re-running a finished or interrupted command resumes it. Artifacts go to
``runs/<study>/``: trials.csv, pareto.csv, pareto_confirmed.csv, pareto.png, config.json, and the
wandb run (offline by default: ``wandb sync runs/<study>/wandb/offline-run-*``). Every input is
checked before the model loads and the study is created: a mistake is one ``error: ...`` line and
exit status 2 (``--debug`` or ``V2DROP_DEBUG=1``: traceback).
"""

from __future__ import annotations

import argparse
import time

from v2drop.cli import run
from v2drop.config import config_from_dict, parse_overrides, read_yaml
from v2drop.search import SweepConfig, format_front, run_sweep


def main(argv=None) -> dict:
    """Parse, validate, run the sweep, print the front; bad input: ``error: ...``, exit status 2."""
    return run(_main, argv)


def _main(argv) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/sweep/default.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config value")
    p.add_argument("--storage", default=None, help="Optuna storage URL or journal file path")
    p.add_argument("--study-name", default=None)
    p.add_argument("--trials", type=int, default=None, help="trials this worker runs")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    flags = {k: v for k, v in (("storage", args.storage), ("study", args.study_name), ("trials", args.trials)) if v is not None}
    cfg = config_from_dict(SweepConfig, read_yaml(args.config, what="sweep config"), parse_overrides(args.set), flags)
    start = time.time()
    result = run_sweep(cfg, progress=not args.no_progress)
    print(f"\nPareto front of {cfg.study} ({len(result['rows'])} complete trials, {(time.time() - start) / 60:.1f} min):")
    print(format_front(result["front"], result["confirmed"]))
    print(f"\nartifacts in {result['run_dir']}")
    return result


if __name__ == "__main__":
    main()
