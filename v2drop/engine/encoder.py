"""Vision-encoder stages: the vision tower run layer by layer, dropping patch tokens at ``vision:<l>`` stages.

Each tower image is pruned on its own: at a stage before encoder layer ``l`` the scorer sees that
image's ``hidden_states[l]`` ([CLS] first, then the patches still present, in their original
order) and what its ``encoder_request()`` asks for; the patches it drops are gone for the
remaining encoder layers. The tower runs up to its feature-selection layer (later layers cannot
change what the projector receives); the projector sees the kept patches only, and their features
fill those patches' placeholders in the prompt, whose other placeholders leave the sequence before
the decoder (positions as the method's ``position_policy`` says). Images run batched while they
hold the same number of tokens, one by one once their counts differ.
"""

from __future__ import annotations

import torch

from v2drop.method import Method
from v2drop.models.base import Adapter
from v2drop.schedule import VISION
from v2drop.scorers import EncoderFeatures, LayerState, Merge


def run_encoder_stages(adapter: Adapter, inputs: dict, method: Method, sample_keys: torch.Tensor, traces: list):
    """The embeddings of a batch with its vision tokens pruned inside the tower.

    Returns ``(embeds (B, L, D), keep (B, L) bool: the prompt positions that stay)``. Fills each
    trace's ``stages`` (one entry per encoder stage: the kept prompt indices of the sample's patch
    placeholders) and ``encoder_tokens_per_layer`` (the sample's tower tokens, [CLS] included, in
    each encoder layer that ran).
    """
    parts = adapter.tower_parts(inputs)
    schedule = method.schedule.fit_tower(parts.selection)
    n_images, tokens, _ = parts.embeddings.shape
    patches = tokens - 1
    targets = schedule.counts(patches)
    stages = {s.layer - VISION: i for i, s in enumerate(schedule.stages) if s.vision}
    points = {}  # encoder layer -> index of the stage it runs for (the next one, between stages)
    for layer_idx, stage_idx in sorted(stages.items(), reverse=True):
        every = method.scorer.at(schedule.stages[stage_idx].layer).encoder_request().every_layer
        start = max((l for l in stages if l < layer_idx), default=0) + 1 if every else layer_idx
        points.update({l: stage_idx for l in range(start, layer_idx + 1)})
    recorded_at = _recorded_layers(method, schedule, parts.selection)
    recorded: list[dict] = [{} for _ in range(n_images)]  # per image: requested layer -> (P,) [CLS] attention
    device = parts.embeddings.device
    hidden = list(parts.embeddings.split(1))  # per image (1, T_i, C)
    orig = [torch.arange(tokens, device=device) for _ in range(n_images)]  # tower positions, 0 = [CLS]
    prev_input: list | None = None
    prev_scores: list = [None] * n_images
    mask2d = inputs["attention_mask"]
    pad = (mask2d == 0).sum(1).tolist()
    encoder_tokens = [[0] * parts.selection for _ in traces]
    for layer_idx in range(parts.selection + 1):
        if layer_idx in points:
            stage_idx = points[layer_idx]
            stage = schedule.stages[stage_idx]
            scorer = method.scorer.at(stage.layer)
            request = scorer.encoder_request()
            kept_by_sample: dict[int, list] = {}
            for i in range(n_images):
                encoder = EncoderFeatures(
                    layer_idx,
                    parts.selection,
                    stage.layer - VISION,
                    *_previous_layer(parts, request, layer_idx, prev_input, i),
                    prev_scores[i],
                    {l: cls[orig[i][1:] - 1][None] for l, cls in recorded[i].items()},
                )
                state = _state(parts, scorer, layer_idx, hidden, prev_input, i, orig[i], sample_keys, encoder)
                scores = method.scorer.score(state)
                n = hidden[i].shape[1] - 1
                if tuple(scores.shape) != (1, n):
                    raise RuntimeError(
                        f"{type(scorer).__name__}.score returned shape {tuple(scores.shape)}, expected (1, {n})"
                    )
                scores = scores.float().nan_to_num(nan=float("-inf"))
                every = request.every_layer  # counts are the stage's target, whatever was dropped before
                count = min(n, targets[stage_idx]) if every else schedule.kept_count(stage_idx, n, patches)
                selection = method.scorer.select(state, scores, [count])
                keep = selection.keep[0].to(device)
                slots = orig[i][1:] - 1  # each present patch's patch index
                b = parts.sample[i]
                record = kept_by_sample.setdefault(b, {"kept": [], "merged": [], "members": []})
                record["kept"].append(parts.placeholders[i, slots[keep]] - pad[b])
                present, tokens_i = keep, hidden[i][0, 1 + keep]
                if isinstance(selection, Merge) and len(selection.anchors[0]):
                    anchors, members = _merge_slots(selection, keep, n)
                    merged = selection.combine(0, hidden[i][0, 1 + members]).to(hidden[i].dtype)
                    present = torch.cat([keep, anchors])
                    tokens_i = torch.cat([tokens_i, merged])
                    record["merged"].append(parts.placeholders[i, slots[anchors]] - pad[b])
                    groups = selection.groups[0].to(device)
                    member_slots = parts.placeholders[i, slots[members]] - pad[b]
                    record["members"] += [member_slots[groups == g].tolist() for g in range(len(anchors))]
                order = present.argsort()  # patch order: a merged token takes its anchor's place
                present, tokens_i = present[order], tokens_i[order]
                hidden[i] = torch.cat([hidden[i][:, :1], tokens_i[None]], dim=1)  # [CLS] stays
                orig[i] = torch.cat([orig[i][:1], orig[i][1 + present]])
                prev_scores[i] = scores[:, present]
            for b, trace in enumerate(traces):
                record = kept_by_sample.get(b)
                if record is not None and layer_idx in stages:  # traces hold the schedule's stages
                    entry = {"layer": stage.layer, "kept": torch.cat(record["kept"]).tolist()}
                    if record["merged"]:
                        entry |= {"merged": torch.cat(record["merged"]).tolist(), "members": record["members"]}
                    trace.stages.append(entry)
        if layer_idx == parts.selection:
            break
        for i in range(n_images):
            encoder_tokens[parts.sample[i]][layer_idx] += hidden[i].shape[1]
        for i in range(n_images):  # [CLS] attention the scorers asked to keep, on every original patch
            for requested in recorded_at.get(layer_idx + 1, ()):
                cls = parts.attention(parts.layers[layer_idx], hidden[i], False)[0][0, :, 0, 1:].mean(0).float()
                recorded[i][requested] = torch.full((patches,), float("nan"), device=device).index_put(
                    (orig[i][1:] - 1,), cls
                )
        prev_input = hidden
        hidden = _run_layer(parts.layers[layer_idx], hidden)
    # the projector on the kept patches of the selection layer, into their placeholders; the others go
    embeds = adapter.inner.get_input_embeddings()(inputs["input_ids"])
    keep = mask2d.bool() & ~adapter.vision_mask(inputs["input_ids"])
    features = parts.project(torch.cat([h[0, 1:] for h in hidden]))
    rows = torch.cat([torch.full((len(o) - 1,), s, device=device) for o, s in zip(orig, parts.sample)])
    cols = torch.cat([parts.placeholders[i, o[1:] - 1] for i, o in enumerate(orig)])
    embeds = embeds.index_put((rows, cols), features.to(embeds.device, embeds.dtype))
    keep[rows, cols] = True
    for trace, counts in zip(traces, encoder_tokens):
        trace.encoder_tokens_per_layer = counts
    return embeds, keep


