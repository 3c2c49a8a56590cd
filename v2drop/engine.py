"""The pruning engine: one prefill loop over the decoder layers, then KV-cached greedy decoding.

Read ``generate`` top to bottom: embed, then for every decoder layer drop vision tokens if a
stage starts there, run the layer; norm and head give the first token; then each new token runs
through every layer, each attending to its own (possibly shorter) KV cache. Conventions
(layer indexing, positions, keep counts) are those of ``shared/spec/METHODS.md``.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from v2drop.attention import attention_rows
from v2drop.measure import PeakMemory
from v2drop.method import Method
from v2drop.models.base import Adapter
from v2drop.scorers import LayerState


@dataclass
class SampleTrace:
    """What the method did to one sample.

    Attributes
    ----------
    stages : list of dict
        Per stage ``{"layer": l, "kept": [...]}``: the kept vision tokens as positions in the
        sample's unpadded prompt ids.
    vision_tokens_per_layer : list of int
        Vision tokens present in each decoder layer.
    """

    stages: list[dict] = field(default_factory=list)
    vision_tokens_per_layer: list[int] = field(default_factory=list)

    @property
    def average_vision_tokens(self) -> float:
        """Average vision tokens over the decoder layers."""
        v = self.vision_tokens_per_layer
        return sum(v) / len(v) if v else 0.0


@dataclass
class EngineOutput:
    """Result of ``generate`` for a batch.

    Attributes
    ----------
    prompt_ids : list of list of int
        Each sample's prompt ids exactly as fed to the model (padding removed).
    generated_ids : list of list of int
        Greedy tokens per sample, up to and including EOS.
    traces : list of SampleTrace
    first_logits : Tensor (B, vocab)
        Logits of the first generated token (float32).
    prefill_seconds, generate_seconds : float
        Time from the first decoder layer to the first token's logits, and to the last token.
    scoring_seconds : float
        Part of the prefill spent in ``scorer.score`` (all stages).
    drop_seconds : float
        Part of the prefill spent in drop stages: scoring, selection and rebuilding the sequence.
    peak_memory_bytes : int or None
        Peak memory growth of the language-model part (prefill and decoding), when measured.
    """

    prompt_ids: list[list[int]]
    generated_ids: list[list[int]]
    traces: list[SampleTrace]
    first_logits: torch.Tensor
    prefill_seconds: float
    generate_seconds: float
    scoring_seconds: float = 0.0
    drop_seconds: float = 0.0
    peak_memory_bytes: int | None = None


@dataclass
class _Sequence:
    """The current prefill sequence (B = batch, L = current length, left-padded)."""

    hidden: torch.Tensor  # (B, L, D)
    position_ids: torch.Tensor  # (B, L), or (3, B, L) for M-RoPE
    attention_mask: torch.Tensor  # (B, L) 1 = real token
    orig_idx: torch.Tensor  # (B, L) position in the unpadded prompt, -1 for padding
    vision: torch.Tensor  # (B, L) bool
    coords: torch.Tensor  # (B, L, 3) grid coordinates of vision tokens

    def vision_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V) positions of vision tokens (ascending, padded with 0) and their validity mask."""
        counts = self.vision.sum(1)
        width = int(counts.max()) if counts.numel() else 0
        # A stable sort puts vision positions first, in order.
        order = torch.sort((~self.vision).to(torch.int8), dim=1, stable=True).indices[:, :width]
        valid = torch.arange(width, device=counts.device)[None] < counts[:, None]
        return order.masked_fill(~valid, 0), valid

    def select(self, keep: list[torch.Tensor]) -> "_Sequence":
        """Keep the given positions of each sample (ascending), left-padding to a common length."""
        length = max(int(k.numel()) for k in keep)
        B, device = len(keep), self.hidden.device
        idx = torch.zeros(B, length, dtype=torch.long, device=device)
        mask = torch.zeros(B, length, dtype=self.attention_mask.dtype, device=device)
        for b, k in enumerate(keep):
            if k.numel():
                idx[b, length - k.numel() :] = k
                mask[b, length - k.numel() :] = 1
        pad = mask == 0
        hidden = self.hidden.gather(1, idx[..., None].expand(-1, -1, self.hidden.shape[-1]))
        if self.position_ids.dim() == 3:
            pos = self.position_ids.gather(2, idx[None].expand(self.position_ids.shape[0], -1, -1))
            pos = pos.masked_fill(pad[None], 1)
        else:
            pos = self.position_ids.gather(1, idx).masked_fill(pad, 1)
        return _Sequence(
            hidden=hidden,
            position_ids=pos,
            attention_mask=mask,
            orig_idx=self.orig_idx.gather(1, idx).masked_fill(pad, -1),
            vision=self.vision.gather(1, idx) & ~pad,
            coords=self.coords.gather(1, idx[..., None].expand(-1, -1, 3)),
        )

    def extended(self, hidden: torch.Tensor, source: torch.Tensor, valid: torch.Tensor) -> "_Sequence":
        """Append M new vision tokens per sample (``hidden`` (B, M, D)) at the end of the sequence.

        Each takes the position ids, prompt index and grid coordinates of the token at ``source``
        (B, M); ``valid`` (B, M) marks real ones. ``select`` then puts them where they belong.
        """
        if self.position_ids.dim() == 3:
            pos = self.position_ids.gather(2, source[None].expand(self.position_ids.shape[0], -1, -1))
        else:
            pos = self.position_ids.gather(1, source)
        return _Sequence(
            hidden=torch.cat([self.hidden, hidden.to(self.hidden.dtype)], dim=1),
            position_ids=torch.cat([self.position_ids, pos], dim=-1),
            attention_mask=torch.cat([self.attention_mask, valid.to(self.attention_mask.dtype)], dim=1),
            orig_idx=torch.cat([self.orig_idx, self.orig_idx.gather(1, source).masked_fill(~valid, -1)], dim=1),
            vision=torch.cat([self.vision, valid], dim=1),
            coords=torch.cat([self.coords, self.coords.gather(1, source[..., None].expand(-1, -1, 3))], dim=1),
        )

    def renumbered(self) -> "_Sequence":
        """The same tokens with contiguous positions 0..n-1 per sample (official PDrop policy)."""
        mask = self.attention_mask.long()
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        if self.position_ids.dim() == 3:
            pos = pos[None].expand(self.position_ids.shape[0], -1, -1)
        return replace(self, position_ids=pos)

    def next_positions(self) -> torch.Tensor:
        """(B,) the position a first new token gets: one past the largest real position."""
        pos = self.position_ids if self.position_ids.dim() == 3 else self.position_ids[None]
        real = self.attention_mask.bool()[None].expand_as(pos)
        return pos.masked_fill(~real, -1).amax(dim=(0, 2)) + 1


