"""Train the proxy LVLM on the digits world and save it to v2drop/assets/proxy.

    python -m experiments.train_proxy [--config configs/proxy.yaml] [--set lvlm.steps=2000] [--fresh]

Resumes from the last Lightning checkpoint of the current stage unless ``--fresh``. The recipe is
``experiments.proxy.train.TrainConfig``; ``--set key.sub=value`` overrides any key of it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from experiments.proxy.train import TrainConfig, train
from v2drop.config import load_config


def main(argv=None) -> None:
    """Parse, train, print where the model went; a bad config is a one-line error and exit status 2."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/proxy.yaml", help="the recipe (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints in the work directory")
    args = p.parse_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, args.set)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.fresh:
        shutil.rmtree(cfg.workdir, ignore_errors=True)
    start = time.time()
    out = train(cfg, resume=not args.fresh)
    print(f"saved the proxy to {out} after {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
