"""Drop stages: serve the scorer's declarations, score, apply its selection and rebuild the sequence.

The engine never names a scorer: for each stage it asks ``method.scorer.at(layer)`` for the
scorer running there and reads its ``needs_prev_hidden``, ``needs_prev_keys``, ``attention_request()``,
``attention_queries()`` and ``vision_request()``; it calls the method's scorer's ``score`` and
``select`` and applies the returned ``Selection``. The stage at layer -1 (pre-LLM) runs on the
layer-0 input before any decoder layer.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from v2drop.attention import attention_probabilities, attention_rows, layer_keys
from v2drop.cost import synchronize
from v2drop.engine.sequence import Sequence
from v2drop.method import Method
from v2drop.models.base import Adapter
from v2drop.scorers import LayerState, Merge, Selection, VisionFeatures


@dataclass
class StageContext:
    """What every drop stage of one ``generate`` call shares.

    Attributes
    ----------
    method, adapter : the method being run and the model's adapter
    stage_at : dict
        Stage layer -> stage index in the schedule.
    sample_keys : LongTensor (B,)
        Per-sample seeds (``sample_keys``).
    n_vision : list of int
        Vision tokens of each sample's prompt (the schedule's counts refer to them).
    traces : list of SampleTrace
        Filled with each stage's kept (and added) tokens.
    requests : dict
        Stage layer -> the attention request of the scorer running there (or None).
    queries : dict
        Stage layer -> per sample, the prompt indices of the attention query tokens (chosen once
        at layer 0), for the stages with an attention request.
    vision : dict or None
        The vision tower's outputs on the layer-0 (padded) prompt positions, when a stage's scorer
        has a ``vision_request()`` (``Adapter.vision_tower_state``).
    pad : LongTensor (B,)
        Left padding of each sample in the layer-0 sequence (prompt index + pad = layer-0 position).
    inputs : dict or None
        The batch's model inputs, for a scorer that ``needs_reencode`` (``Adapter.reencode``).
    scoring_seconds, drop_seconds : float
        Time spent so far in ``score`` and ``select``, and in whole drop stages.
    """

    method: Method
    adapter: Adapter
    stage_at: dict
    sample_keys: torch.Tensor
    n_vision: list
    traces: list
    requests: dict | None = None
    queries: dict | None = None
    vision: dict | None = None
    pad: torch.Tensor | None = None
    inputs: dict | None = None
    scoring_seconds: float = 0.0
    drop_seconds: float = 0.0

    @classmethod
    def start(
        cls,
        method: Method,
        adapter: Adapter,
        seq: Sequence,
        sample_keys: torch.Tensor,
        traces: list,
        inputs: dict | None = None,
        vision_cache=None,
    ) -> StageContext:
        """The context of a batch whose layer-0 sequence is ``seq``: asks each stage's scorer for its queries
        and the vision tower for what the scorers request, once (from ``vision_cache`` when given)."""
        requests, queries, vision_request, asked = {}, {}, None, {}
        for stage in method.schedule.stages:
            scorer = method.scorer.at(stage.layer)
            request = requests[stage.layer] = scorer.attention_request()
            if request is not None:
                if id(scorer) not in asked:  # one query choice per scorer, shared by its stages
                    positions = scorer.attention_queries(seq.hidden, seq.vision, seq.attention_mask)
                    asked[id(scorer)] = [seq.orig_idx[b, q] for b, q in enumerate(positions)]
                queries[stage.layer] = asked[id(scorer)]
            wanted = scorer.vision_request()
            if wanted is not None:
                vision_request = wanted.union(vision_request)
        vision = None
        if vision_request is not None and bool(seq.vision.any()):
            if inputs is None:
                raise ValueError(
                    "A scorer with a vision_request() needs the model inputs (pixel values) in StageContext.start"
                )
            try:
                vision = (
                    vision_cache.tower_state(adapter, inputs, vision_request)
                    if vision_cache is not None
                    else adapter.vision_tower_state(inputs, vision_request)
                )
            except ValueError as err:
                raise ValueError(
                    f"Scorer {method.scorer_name!r} reads the vision tower ([CLS] attention): {err}"
                ) from None
            # the received attention, keyed by the layer as the request names it
            vision["received"] = dict(zip(vision_request.received_layers, vision.get("received") or []))
        return cls(
            method=method,
            adapter=adapter,
            stage_at={s.layer: i for i, s in enumerate(method.schedule.stages)},
            sample_keys=sample_keys,
            n_vision=seq.vision.sum(1).tolist(),
            traces=traces,
            requests=requests,
            queries=queries,
            vision=vision,
            pad=(seq.attention_mask == 0).sum(1),
            inputs=inputs,
        )

    def needs_prev_hidden(self, layer_idx: int) -> bool:
        """Whether a stage before ``layer_idx`` needs the input of the layer before it."""
        if layer_idx not in self.stage_at:
            return False
        request = self.requests.get(layer_idx)
        scorer = self.method.scorer.at(layer_idx)
        if scorer.needs_prev_keys and self.adapter.layer_type(layer_idx - 1) == "sliding_attention":
            return True  # a local layer's cache may hold only its last keys: they are recomputed from its input
        return scorer.needs_prev_hidden or (request is not None and request.layer_offset < 0)

    def vision_features(
        self, seq: Sequence, vision_idx: torch.Tensor, vision_valid: torch.Tensor
    ) -> VisionFeatures | None:
        """The vision tower's outputs for the current vision tokens (None when no scorer asked)."""
        if self.vision is None:
            return None
        # Each token's layer-0 position is its prompt index plus its sample's left padding.
        orig = seq.orig_idx.gather(1, vision_idx)
        pos = (orig + self.pad[:, None]).masked_fill(~vision_valid, 0)
        cls_attention = self.vision["cls_attention"].gather(1, pos).masked_fill(~vision_valid, 0.0)
        keys = self.vision["keys"]
        if keys is not None:
            keys = keys.gather(1, pos[..., None].expand(-1, -1, keys.shape[-1]))
        crops = self.vision.get("crops")
        if crops is not None:
            crops = crops.gather(1, pos).masked_fill(~vision_valid, -1)
        features = self.vision.get("features")
        if features is not None:
            features = features.gather(1, pos[..., None].expand(-1, -1, features.shape[-1]))
        received = None
        if self.vision.get("received"):
            received = {
                layer: r.gather(1, pos).masked_fill(~vision_valid, 0.0) for layer, r in self.vision["received"].items()
            }
        return VisionFeatures(
            cls_attention=cls_attention,
            keys=keys,
            cls_embeds=self.vision["cls_embeds"],
            crops=crops,
            features=features,
            received=received,
            project=self.adapter.project_vision,
        )