@dataclass
class _Segment:
    """Consecutive decoder layers that saw the same tokens (between two drop stages)."""

    first_layer: int
    attention_mask: torch.Tensor  # (B, L_segment) padding mask of these layers' caches
    next_positions: torch.Tensor  # (B,) decode positions start here


def sample_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) a stable integer per sample from its unpadded prompt ids (for per-sample seeding)."""
    keys = []
    for ids, m in zip(input_ids.tolist(), attention_mask.tolist()):
        real = [i for i, keep in zip(ids, m) if keep]
        keys.append(zlib.crc32(repr(real).encode()))
    return torch.tensor(keys, dtype=torch.long)


@torch.no_grad()
def generate(
    adapter: Adapter,
    inputs: dict,
    method: Method | None = None,
    max_new_tokens: int = 16,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    measure_memory: bool = False,
) -> EngineOutput:
    """Prefill with the method's drop stages, then greedy decoding with per-layer KV caches.

    Parameters
    ----------
    adapter : Adapter
        The model family adapter (``v2drop.models.adapter_for(model)``).
    inputs : dict
        Processor outputs for a left-padded batch: ``input_ids`` (B, L), ``attention_mask``
        (B, L) and the family's vision inputs (``pixel_values``, ``image_grid_thw``, ...).
    method : Method, optional
        What to drop; None or ``Method.none()`` runs the unmodified model.
    max_new_tokens : int
        Greedy tokens to generate per sample (fewer when every sample has hit EOS).
    eos_token_id : int or list of int, optional
        Stop tokens; None never stops early.
    pad_token_id : int
        Token fed (and reported) after a sample has finished.
    measure_memory : bool
        Measure the peak memory of prefill and decoding (``v2drop.measure.PeakMemory``).
    """
    method = method or Method.none()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if method.drops:
        method.schedule.check_depth(adapter.depth)
    input_ids, mask2d = inputs["input_ids"], inputs["attention_mask"]
    B, L = input_ids.shape
    device = input_ids.device
    vision = adapter.vision_mask(input_ids) & mask2d.bool()
    n_vision = vision.sum(1).tolist()
    orig = (mask2d.long().cumsum(-1) - 1).masked_fill(mask2d == 0, -1)
    seq = _Sequence(
        hidden=adapter.embed(inputs),
        position_ids=adapter.position_ids(inputs),
        attention_mask=mask2d,
        orig_idx=orig,
        vision=vision,
        coords=adapter.vision_coords(inputs, vision) if method.drops else torch.zeros(B, L, 3, dtype=torch.long, device=device),
    )
    traces = [SampleTrace() for _ in range(B)]
    stage_at = {s.layer: i for i, s in enumerate(method.schedule.stages)} if method.drops else {}
    keys = sample_keys(input_ids, mask2d) if method.drops else None
    cache = DynamicCache(config=adapter.text_config)
    scorer = method.scorer if method.drops else None
    raters = None  # per sample, prompt indices of the query tokens a "raters" scorer chose at layer 0
    if scorer is not None and scorer.attention_query == "raters":
        raters = [seq.orig_idx[b, q] for b, q in enumerate(scorer.queries(seq.hidden, seq.vision, seq.attention_mask))]
    faithful = scorer is not None and getattr(scorer, "faithful", False)
    captured = None  # the full attention map of the layer before a faithful stage

    memory = PeakMemory(device) if measure_memory else None
    if memory is not None:
        memory.__enter__()
    clock = _Clock(device)
    segments: list[_Segment] = []
    scoring_seconds = drop_seconds = 0.0
    prev_hidden = None  # input of the previous layer, kept only when the next stage's scorer needs it
    for layer_idx, layer in enumerate(adapter.layers):
        dropped = layer_idx in stage_at and bool(seq.vision.any())
        if dropped:
            _sync(device)
            stage_start = time.perf_counter()
            seq, seconds = _drop(seq, stage_at[layer_idx], layer_idx, method, adapter, prev_hidden, keys, n_vision, traces,
                                 raters, captured)
            captured = None
            _sync(device)
            scoring_seconds += seconds
            drop_seconds += time.perf_counter() - stage_start
        if layer_idx == 0 or dropped:
            segments.append(_Segment(layer_idx, seq.attention_mask, seq.next_positions()))
            masks, rope = {}, adapter.rope(seq.hidden, seq.position_ids)
            vision_counts = seq.vision.sum(1).tolist()  # one device sync per segment, not per layer
        mask = _mask_for(adapter, layer_idx, seq.hidden, seq.attention_mask, cache, masks, segments[-1].first_layer)
        for trace, count in zip(traces, vision_counts):
            trace.vision_tokens_per_layer.append(count)
        prev_hidden = seq.hidden if _needs_prev(method, stage_at, layer_idx + 1) else None
        if faithful and layer_idx + 1 in stage_at and scorer.attention_layer_offset == -1:
            seq.hidden, captured = _run_eager(adapter, layer_idx, seq, rope, cache)
        else:
            seq.hidden = layer(seq.hidden, attention_mask=mask, position_embeddings=rope, past_key_values=cache, use_cache=True)
    logits = adapter.lm_head(adapter.norm(seq.hidden[:, -1:]))[:, -1].float()
    prefill_seconds = clock.elapsed()

    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    first_logits = logits
    generated = torch.empty(B, 0, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    embed_tokens = adapter.inner.get_input_embeddings()
    seg_of_layer = _segment_of_layers(segments, adapter.depth)
    for step in range(max_new_tokens):
        token = logits.argmax(-1).masked_fill(finished, pad_token_id)
        generated = torch.cat([generated, token[:, None]], dim=1)
        finished |= torch.tensor([t in eos for t in token.tolist()], device=device)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        hidden = embed_tokens(token[:, None])
        ones = torch.ones(B, step + 1, dtype=mask2d.dtype, device=device)
        seg_mask2d = [torch.cat([seg.attention_mask, ones], dim=1) for seg in segments]
        seg_rope = [adapter.rope(hidden, adapter.decode_position_ids(seg.next_positions + step)) for seg in segments]
        masks = {}
        for layer_idx, layer in enumerate(adapter.layers):
            s = seg_of_layer[layer_idx]
            mask = _mask_for(adapter, layer_idx, hidden, seg_mask2d[s], cache, masks, segments[s].first_layer)
            hidden = layer(hidden, attention_mask=mask, position_embeddings=seg_rope[s], past_key_values=cache, use_cache=True)
        logits = adapter.lm_head(adapter.norm(hidden))[:, -1].float()
    generate_seconds = clock.elapsed()
    if memory is not None:
        memory.__exit__(None, None, None)

    prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(input_ids, mask2d)]
    out_ids = []
    for row in generated.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out_ids.append(row[:cut])
    return EngineOutput(
        prompt_ids, out_ids, traces, first_logits, prefill_seconds, generate_seconds, scoring_seconds, drop_seconds,
        memory.peak_bytes if memory is not None else None,
    )


def _drop(seq, stage_idx, layer_idx, method, adapter, prev_hidden, keys, n_vision, traces, raters=None, captured=None) -> tuple[_Sequence, float]:
    """Score the present vision tokens, keep the schedule's count per sample, merge back what the
    scorer recycles (inserted right after the kept vision tokens), rebuild the sequence.

    Returns the new sequence and the seconds spent in ``scorer.score``.
    """
    scorer, schedule = method.scorer, method.schedule
    vision_idx, vision_valid = seq.vision_index()
    attention = query_valid = None
    if scorer.attention_query is not None:
        attention, query_valid = _attention_for(scorer, layer_idx, seq, prev_hidden, adapter, raters, captured)
    state = LayerState(
        layer_idx=layer_idx,
        hidden=seq.hidden,
        prev_hidden=prev_hidden,
        vision_idx=vision_idx,
        vision_valid=vision_valid,
        vision_coords=seq.coords.gather(1, vision_idx[..., None].expand(-1, -1, 3)),
        orig_idx=seq.orig_idx,
        attention_mask=seq.attention_mask,
        sample_keys=keys,
        layer=adapter.layers[layer_idx],
        attention=attention,
        query_valid=query_valid,
    )
    _sync(seq.hidden.device)
    start = time.perf_counter()
    scores = scorer.score(state)
    _sync(seq.hidden.device)
    seconds = time.perf_counter() - start
    if scores.shape != vision_idx.shape:
        raise RuntimeError(f"{type(scorer).__name__}.score returned shape {tuple(scores.shape)}, expected {tuple(vision_idx.shape)}")
    scores = scores.float().nan_to_num(nan=float("-inf"))
    keep_mask = seq.attention_mask.bool() & ~seq.vision  # text tokens always stay
    merged, sources, last_kept = [], [], []
    for b in range(seq.hidden.shape[0]):
        n = int(vision_valid[b].sum())
        k = scorer.count(state, b, n, schedule.kept_count(stage_idx, n, n_vision[b]))
        chosen = select_keep(scores[b, :n], k)
        kept_vision = vision_idx[b, chosen]  # ascending
        keep_mask[b, kept_vision] = True
        trace = {"layer": layer_idx, "kept": seq.orig_idx[b, kept_vision].tolist()}
        dropped = torch.ones(n, dtype=torch.bool, device=scores.device)
        dropped[chosen] = False
        dropped_idx = vision_idx[b, :n][dropped]
        new_hidden, centre = scorer.merge(seq.hidden[b, dropped_idx], scores[b, :n][dropped])
        if len(centre):
            trace["merged"] = seq.orig_idx[b, dropped_idx[centre]].tolist()
        merged.append(new_hidden)
        sources.append(dropped_idx[centre])
        last_kept.append(int(kept_vision.max()) if len(kept_vision) else int(vision_idx[b, 0]) - 1)
        traces[b].stages.append(trace)
    keep = [row.nonzero().flatten() for row in keep_mask]
    width = max(len(c) for c in sources)
    if width:  # recycled tokens go right after each sample's last kept vision token
        B, L, D = seq.hidden.shape
        hidden = seq.hidden.new_zeros(B, width, D)
        source = torch.zeros(B, width, dtype=torch.long, device=seq.hidden.device)
        valid = torch.zeros(B, width, dtype=torch.bool, device=seq.hidden.device)
        for b, (h, src) in enumerate(zip(merged, sources)):
            hidden[b, : len(src)], source[b, : len(src)], valid[b, : len(src)] = h, src, True
            inserted = torch.arange(L, L + len(src), device=seq.hidden.device)
            keep[b] = torch.cat([keep[b][keep[b] <= last_kept[b]], inserted, keep[b][keep[b] > last_kept[b]]])
        seq = seq.extended(hidden, source, valid)
    new = seq.select(keep)
    return (new.renumbered() if method.position_policy == "renumber" else new), seconds


def select_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, ascending; ties go to the lower index."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def _attention_for(scorer, layer_idx, seq, prev_hidden, adapter, raters=None, captured=None):
    """The head-averaged attention rows a scorer asked for: (B, Q, L) float32 and (B, Q) validity.

    Computed from the source layer's own projections, or read from ``captured`` (the full map a
    faithful stage's eager layer produced).
    """
    B, L = seq.hidden.shape[:2]
    device = seq.hidden.device
    if scorer.attention_query in ("last_prompt", "last_instruction"):
        query_idx = torch.full((B, 1), L - 1, device=device)
        query_valid = torch.ones_like(query_idx, dtype=torch.bool)
    elif scorer.attention_query == "raters":
        width = max(1, max(len(r) for r in raters))
        query_idx = torch.full((B, width), L - 1, device=device)
        query_valid = torch.zeros(B, width, dtype=torch.bool, device=device)
        for b, r in enumerate(raters):  # text tokens are never dropped: find each rater's current position
            if len(r):
                query_idx[b, : len(r)] = (seq.orig_idx[b][None] == r[:, None]).float().argmax(-1)
                query_valid[b, : len(r)] = True
    else:
        raise ValueError(f"Unknown attention_query {scorer.attention_query!r} of {type(scorer).__name__}")
    if captured is not None:
        heads = captured.shape[1]
        rows = captured.gather(2, query_idx[:, None, :, None].expand(-1, heads, -1, L)).float().mean(1)
        return rows, query_valid
    hidden = seq.hidden if scorer.attention_layer_offset == 0 else prev_hidden
    cos, sin = adapter.rope(hidden, seq.position_ids)
    rows = attention_rows(adapter.layers[layer_idx + scorer.attention_layer_offset], hidden, (cos, sin), seq.attention_mask, query_idx)
    return rows, query_valid


def _run_eager(adapter, layer_idx, seq, rope, cache):
    """Run one prefill layer with eager attention and return its output and full attention map.

    This is the faithful mode of FastV and SparseVLM: the original implementations ask the layer
    for its (B, H, L, L) attention probabilities, and that map's memory is part of their cost.
    The implementation switch is undone right after the call; a forward hook reads the weights.
    """
    layer = adapter.layers[layer_idx]
    configs = {id(c): c for c in (adapter.text_config, layer.self_attn.config)}.values()
    previous = [c._attn_implementation for c in configs]
    weights = []
    handle = layer.self_attn.register_forward_hook(lambda module, args, out: weights.append(out[1]))
    try:
        for c in configs:
            c._attn_implementation = "eager"
        mask = _mask_for(adapter, layer_idx, seq.hidden, seq.attention_mask, cache, {}, layer_idx)
        hidden = layer(seq.hidden, attention_mask=mask, position_embeddings=rope, past_key_values=cache, use_cache=True)
    finally:
        handle.remove()
        for c, impl in zip(configs, previous):
            c._attn_implementation = impl
    return hidden, weights[0]


def _needs_prev(method: Method, stage_at: dict, layer_idx: int) -> bool:
    """Whether a stage at ``layer_idx`` needs the input of the layer before it."""
    if layer_idx not in stage_at:
        return False
    return method.scorer.needs_prev_hidden or method.scorer.attention_layer_offset < 0


def _mask_for(adapter, layer_idx, hidden, mask2d, cache, memo, first_layer):
    """The 4-D mask for ``layer_idx``, sized from that layer's own cache; one per segment and layer type."""
    types = getattr(adapter.text_config, "layer_types", None)
    kind = types[layer_idx] if types else "full_attention"
    if (first_layer, kind) not in memo:
        make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        memo[first_layer, kind] = make(
            config=adapter.text_config,
            inputs_embeds=hidden,
            attention_mask=mask2d,
            past_key_values=cache,
            position_ids=None,
            layer_idx=first_layer,
        )
    return memo[first_layer, kind]


def _segment_of_layers(segments: list[_Segment], depth: int) -> list[int]:
    """Index of the segment each decoder layer belongs to."""
    firsts = [s.first_layer for s in segments]
    return [max(i for i, f in enumerate(firsts) if f <= layer_idx) for layer_idx in range(depth)]


class _Clock:
    """Seconds since creation: CUDA events on a GPU (timed on the device), ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds from creation to now (waits for queued GPU work)."""
        if not self.cuda:
            return time.perf_counter() - self.start
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self.start.elapsed_time(end) / 1e3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
