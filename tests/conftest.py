"""Session fixtures: tiny models of every family (built once per family and attention implementation),
and registries restored after every test."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from v2drop.testing import batch_for, build, image, prompt_for  # noqa: E402,F401  (re-exported for the test modules)

_MODELS: dict = {}


@pytest.fixture(scope="session")
def tiny():
    """``tiny(family, attn="sdpa")`` -> a cached tiny LVLM."""

    def get(family: str, attn: str = "sdpa"):
        key = (family, attn)
        if key not in _MODELS:
            _MODELS[key] = build(family, attn)
        return _MODELS[key]

    return get


def _registries() -> list:
    """Every registry a test may add to, fully populated (so a restore never loses a lazily added item)."""
    from v2drop.benchmarks import BENCHMARKS, list_benchmarks
    from v2drop.scorers import SCORERS

    list_benchmarks()
    return [SCORERS, BENCHMARKS]


@pytest.fixture(autouse=True)
def run_store(tmp_path, monkeypatch):
    """Every test files its evaluations in its own run store (``$V2DROP_STORE``), never in the checkout's runs/."""
    monkeypatch.setenv("V2DROP_STORE", str(tmp_path / "store"))
    return tmp_path / "store"


@pytest.fixture(autouse=True)
def restore_registries():
    """Undo whatever a test registers (scorers, benchmarks), so no test depends on another's registrations."""
    registries = _registries()
    saved = [r.snapshot() for r in registries]
    yield
    for registry, snapshot in zip(registries, saved):
        registry.restore(snapshot)