def _recorded_layers(method: Method, schedule, selection: int) -> dict[int, list[int]]:
    """{tower layer l: the requested layers recorded there} for the encoder stages' ``cls_attention_layers``: each
    moved to the tower as the schedule's stages are (``Schedule.fit_tower``), at most the selection layer."""
    reference = method.schedule.tower_reference
    out: dict[int, list[int]] = {}
    for stage in schedule.vision_stages:
        for l in method.scorer.at(stage.layer).encoder_request().cls_attention_layers:
            at = l if reference in (None, selection) else max(1, round(l * selection / reference))
            at = min(at, selection)
            if l not in out.setdefault(at, []):
                out[at].append(l)
    return out


def _merge_slots(merge: Merge, keep: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors, members) of a ``Merge`` at an encoder stage, as indices of the image's n present patches.

    A merged token takes its anchor's patch slot (its placeholder in the prompt), so there each anchor must be
    neither kept nor another group's anchor; ``Merge.position`` and ``place`` change nothing inside the tower.
    """
    device = keep.device
    anchors, members = merge.anchors[0].to(device), merge.members[0].to(device)
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    taken[keep] = True
    if bool(taken[members].any()) or bool(taken[anchors].any()) or len(anchors.unique()) != len(anchors):
        raise ValueError(
            f"A Merge at a vision-encoder stage puts each merged token in its anchor's patch slot, so its members and "
            f"anchors must not be kept and anchors must differ; got keep {keep.tolist()}, members {members.tolist()}, "
            f"anchors {anchors.tolist()}: anchor each group on one of its own merged members"
        )
    return anchors, members


def _run_layer(layer, hidden: list) -> list:
    """One encoder layer on every image: batched when they hold the same number of tokens, else one by one."""
    if len({h.shape[1] for h in hidden}) == 1:
        return list(layer(torch.cat(hidden), None).split(1))
    return [layer(h, None) for h in hidden]


def _state(parts, scorer, layer_idx, hidden_all, prev_input, i, orig, sample_keys, encoder) -> LayerState:
    """The ``LayerState`` of tower image ``i`` at the stage before encoder layer ``layer_idx``."""
    hidden = hidden_all[i]
    device = hidden.device
    n = hidden.shape[1] - 1
    patch = orig[1:] - 1
    cols = parts.grid[1]
    coords = torch.stack([torch.zeros_like(patch), patch // cols, patch % cols], -1)[None]
    b = parts.sample[i]
    return LayerState(
        layer_idx=VISION + layer_idx,
        hidden=hidden,
        vision_idx=torch.arange(1, n + 1, device=device)[None],
        vision_valid=torch.ones(1, n, dtype=torch.bool, device=device),
        vision_coords=coords,
        orig_idx=orig[None],
        attention_mask=torch.ones(1, n + 1, dtype=torch.long, device=device),
        layer=parts.layers[layer_idx] if layer_idx < len(parts.layers) else None,
        sample_keys=sample_keys[b : b + 1],
        prev_hidden=prev_input[i] if scorer.needs_prev_hidden and prev_input is not None else None,
        encoder=encoder,
    )


def _previous_layer(parts, request, layer_idx: int, prev_input, i: int) -> tuple:
    """(attention, values) of encoder layer ``layer_idx - 1`` on image ``i``'s present tokens, as requested."""
    if layer_idx == 0 or not (request.attention or request.values):
        return None, None
    probs, values = parts.attention(parts.layers[layer_idx - 1], prev_input[i], request.values)
    return (probs if request.attention else None), values
