"""The command-line bridge (``v2drop.cli.parse_config``): every entry point's options come from one config dataclass.

Every command module under experiments/ and analysis/ (found by its ``__main__`` block, not listed
here) declares ``CONFIG``, takes ``--config`` and ``--set``, and its ``--help`` lists every key
of ``CONFIG`` (nested ones as ``section.key``) with a non-empty one-line doc.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from v2drop.cli import config_keys, parse_config, run

ROOT = Path(__file__).resolve().parents[1]


def _entry_points() -> list[str]:
    """Modules of experiments/ and analysis/ that run as ``python -m``."""
    return sorted(
        f"{path.parent.name}.{path.stem}"
        for folder in ("experiments", "analysis")
        for path in (ROOT / folder).glob("*.py")
        if 'if __name__ == "__main__":' in path.read_text()
    )


def test_the_entry_points_are_found():
    found = _entry_points()
    assert {"experiments.evaluate", "experiments.sweep", "experiments.report", "analysis.method_table"} <= set(found)
    assert len(found) >= 16


def _words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("module", _entry_points())
def test_help_lists_every_key_with_its_doc(module, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    command = importlib.import_module(module)
    schema = getattr(command, "CONFIG", None)
    assert dataclasses.is_dataclass(schema), f"{module} declares no CONFIG dataclass"
    with pytest.raises(SystemExit) as exit_:
        command.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    flat = _words(text)
    assert "--config" in text and "--set KEY=VALUE" in text
    keys = config_keys(schema)
    assert keys
    sections = {key.rpartition(".")[0] for key in keys if "." in key}
    for key, doc in keys.items():
        assert doc.strip(), f"{module}: config key {key!r} has no doc"
        shown = f"{key}:" if key in sections else key if "." in key else "--" + key.replace("_", "-")
        assert shown in text, f"{module}: {shown} missing from --help"
        assert _words(doc) in flat, f"{module}: the doc of {key!r} ({doc!r}) missing from --help"


@dataclass
class Inner:
    """A section."""

    depth: int = 1  # how deep
    names: list[str] = field(default_factory=lambda: ["a"])  # some names


@dataclass
class Example:
    """A command's options."""

    alpha: int = 0  # set by the file
    beta: int = 0  # set by the file, then by --set
    gamma: int = 0  # set by the file, then --set, then the flag
    max_new_tokens: int = 8  # a multi-word key
    label: str | None = None  # text kept as written
    verbose: bool = True  # a boolean
    items: list[int] = field(default_factory=lambda: [1, 2])  # a list
    extra: dict = field(default_factory=dict)  # a mapping
    inner: Inner = field(default_factory=Inner)  # a section

    def __post_init__(self):
        if self.alpha < 0:
            raise ValueError(f"--alpha must be >= 0, got {self.alpha}")


def test_config_then_set_then_flags(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text("alpha: 1\nbeta: 1\ngamma: 1\ninner: {depth: 5}\n")
    cfg = parse_config(Example, ["--config", str(path), "--set", "beta=2", "--set", "gamma=2", "--gamma", "3"])
    assert (cfg.alpha, cfg.beta, cfg.gamma, cfg.inner.depth) == (1, 2, 3, 5)
    # the order on the command line does not matter: a flag wins over --set, --set over the file
    cfg = parse_config(Example, ["--gamma", "3", "--set", "gamma=2", "--set", "beta=2", "--config", str(path)])
    assert (cfg.alpha, cfg.beta, cfg.gamma) == (1, 2, 3)
    assert parse_config(Example, []) == Example()


def test_a_real_command_layers_the_same_way(tmp_path):
    from experiments.sweep import SweepCommand

    path = tmp_path / "sweep.yaml"
    path.write_text("study: from-file\ntrials: 5\nseed: 1\neval: {limit: 7}\n")
    cfg = parse_config(SweepCommand, ["--config", str(path), "--set", "trials=6", "--set", "seed=2", "--seed", "3"])
    assert (cfg.study, cfg.trials, cfg.seed, cfg.eval.limit) == ("from-file", 6, 3, 7)
    assert cfg.sweep().__class__.__name__ == "SweepConfig" and cfg.sweep().seed == 3


def test_flag_kinds():
    cfg = parse_config(
        Example,
        [
            "--max-new-tokens", "4",
            "--label", "a: b",
            "--no-verbose",
            "--items", "3", "4", "--items", "5",
            "--extra", "circular=true", "--extra", "num_frames=16",
            "--set", "inner.names=[x, y]",
        ],
    )  # fmt: skip
    assert cfg.max_new_tokens == 4 and cfg.label == "a: b" and cfg.verbose is False
    assert cfg.items == [3, 4, 5] and cfg.extra == {"circular": True, "num_frames": 16}
    assert cfg.inner.names == ["x", "y"]
    assert parse_config(Example, ["--verbose"]).verbose is True


def test_processor_args_flag_asks_for_pan_and_scan():
    """``--processor-args`` (or ``--set processor_args.KEY=VALUE``) fills ``EvalConfig.processor_args``."""
    from v2drop.evaluation import EvalConfig

    flags = ["--processor-args", "do_pan_and_scan=true", "--processor-args", "pan_and_scan_min_crop_size=256"]
    assert parse_config(EvalConfig, flags).processor_args == {
        "do_pan_and_scan": True,
        "pan_and_scan_min_crop_size": 256,
    }
    assert parse_config(EvalConfig, ["--set", "processor_args.do_pan_and_scan=true"]).processor_args == {
        "do_pan_and_scan": True
    }
    assert parse_config(EvalConfig, []).processor_args == {}


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--alpha", "-1"], ["--alpha must be >= 0, got -1"]),
        (["--set", "inner.dpeth=2"], ["dpeth", "valid keys", "depth"]),
        (["--bogus", "1"], ["unrecognized arguments: --bogus 1"]),
        (["--max-new-tokes", "1"], ["unrecognized arguments: --max-new-tokes 1", "did you mean --max-new-tokens?"]),
        (["--alpha", "many"], ["alpha", "many"]),
        (["--set", "alpha"], ["expected key=value"]),
        (["--config", "missing.yaml"], ["missing.yaml", "does not exist"]),
    ],
)
def test_bad_input_is_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(lambda a: parse_config(Example, a), argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    for word in words:
        assert word in err, err


def test_help_of_a_section_key_shows_its_default(capsys):
    with pytest.raises(SystemExit):
        parse_config(Example, ["--help"], "An example command.")
    text = capsys.readouterr().out
    assert "An example command." in text
    assert "inner.depth  how deep (default: 1)" in text
    assert "--no-verbose" in text and "--max-new-tokens N" in text


def test_positional_field(tmp_path):
    from experiments.report import ReportConfig

    assert parse_config(ReportConfig, ["some/runs"], positional="runs").runs == "some/runs"
    assert parse_config(ReportConfig, ["--runs", "x"], positional="runs").runs == "x"
    assert parse_config(ReportConfig, [], positional="runs").runs == "runs/store"
