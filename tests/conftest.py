"""Session fixtures: tiny models of every family, built once per (family, attention implementation)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from tests.tiny import build, image  # noqa: E402

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


def prompt_for(lvlm, question: str, n_images: int = 1) -> str:
    """A prompt with ``n_images`` placeholders in the family's format (Qwen wraps them in vision start/end)."""
    token = lvlm.image_token
    if token == "<|image_pad|>":
        token = "<|vision_start|>" + token + "<|vision_end|>"
    return "USER: " + token * n_images + "\n" + question + " ASSISTANT:"


def batch_for(lvlm, n: int, family: str):
    """``n`` prompts of different lengths with one image each (different sizes for Qwen)."""
    questions = ["what is the digit ?", "how many ?", "what is the colour of the digit in row 2 column 3 ?"]
    sizes = [32, 48, 40] if family.startswith("qwen") else [32, 32, 32]
    prompts = [prompt_for(lvlm, questions[i % 3]) for i in range(n)]
    images = [image(i, sizes[i % 3]) for i in range(n)]
    return prompts, images
