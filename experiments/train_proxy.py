"""Train the proxy LVLM on the digits world and save it to v2drop/assets/proxy.

    python -m experiments.train_proxy [--config configs/proxy.yaml] [--set lvlm.steps=2000] [--fresh]
    python -m experiments.train_proxy --init proxy-layer0-frozen --start settle   # the last stage, from a saved model

Resumes from the last Lightning checkpoint of the current stage unless ``--fresh``. The recipe is
``experiments.proxy.train.TrainConfig``; ``--set key.sub=value`` overrides any key of it.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, fields

from experiments.proxy.train import STAGES, TrainConfig, train
from v2drop import checks
from v2drop.cli import parse_config, run


def main(argv=None) -> None:
    """Parse, train, print where the model went; a bad config is a one-line error and exit status 2."""
    return run(_main, argv)


def check_recipe(cfg: TrainConfig) -> None:
    """The recipe's counts in range and its output and work directories writable (before any training)."""
    checks.check_int("threads", cfg.threads, 1)
    checks.check_int("checkpoint_every", cfg.checkpoint_every, 1)
    checks.check_int("monitor_every", cfg.monitor_every, 0)
    checks.check_int("monitor_samples", cfg.monitor_samples, 1)
    checks.check_int("frozen_decoder_layers", cfg.frozen_decoder_layers, 0)
    for name in STAGES:
        stage = getattr(cfg, name)
        checks.check_int(f"{name}.steps", stage.steps, 0)
        checks.check_int(f"{name}.batch", stage.batch, 1)
        if not stage.lr > 0:
            raise ValueError(f"{name}.lr must be a positive learning rate, got {stage.lr!r}")
    checks.check_writable(cfg.output, directory=True)
    checks.check_writable(cfg.workdir, directory=True)


@dataclass
class TrainCommand(TrainConfig):
    """The command's options: the recipe (``TrainConfig``) and where training starts."""

    fresh: bool = False  # ignore checkpoints in the work directory
    start: str | None = None  # begin at this stage (align, lvlm, robust, settle, video) from `init`'s weights
    init: str | None = None  # with `start`: the saved proxy (bundled name or directory) the earlier stages produced

    def __post_init__(self):
        super().__post_init__()
        if self.start is not None and self.start not in STAGES:
            raise ValueError(f"--start {self.start!r} is not a stage; choose one of {', '.join(STAGES)}")
        if (self.start is None) != (self.init is None):
            raise ValueError(
                "--start and --init go together: --init names the saved model that this recipe's stages before "
                "--start produced"
            )

    def recipe(self) -> TrainConfig:
        """The ``TrainConfig`` part."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})


CONFIG = TrainCommand


def _main(argv) -> None:
    args = parse_config(TrainCommand, argv, __doc__, config="configs/proxy.yaml")
    cfg = args.recipe()
    check_recipe(cfg)
    if args.fresh:
        shutil.rmtree(cfg.workdir, ignore_errors=True)
    start = time.time()
    try:
        out = train(cfg, resume=not args.fresh, init=args.init, start=args.start)
    except KeyboardInterrupt as err:
        err.add_note(f"checkpoints are kept under {cfg.workdir}; rerun the same command (without --fresh) to resume")
        raise
    print(f"saved the proxy to {out} after {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