def drop(seq: Sequence, layer_idx: int, prev_hidden: torch.Tensor | None, ctx: StageContext, cache=None) -> Sequence:
    """Run the drop stage before ``layer_idx`` and return the rebuilt sequence (timings go to ``ctx``).

    ``cache`` is the prefill's KV cache, read when the stage's scorer ``needs_prev_keys``.
    """
    device = seq.hidden.device
    synchronize(device)
    stage_start = time.perf_counter()
    scorer, schedule = ctx.method.scorer, ctx.method.schedule
    stage_scorer = scorer.at(layer_idx)
    vision_idx, vision_valid = seq.vision_index()
    attention = query_valid = None
    if ctx.requests.get(layer_idx) is not None:
        attention, query_valid = _attention(seq, layer_idx, prev_hidden, ctx)
    state = LayerState(
        layer_idx=layer_idx,
        hidden=seq.hidden,
        prev_hidden=prev_hidden,
        prev_keys=_cached_keys(cache, layer_idx - 1, seq, prev_hidden, ctx.adapter)
        if stage_scorer.needs_prev_keys
        else None,
        final_norm=ctx.adapter.norm,
        vision_idx=vision_idx,
        vision_valid=vision_valid,
        vision_coords=seq.coords.gather(1, vision_idx[..., None].expand(-1, -1, 3)),
        orig_idx=seq.orig_idx,
        attention_mask=seq.attention_mask,
        sample_keys=ctx.sample_keys,
        layer=ctx.adapter.layers[layer_idx] if layer_idx >= 0 else None,
        attention=attention,
        query_valid=query_valid,
        vision=ctx.vision_features(seq, vision_idx, vision_valid)
        if stage_scorer.vision_request() is not None
        else None,
        reencode=functools.partial(ctx.adapter.reencode, ctx.inputs) if stage_scorer.needs_reencode else None,
    )
    synchronize(device)
    start = time.perf_counter()
    scores = scorer.score(state)
    if scores.shape != vision_idx.shape:
        raise RuntimeError(
            f"{type(scorer).__name__}.score returned shape {tuple(scores.shape)}, expected {tuple(vision_idx.shape)}"
        )
    scores = scores.float().nan_to_num(nan=float("-inf"))
    stage_idx = ctx.stage_at[layer_idx]
    n_valid = vision_valid.sum(1).tolist()
    counts = [schedule.kept_count(stage_idx, n, n0) for n, n0 in zip(n_valid, ctx.n_vision)]
    selection = scorer.select(state, scores, counts)
    synchronize(device)
    ctx.scoring_seconds += time.perf_counter() - start  # the scorer's work: its scores and its selection
    B = seq.hidden.shape[0]
    if (
        len(selection.keep) != B
        or len(selection.added_hidden or [None] * B) != B
        or len(selection.added_source or [None] * B) != B
    ):
        raise RuntimeError(
            f"{type(scorer).__name__}.select must return one entry per sample ({B}) in every Selection field"
        )
    new = apply_selection(seq, selection, vision_idx, layer_idx, ctx.traces)
    if ctx.method.position_policy == "renumber":
        new = new.renumbered()
    synchronize(device)
    ctx.drop_seconds += time.perf_counter() - stage_start
    return new


