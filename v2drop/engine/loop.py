"""The pruning engine: one prefill loop over the decoder layers, then KV-cached greedy decoding.

Read ``generate`` top to bottom: embed, then for every decoder layer drop vision tokens if a
stage starts there, run the layer, add the family's own per-layer additions (Qwen3-VL's DeepStack) at
the vision tokens still present; norm and head give the first token; then each new token runs
through every layer, each attending to its own (possibly shorter) KV cache. The adapter builds each
layer's mask (causal; Gemma 3: image blocks both ways, sliding windows on prompt positions) and RoPE. Conventions (layer
indexing, positions, keep counts) are those of ``docs/methods.md``.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from v2drop.cost import PeakMemory, Timer
from v2drop.engine.encoder import run_encoder_stages
from v2drop.engine.sequence import Segment, Sequence, mask_for, segment_of_layers
from v2drop.engine.stages import StageContext, drop
from v2drop.method import Method
from v2drop.models.base import Adapter
from v2drop.schedule import PRE_LLM


@dataclass
class SampleTrace:
    """What the method did to one sample.

    Attributes
    ----------
    stages : list of dict
        Per stage ``{"layer": l, "kept": [...]}``: the kept vision tokens as positions in the
        sample's unpadded prompt ids (``l`` = -1 for the pre-LLM stage); ``"merged"`` lists, for
        each token a stage added (merged or recycled), the prompt position whose place it takes;
        ``"members"``, for each token of a ``Merge``, the prompt positions merged into it.
    vision_tokens_per_layer : list of int
        Vision tokens present in each decoder layer.
    vision_tokens : int
        Vision tokens in the prompt (before any stage, also one before layer 0).
    encoder_tokens_per_layer : list of int
        With vision-encoder stages: the sample's tower tokens ([CLS] included, all its images) in each
        encoder layer that ran; empty otherwise (the tower ran whole, outside the engine's loop).
    """

    stages: list[dict] = field(default_factory=list)
    vision_tokens_per_layer: list[int] = field(default_factory=list)
    vision_tokens: int = 0
    encoder_tokens_per_layer: list[int] = field(default_factory=list)

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
        Part of the prefill spent in ``scorer.score`` and ``scorer.select`` (all decoder and pre-LLM stages;
        vision-encoder stages run, and are timed, in ``vision_seconds``).
    vision_seconds : float
        Time of the embedding step before the first decoder layer: the vision encoder and projector
        (served by the vision cache when one is attached; with vision-encoder stages, run layer by
        layer with them) and the text embeddings.
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
    vision_seconds: float = 0.0


def sample_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) a stable integer per sample from its unpadded prompt ids (for per-sample seeding)."""
    keys = []
    for ids, m in zip(input_ids.tolist(), attention_mask.tolist()):
        real = [i for i, keep in zip(ids, m) if keep]
        keys.append(zlib.crc32(repr(real).encode()))
    return torch.tensor(keys, dtype=torch.long)


def _add_at_vision(seq: Sequence, addition: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """``seq.hidden`` plus ``addition`` (B, L0, D, on the layer-0 positions) at its vision tokens; others unchanged.

    A token's layer-0 position is its prompt index plus its sample's left padding in ``prompt_mask``.
    """
    pad = (prompt_mask == 0).sum(1, keepdim=True)
    pos = (seq.orig_idx + pad).clamp(min=0)
    extra = addition.gather(1, pos[..., None].expand(-1, -1, addition.shape[-1])).to(seq.hidden.dtype)
    return torch.where(seq.vision[..., None], seq.hidden + extra, seq.hidden)


@torch.no_grad()
def generate(
    adapter: Adapter,
    inputs: dict,
    method: Method | None = None,
    max_new_tokens: int = 16,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    measure_memory: bool = False,
    vision_cache=None,
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
        Measure the peak memory of prefill and decoding (``v2drop.cost.PeakMemory``).
    vision_cache : VisionCache, optional
        Serves the embeddings and the vision tower's outputs for inputs it has seen
        (``v2drop.vision_cache``); the results are the same as without it.
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
    traces = [SampleTrace(vision_tokens=n) for n in vision.sum(1).tolist()]
    keys = sample_keys(input_ids, mask2d)
    in_encoder = method.drops and bool(method.schedule.vision_stages) and bool(vision.any())
    with Timer(device) as vision_clock:  # the vision tower and projector run inside the adapter's embed
        if in_encoder:  # the tower layer by layer with the vision-encoder stages
            hidden, kept = run_encoder_stages(adapter, inputs, method, keys, traces)
        else:
            hidden = vision_cache.embed(adapter, inputs) if vision_cache is not None else adapter.embed(inputs)
    seq = Sequence(
        hidden=hidden,
        position_ids=adapter.position_ids(inputs),
        attention_mask=mask2d,
        orig_idx=(mask2d.long().cumsum(-1) - 1).masked_fill(mask2d == 0, -1),
        vision=vision,
        coords=adapter.vision_coords(inputs, vision)
        if method.drops
        else torch.zeros(B, L, 3, dtype=torch.long, device=device),
        block=adapter.attention_blocks(inputs),
    )
    if in_encoder:  # the patches dropped inside the tower leave the sequence before the decoder
        seq = seq.select([row.nonzero().flatten() for row in kept])
        seq = seq.renumbered() if method.position_policy == "renumber" else seq
    stages = StageContext.start(method, adapter, seq, keys, traces, inputs, vision_cache) if method.drops else None
    if in_encoder:  # the schedule's counts refer to the prompt's vision tokens
        stages.n_vision = vision.sum(1).tolist()
    cache = DynamicCache(config=adapter.text_config)
    additions = adapter.layer_additions(inputs) if bool(vision.any()) else {}

    with PeakMemory(device) if measure_memory else contextlib.nullcontext() as memory:
        clock = Timer(device)
        segments: list[Segment] = []  # runs of layers that saw the same tokens
        prev_hidden = None  # input of the previous layer, kept only when the next stage needs it
        if stages is not None and PRE_LLM in stages.stage_at and bool(seq.vision.any()):
            seq = drop(seq, PRE_LLM, None, stages)  # the pre-LLM stage: on the projected features, before layer 0
        for layer_idx, layer in enumerate(adapter.layers):
            dropped = stages is not None and layer_idx in stages.stage_at and bool(seq.vision.any())
            if dropped:
                seq = drop(seq, layer_idx, prev_hidden, stages, cache)
            if layer_idx == 0 or dropped:
                segment = Segment(layer_idx, seq.attention_mask, seq.next_positions(), seq.orig_idx, seq.block)
                segments.append(segment)
                masks, rope = {}, adapter.rope(seq.hidden, seq.position_ids)
                vision_counts = seq.vision.sum(1).tolist()  # one device sync per segment, not per layer
            mask = mask_for(
                adapter,
                layer_idx,
                seq.hidden,
                seq.attention_mask,
                cache,
                masks,
                segment.first_layer,
                seq.orig_idx,
                seq.block,
            )
            for trace, count in zip(traces, vision_counts):
                trace.vision_tokens_per_layer.append(count)
            prev_hidden = seq.hidden if stages is not None and stages.needs_prev_hidden(layer_idx + 1) else None
            seq.hidden = layer(
                seq.hidden,
                attention_mask=mask,
                position_embeddings=adapter.layer_rope(rope, layer_idx),
                past_key_values=cache,
                use_cache=True,
            )
            if layer_idx in additions:  # the family's own additions (DeepStack), at the vision tokens still present
                seq.hidden = _add_at_vision(seq, additions[layer_idx], mask2d)
        logits = adapter.lm_head(adapter.norm(seq.hidden[:, -1:]))[:, -1].float()
        prefill_seconds = clock.elapsed()

        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        first_logits = logits
        generated = torch.empty(B, 0, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        embed_tokens = adapter.inner.get_input_embeddings()
        prompt_length = mask2d.sum(1)
        seg_of_layer = segment_of_layers(segments, adapter.depth)
        for step in range(max_new_tokens):
            token = logits.argmax(-1).masked_fill(finished, pad_token_id)
            generated = torch.cat([generated, token[:, None]], dim=1)
            finished |= torch.tensor([t in eos for t in token.tolist()], device=device)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            hidden = embed_tokens(token[:, None])
            ones = torch.ones(B, step + 1, dtype=mask2d.dtype, device=device)
            seg_mask2d = [torch.cat([seg.attention_mask, ones], dim=1) for seg in segments]
            seg_keys = [seg.keys(prompt_length, step + 1) for seg in segments]
            seg_rope = [
                adapter.rope(hidden, adapter.decode_position_ids(seg.next_positions + step)) for seg in segments
            ]
            masks = {}
            for layer_idx, layer in enumerate(adapter.layers):
                s = seg_of_layer[layer_idx]
                mask = mask_for(
                    adapter, layer_idx, hidden, seg_mask2d[s], cache, masks, segments[s].first_layer, *seg_keys[s]
                )
                hidden = layer(
                    hidden,
                    attention_mask=mask,
                    position_embeddings=adapter.layer_rope(seg_rope[s], layer_idx),
                    past_key_values=cache,
                    use_cache=True,
                )
            logits = adapter.lm_head(adapter.norm(hidden))[:, -1].float()
        generate_seconds = clock.elapsed()

    prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(input_ids, mask2d)]
    out_ids = []
    for row in generated.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out_ids.append(row[:cut])
    return EngineOutput(
        prompt_ids,
        out_ids,
        traces,
        first_logits,
        prefill_seconds,
        generate_seconds,
        stages.scoring_seconds if stages else 0.0,
        stages.drop_seconds if stages else 0.0,
        memory.peak_bytes if memory is not None else None,
        vision_clock.seconds,
    )
