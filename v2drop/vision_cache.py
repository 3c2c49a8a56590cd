"""``VisionCache``: what a sweep's trials would recompute identically, computed once per batch of samples.

Every trial of a sweep runs the same samples in the same batches; only the method changes. The
processor's outputs (``LVLM.prepare``), the input embeddings with the vision tower's projected
features scattered in (``Adapter.embed``) and the vision tower's own [CLS] attention/keys
(``Adapter.vision_tower_state``, read by pre-LLM scorers such as VisionZip) do not depend on the
method, so a cache attached to the model serves them from memory after the first trial. A method
with vision-encoder stages (``vision:<l>``) runs the tower itself, so it takes only the prepared
inputs from the cache.

Opt-in and bounded: nothing is cached unless a cache is attached (``with cache.attached(lvlm):``),
and the least recently used entries are dropped beyond ``max_bytes``. Prepared inputs are keyed by
content (the prompts, the processor options and a digest of every image's pixels); embeddings and tower outputs by the
identity of the input tensors, which ``prepare`` returns unchanged on a hit (each entry holds its
tensors, so an identity cannot be reused while the entry lives). Cached tensors are handed out as
copies, so nothing downstream can alter an entry. The engine times prefill from the first decoder
layer, after embedding, so the measured latencies are the same with or without a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch


class VisionCache:
    """A bounded LRU cache of prepared inputs, input embeddings and vision-tower outputs (see the module docstring).

    Parameters
    ----------
    max_bytes : int
        Tensor bytes kept at most; an entry larger than this is computed and not kept.
    """

    def __init__(self, max_bytes: int = 2 * 2**30):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Any, tuple[Any, tuple, int]] = OrderedDict()  # key -> (value, tensors held, bytes)

    def __len__(self) -> int:
        return len(self._entries)

    @contextlib.contextmanager
    def attached(self, lvlm):
        """Serve ``lvlm.prepare`` and its generation's embeddings from this cache inside the ``with`` block."""
        previous, lvlm.vision_cache = lvlm.vision_cache, self
        try:
            yield self
        finally:
            lvlm.vision_cache = previous

    # -- what the model asks for ---------------------------------------------------------------------
    def prepare(
        self,
        prompts: list[str],
        images: list[list],
        videos: list[list],
        compute: Callable[[], dict],
        options: dict | None = None,
    ) -> dict:
        """``compute()`` (the batch's processor outputs) once per prompts, pixels and processor ``options`` (e.g.
        pan-and-scan); the same tensors on every hit."""
        key = (
            "prepare",
            json.dumps(options or {}, sort_keys=True, default=str),
            tuple(prompts),
            tuple(tuple(map(_image_digest, x)) for x in images),
            tuple(tuple(map(_image_digest, x)) for x in videos),
        )
        inputs = self._get(key, None, compute, tensors=lambda v: tuple(v.values()))
        return dict(inputs)  # a new dict of the same tensors: callers may add keys without touching the entry

    def embed(self, adapter, inputs: dict) -> torch.Tensor:
        """``adapter.embed(inputs)``, once per input tensors."""
        held = _tensors(inputs)
        return self._get(
            ("embed", _identity(held)), held, lambda: adapter.embed(inputs), tensors=lambda v: (v,)
        ).clone()

    def tower_state(self, adapter, inputs: dict, request) -> dict:
        """``adapter.vision_tower_state(inputs, request)``, once per input tensors and request."""
        held = _tensors(inputs)
        state = self._get(
            ("tower", _identity(held), request),
            held,
            lambda: adapter.vision_tower_state(inputs, request),
            tensors=_state_tensors,
        )
        return {k: _copy(v) for k, v in state.items()}

    # -- the LRU --------------------------------------------------------------------------------------
    def _get(self, key, held: tuple | None, compute: Callable[[], Any], tensors: Callable[[Any], tuple]):
        entry = self._entries.get(key)
        if entry is not None and (held is None or all(a is b for a, b in zip(entry[1], held))):
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]
        self.misses += 1
        value = compute()
        size = sum(t.numel() * t.element_size() for t in tensors(value) if isinstance(t, torch.Tensor))
        if size <= self.max_bytes:
            if key in self._entries:
                self.bytes -= self._entries.pop(key)[2]
            self._entries[key] = (value, held or (), size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                self.bytes -= self._entries.popitem(last=False)[1][2]
        return value


def _image_digest(image) -> tuple:
    """(mode, size, digest of the pixels) of a PIL image; (shape, dtype, digest) of an array or tensor frame."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.mode, image.size, hashlib.blake2b(image.tobytes(), digest_size=16).digest()
    import numpy as np

    array = np.ascontiguousarray(image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image))
    return array.shape, str(array.dtype), hashlib.blake2b(array.tobytes(), digest_size=16).digest()


def _tensors(inputs: dict) -> tuple:
    """The input tensors in a fixed (name) order."""
    return tuple(inputs[k] for k in sorted(inputs) if isinstance(inputs[k], torch.Tensor))


def _identity(held: tuple) -> tuple:
    return tuple(id(t) for t in held)


def _state_tensors(state: dict) -> tuple:
    out = []
    for v in state.values():
        out.extend(v if isinstance(v, list) else [v])
    return tuple(out)


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