def apply_selection(
    seq: Sequence, selection: Selection, vision_idx: torch.Tensor, layer_idx: int, traces: list
) -> Sequence:
    """The sequence after a stage's ``selection``: text and kept vision tokens, added and merged tokens in place.

    Added tokens go right after each sample's last kept vision token, each right after its source's place
    (``Selection.added_at_source``), or each at its ``Selection.added_place``. A ``Merge``'s tokens (the weighted
    sums of their groups, in float32, cast to the sequence's dtype) go at their anchors' places or after the added ones
    (``Merge.place``), with their anchors' or their members' mean positions (``Merge.position``). Each sample's
    trace gets the stage's kept prompt positions, ``"merged"`` (the prompt position each new token takes) and, for
    a ``Merge``, ``"members"`` (the prompt positions merged into each merged token).
    """
    if selection.added_at_source and selection.added_place is not None:
        raise ValueError(
            "A Selection places added tokens at their sources (added_at_source) or at added_place, not both; set one"
        )
    B, L, D = seq.hidden.shape
    device = seq.hidden.device
    merge = selection if isinstance(selection, Merge) else None
    keep_mask = seq.attention_mask.bool() & ~seq.vision  # text tokens always stay
    added_hidden = selection.added_hidden or [seq.hidden.new_zeros(0, D)] * B
    added_source = selection.added_source or [torch.zeros(0, dtype=torch.long, device=device)] * B
    pos3 = seq.position_ids if seq.position_ids.dim() == 3 else seq.position_ids[None]
    new_hidden, new_source, new_key, new_pos = [], [], [], []
    for b in range(B):
        kept_vision = vision_idx[b, selection.keep[b]]  # ascending
        keep_mask[b, kept_vision] = True
        # a new token's order key: 2·p + 1 sits right after sequence position p (old tokens have 2·p)
        after_kept = 2 * (int(kept_vision.max()) if len(kept_vision) else int(vision_idx[b, 0]) - 1) + 1
        trace = {"layer": layer_idx, "kept": seq.orig_idx[b, kept_vision].tolist()}
        hidden, source = [added_hidden[b].float()], [vision_idx[b, added_source[b]]]
        if selection.added_at_source:  # each added token right after its source's place
            key = [2 * source[0] + 1]
        elif selection.added_place is not None:  # before a vision token's place, after the last one, or after_kept
            place = selection.added_place[b].to(device)
            n_vision = int(seq.vision[b].sum())
            if len(place) != len(source[0]) or bool(((place < -1) | (place > n_vision)).any()):
                raise ValueError(
                    f"Selection.added_place sample {b}: expected one place per added token ({len(source[0])}), each "
                    f"-1 .. {n_vision} (the sample's vision-token count), got {place.tolist()}"
                )
            before = 2 * vision_idx[b, place.clamp(0, max(0, n_vision - 1))] - 1
            last = 2 * (int(vision_idx[b, n_vision - 1]) if n_vision else 0) + 1
            key = [torch.where(place == -1, after_kept, torch.where(place == n_vision, last, before))]
        else:
            key = [torch.full((len(source[0]),), after_kept, dtype=torch.long, device=device)]
        positions = [pos3[:, b, source[0]]]
        if merge is not None and len(merge.anchors[b]):
            members, groups = vision_idx[b, merge.members[b]], merge.groups[b]
            G = len(merge.anchors[b])
            if bool(keep_mask[b, members].any()) or len((members * G + groups).unique()) != len(members):
                raise RuntimeError(
                    f"Merge sample {b}: a merged token is also kept or twice in one group (members "
                    f"{merge.members[b].tolist()}, groups {groups.tolist()}); a vision token is kept, merged (at most "
                    "once a group) or dropped"
                )
            hidden.append(merge.combine(b, seq.hidden[b, members]))
            anchors = vision_idx[b, merge.anchors[b]]
            source.append(anchors)
            key.append(2 * anchors + 1 if merge.place == "anchor" else torch.full_like(anchors, after_kept))
            if merge.position == "mean":
                sums = torch.zeros(pos3.shape[0], G, dtype=torch.float64, device=device)
                sums.index_add_(1, groups, pos3[:, b, members].double())
                mean = sums / torch.bincount(groups, minlength=G).double()
                positions.append(torch.floor(mean + 0.5).to(pos3.dtype))
            else:
                positions.append(pos3[:, b, anchors])
            trace["members"] = [seq.orig_idx[b, members[groups == g]].tolist() for g in range(G)]
        source_b = torch.cat(source)
        if len(source_b):
            trace["merged"] = seq.orig_idx[b, source_b].tolist()
            trace = {k: trace[k] for k in ("layer", "kept", "merged", "members") if k in trace}
        traces[b].stages.append(trace)
        new_hidden.append(torch.cat(hidden))
        new_source.append(source_b)
        new_key.append(torch.cat(key))
        new_pos.append(torch.cat(positions, dim=1))
    keep = [row.nonzero().flatten() for row in keep_mask]
    width = max(len(s) for s in new_source)
    if width:
        hidden = seq.hidden.new_zeros(B, width, D)
        source = torch.zeros(B, width, dtype=torch.long, device=device)
        valid = torch.zeros(B, width, dtype=torch.bool, device=device)
        positions = torch.ones(pos3.shape[0], B, width, dtype=pos3.dtype, device=device)
        for b in range(B):
            n = len(new_source[b])
            hidden[b, :n], source[b, :n], valid[b, :n] = new_hidden[b].to(hidden.dtype), new_source[b], True
            positions[:, b, :n] = new_pos[b]
            # old tokens by 2·position, new ones by their keys; a stable sort keeps new tokens of one key in order
            order = torch.sort(torch.cat([2 * keep[b], new_key[b]]), stable=True).indices
            keep[b] = torch.cat([keep[b], torch.arange(L, L + n, device=device)])[order]
        seq = seq.extended(hidden, source, valid, positions if seq.position_ids.dim() == 3 else positions[0])
    return seq.select(keep)


