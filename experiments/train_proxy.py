"""Train the proxy LVLM on the digits world and save it to v2drop/assets/proxy.

    python -m experiments.train_proxy [--config configs/proxy.yaml] [--set lvlm.steps=2000] [--fresh]

Resumes from the last Lightning checkpoint of the current stage unless ``--fresh``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import yaml

from v2drop.proxy import TrainConfig, train


def apply_overrides(data: dict, items: list[str]) -> dict:
    """``key.sub=value`` overrides (values parsed as YAML) applied to nested config data."""
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set takes key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return data


def main(argv=None) -> None:
    """Parse, train, print where the model went."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/proxy.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints in the work directory")
    args = p.parse_args(argv)
    cfg = TrainConfig.from_dict(apply_overrides(yaml.safe_load(Path(args.config).read_text()) or {}, args.set))
    if args.fresh:
        shutil.rmtree(cfg.workdir, ignore_errors=True)
    start = time.time()
    out = train(cfg, resume=not args.fresh)
    print(f"saved the proxy to {out} after {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