def _cached_keys(cache, layer_idx: int, seq: Sequence, prev_hidden=None, adapter=None) -> torch.Tensor:
    """(B, L, H_kv * head_dim) the post-RoPE keys layer ``layer_idx`` cached for the current tokens.

    Layer ``layer_idx`` ran on exactly the current tokens, so its cache is them, unless it is a sliding-window
    layer that kept only its last ``sliding_window - 1``: then they are recomputed from its input ``prev_hidden``
    with its own projections (``layer_keys``), as the layer computed them.
    """
    keys = cache.layers[layer_idx].keys if cache is not None and layer_idx >= 0 else None
    L = seq.hidden.shape[1]
    if (keys is None or keys.shape[-2] != L) and prev_hidden is not None and adapter is not None and layer_idx >= 0:
        rope = adapter.layer_rope(adapter.rope(prev_hidden, seq.position_ids), layer_idx)
        keys = layer_keys(adapter.layers[layer_idx], prev_hidden, rope)
    if keys is None or keys.shape[-2] != L:
        have = "nothing" if keys is None else f"{keys.shape[-2]} tokens"
        raise ValueError(
            f"The keys of layer {layer_idx} are not in the KV cache for the {L} current tokens (it holds {have}); "
            "a scorer with needs_prev_keys needs a full-attention layer before its stage"
        )
    return keys.transpose(1, 2).flatten(2)


def _attention(seq: Sequence, layer_idx: int, prev_hidden: torch.Tensor | None, ctx: StageContext):
    """The requested head-averaged attention rows: (B, Q, L) float32 and their (B, Q) validity."""
    B, L = seq.hidden.shape[:2]
    device = seq.hidden.device
    queries = ctx.queries[layer_idx]
    width = max(1, max(len(q) for q in queries))
    query_idx = torch.full((B, width), L - 1, device=device)
    query_valid = torch.zeros(B, width, dtype=torch.bool, device=device)
    for b, q in enumerate(queries):  # find each query token's current position from its prompt index
        if len(q):
            match = seq.orig_idx[b][None] == q[:, None]  # (Q, L)
            query_idx[b, : len(q)] = match.float().argmax(-1)
            query_valid[b, : len(q)] = match.any(-1)
    request = ctx.requests[layer_idx]
    hidden = seq.hidden if request.layer_offset == 0 else prev_hidden
    source = layer_idx + request.layer_offset
    layer = ctx.adapter.layers[source]
    rope = ctx.adapter.layer_rope(ctx.adapter.rope(hidden, seq.position_ids), source)
    if not request.full_map:
        allowed = ctx.adapter.attention_allowed(source, seq, query_idx)
        return attention_rows(layer, hidden, rope, seq.attention_mask, query_idx, allowed), query_valid
    # The whole (B, H, L, L) map, as an eager attention layer materialises it; then the rows.
    every = torch.arange(L, device=device).expand(B, L)
    full = attention_probabilities(
        layer, hidden, rope, seq.attention_mask, allowed=ctx.adapter.attention_allowed(source, seq, every)
    )
    rows = full.gather(2, query_idx[:, None, :, None].expand(-1, full.shape[1], -1, L)).mean(1)
    return rows, query_valid
