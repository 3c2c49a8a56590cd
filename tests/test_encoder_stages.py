"""Vision-encoder stages (``vision:<l>``): the tower run layer by layer equals transformers' own tower, and dropping
patches equals transformers' CLIP encoder run with those patches removed from that layer on."""

from dataclasses import dataclass

import pytest
import torch
from transformers import CLIPVisionConfig

from v2drop import Method, Schedule
from v2drop.engine.encoder import run_encoder_stages
from v2drop.engine.loop import SampleTrace, sample_keys
from v2drop.schedule import VISION, Stage, stage_layer
from v2drop.scorers import EncoderRequest, LayerState, Scorer, register_scorer
from v2drop.testing import image, random_llava

TOWER_LAYERS = 4  # read at hidden_states[3] (vision_feature_layer -2): stages vision:0 .. vision:3


@pytest.fixture(scope="module")
def deep():
    """A tiny LLaVA whose CLIP tower has four layers (the shared tiny one has two), 64 patches per image."""
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=TOWER_LAYERS, num_attention_heads=2, image_size=32,
        patch_size=4, initializer_range=0.2,
    )  # fmt: skip
    return random_llava(hidden=64, layers=3, image_size=32, patch=4, vision=vision)


def batch(lvlm, n=2):
    prompts = [lvlm.format_prompt("w1 w2" + " w3" * i) for i in range(n)]
    return lvlm.prepare(prompts, [image(i, 32) for i in range(n)])


@dataclass
class FirstChannel(Scorer):
    """Keeps the patches whose hidden state has the largest first channel (a test scorer for encoder stages)."""

    def encoder_request(self):
        return EncoderRequest()

    def score(self, state: LayerState) -> torch.Tensor:
        return state.hidden[:, 1:, 0].float()


@pytest.fixture
def first_channel():
    """The test scorer, registered for one test (the conftest fixture removes it afterwards)."""
    register_scorer("test-first-channel")(FirstChannel)


def encoder_run(lvlm, inputs, method):
    traces = [SampleTrace() for _ in range(inputs["input_ids"].shape[0])]
    keys = sample_keys(inputs["input_ids"], inputs["attention_mask"])
    with torch.no_grad():
        embeds, keep = run_encoder_stages(lvlm.adapter, inputs, method, keys, traces)
    return embeds, keep, traces


def test_vision_stage_layers_parse_order_and_round_trip():
    s = Schedule.from_dict({"stages": [["vision:1", 0.5], ["pre_llm", 0.5], [2, 0.5]]})
    assert s.layers == (VISION + 1, -1, 2) and s.stages[0].vision and not s.stages[1].vision
    assert s.to_dict()["stages"][0] == ["vision:1", 0.5] and Schedule.from_dict(s.to_dict()) == s
    assert s.tokens_per_layer(4, 100) == [25, 25, 12, 12]  # encoder and pre-LLM stages before layer 0
    with pytest.raises(ValueError, match="strictly increase"):
        Schedule.from_dict({"stages": [["vision:2", 0.5], ["vision:1", 0.5]]})
    for bad in ("vision:x", "vision:-1", "vision:100", -5):
        with pytest.raises(ValueError, match="vision:<encoder layer>|vision-encoder stage layer"):
            stage_layer(bad)


def test_fit_tower_moves_stages_proportionally_and_merges():
    s = Schedule((Stage(VISION + 1, 576), Stage(VISION + 2, 128), Stage(VISION + 22, 64)), "absolute", 1, 23)
    fitted = s.fit_tower(2)
    assert [st.layer - VISION for st in fitted.stages] == [1, 2] and [st.keep for st in fitted.stages] == [128, 64]
    rel = Schedule((Stage(VISION + 1, 0.5), Stage(VISION + 2, 0.5)), "relative", 1, 4).fit_tower(2)
    assert rel.stages == (Stage(VISION + 1, 0.25),)  # merged relative keeps multiply
    assert s.fit_tower(23) is s
    with pytest.raises(ValueError, match="beyond the vision tower's feature-selection layer"):
        Schedule.from_dict({"stages": [["vision:5", 0.5]]}).fit_tower(3)


def test_encoder_stages_that_keep_everything_are_transformers_own_tower(deep):
    inputs = batch(deep)
    method = Method("flowcut", schedule=Schedule.progressive(["vision:1", "vision:2", "vision:3"], [1.0] * 3))
    embeds, keep, traces = encoder_run(deep, inputs, method)
    with torch.no_grad():
        reference = deep.adapter.embed(inputs)  # transformers' get_image_features: the whole tower
    assert torch.equal(embeds, reference)
    assert torch.equal(keep, inputs["attention_mask"].bool())
    assert all(len(t.stages) == 3 and t.encoder_tokens_per_layer == [65] * 3 for t in traces)


def test_dropping_in_the_encoder_is_the_tower_run_without_those_tokens(deep, first_channel):
    inputs = batch(deep)
    method = Method("test-first-channel", schedule=Schedule.progressive(["vision:1", "vision:2"], [0.5, 0.5]))
    embeds, keep, traces = encoder_run(deep, inputs, method)
    vision = deep.adapter.vision_mask(inputs["input_ids"]) & inputs["attention_mask"].bool()
    pad = (inputs["attention_mask"] == 0).sum(1)
    first = [int(row.nonzero()[0]) - int(p) for row, p in zip(vision, pad)]  # each prompt's first placeholder
    # kept patches per stage, as indices into the tokens present at that stage ([CLS] = 0)
    kept = [[torch.tensor(t.stages[j]["kept"]) - f for t, f in zip(traces, first)] for j in range(2)]
    assert [len(k) for k in kept[0]] == [32, 32] and [len(k) for k in kept[1]] == [16, 16]
    rows_1 = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), k + 1]) for k in kept[0]])
    rows_2 = torch.stack(
        [torch.cat([torch.zeros(1, dtype=torch.long), torch.searchsorted(a, b) + 1]) for a, b in zip(*kept)]
    )
    tower = deep.model.model.vision_tower
    layers = tower.vision_model.encoder.layers if hasattr(tower, "vision_model") else tower.encoder.layers

    def remove(rows):
        return lambda module, args: (args[0].gather(1, rows[..., None].expand(-1, -1, args[0].shape[-1])), *args[1:])

    handles = [layers[1].register_forward_pre_hook(remove(rows_1)), layers[2].register_forward_pre_hook(remove(rows_2))]
    try:
        with torch.no_grad():
            selected = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[3][:, 1:]
            reference = deep.model.model.multi_modal_projector(selected)
    finally:
        for h in handles:
            h.remove()
    expected_keep = inputs["attention_mask"].bool() & ~vision
    for b in range(2):
        positions = int(pad[b]) + first[b] + kept[1][b]
        expected_keep[b, positions] = True
        assert torch.equal(embeds[b, positions], reference[b])
    assert torch.equal(keep, expected_keep)
    assert all(t.encoder_tokens_per_layer == [65, 33, 17] for t in traces)


def test_the_engine_runs_encoder_stages_then_the_decoder_on_the_kept_tokens(deep, first_channel):
    inputs = batch(deep, 3)
    method = Method(
        "test-first-channel",
        schedule=Schedule.progressive(["vision:1", "vision:2"], [0.5, 0.5]),
        position_policy="renumber",
    )
    out = deep.generate_from_inputs(inputs, method, max_new_tokens=2, stop_at_eos=False)
    for i, trace in enumerate(out.traces):
        assert trace.vision_tokens == 64 and trace.vision_tokens_per_layer == [16] * deep.depth
        assert [s["layer"] for s in trace.stages] == [VISION + 1, VISION + 2]
        alone = deep.generate_from_inputs(
            deep.prepare([deep.format_prompt("w1 w2" + " w3" * i)], [image(i, 32)]), method, max_new_tokens=2,
            stop_at_eos=False,
        )  # fmt: skip
        assert alone.traces[0].stages == trace.stages and alone.generated_ids[0] == out.generated_ids[i]


def test_scorers_without_an_encoder_request_refuse_encoder_stages():
    with pytest.raises(ValueError, match="does not run inside the vision encoder"):
        Method("v2drop", schedule=Schedule.one_shot("vision:1", 0.5))


def test_records_count_the_encoder_flops_saved_and_time_the_encoder(deep, first_channel, tmp_path):
    import json

    from v2drop.cost import encoder_layer_flops
    from v2drop.evaluation import EvalConfig, evaluate, format_table
    from v2drop.testing import EchoBench

    method = Method("test-first-channel", schedule=Schedule.progressive(["vision:1", "vision:2"], [0.5, 0.5]))
    cfg = EvalConfig(model="deep", benchmark="echo", warmup=1, max_new_tokens=2, progress=False)
    result = evaluate(deep, EchoBench(2), method, cfg, records_path=tmp_path / "r.jsonl")
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    c, m = 32, 64  # the tower's hidden and MLP sizes
    by_hand = sum(4 * n * c * c + 2 * n * n * c + 2 * n * c * m for n in (65, 33, 17))
    assert by_hand == sum(encoder_layer_flops(n, c, m) for n in (65, 33, 17))
    for r in records:
        assert r["encoder_tokens_per_layer"] == [65, 33, 17] and r["encoder_flops"] == by_hand
        assert r["encoder_flops_no_drop"] == 4 * encoder_layer_flops(65, c, m)  # every tower layer, as transformers
        assert r["vision_seconds"] > 0 and r["vision_tokens_per_layer"] == [16] * deep.depth
    assert result.metrics["encoder_flops_ratio"] == pytest.approx(by_hand / (4 * encoder_layer_flops(65, c, m)))
    assert result.metrics["flops_ratio"] < 1
    assert "vision-encoder FLOPs" in format_table(result)


def test_each_image_of_a_sample_is_pruned_on_its_own(deep, first_channel):
    prompts = [deep.format_prompt("w1 w2", n_images=2), deep.format_prompt("w3")]
    images = [[image(0, 32), image(1, 32)], [image(2, 32)]]
    method = Method("test-first-channel", schedule=Schedule.one_shot("vision:2", 0.25))
    out = deep.generate(prompts, images, method=method, max_new_tokens=1)
    two, one = out.traces
    assert two.vision_tokens == 128 and two.vision_tokens_per_layer == [32] * deep.depth
    assert one.vision_tokens_per_layer == [16] * deep.depth and two.encoder_tokens_per_layer == [130, 130, 34]
    first = out.prompt_ids[0].index(deep.adapter.image_token_id)
    kept = two.stages[0]["kept"]  # 16 of each image's 64 placeholders, in prompt order
    assert kept == sorted(kept) and sum(first <= k < first + 64 for k in kept) == 16
    alone = [deep.generate([p], [i], method=method, max_new_tokens=1).traces[0].stages for p, i in zip(prompts, images)]
    assert alone == [two.stages, one.stages]
    second_alone = deep.generate([deep.format_prompt("w1 w2")], [[images[0][1]]], method=method, max_new_tokens=1)
    offset = first + 64 - second_alone.prompt_ids[0].index(deep.adapter.image_token_id)
    assert kept[16:] == [k + offset for k in second_alone.traces[0].stages[0]["kept"]]  # the same as that image alone


@dataclass
class HandMerge(Scorer):
    """Keeps patches 0 and 5, merges 1 and 2 into one token anchored on 2 (weights 1/4, 3/4) and 3 and 7 into one
    anchored on 7 (1/2 each), drops the rest (a test scorer for merges at encoder stages)."""

    anchors: tuple = (2, 7)

    def encoder_request(self):
        return EncoderRequest()

    def score(self, state: LayerState) -> torch.Tensor:
        return torch.zeros(1, state.hidden.shape[1] - 1)

    def select(self, state, scores, counts):
        from v2drop.scorers import Merge

        return Merge(
            keep=[torch.tensor([0, 5])],
            members=[torch.tensor([1, 2, 3, 7])],
            groups=[torch.tensor([0, 0, 1, 1])],
            weights=[torch.tensor([0.25, 0.75, 0.5, 0.5])],
            anchors=[torch.tensor(list(self.anchors))],
        )


@pytest.fixture
def hand_merge():
    register_scorer("test-hand-merge")(HandMerge)


def test_a_merge_at_an_encoder_stage_fills_its_anchor_slot_with_the_weighted_sum(deep, hand_merge):
    inputs = batch(deep)
    method = Method("test-hand-merge", schedule=Schedule.one_shot("vision:3", 0.5))  # the selection layer
    embeds, keep, traces = encoder_run(deep, inputs, method)
    with torch.no_grad():
        tower = deep.model.model.vision_tower
        h = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[3][:, 1:]  # (2, 64, 32)
        merged_1 = 0.25 * h[:, 1] + 0.75 * h[:, 2]  # by hand, into patch 2's slot
        merged_2 = 0.5 * h[:, 3] + 0.5 * h[:, 7]  # into patch 7's slot
        expected = deep.model.model.multi_modal_projector(torch.stack([h[:, 0], merged_1, h[:, 5], merged_2], 1))
    vision = deep.adapter.vision_mask(inputs["input_ids"]) & inputs["attention_mask"].bool()
    pad = (inputs["attention_mask"] == 0).sum(1)
    for b in range(2):
        first = int(vision[b].nonzero()[0])
        slots = first + torch.tensor([0, 2, 5, 7])
        torch.testing.assert_close(embeds[b, slots], expected[b], rtol=1e-5, atol=1e-5)
        assert keep[b].logical_and(vision[b]).nonzero().flatten().tolist() == slots.tolist()
        f = first - int(pad[b])  # prompt indices
        stage = traces[b].stages[0]
        assert stage["kept"] == [f, f + 5] and stage["merged"] == [f + 2, f + 7]
        assert stage["members"] == [[f + 1, f + 2], [f + 3, f + 7]]


def test_an_encoder_stage_merge_whose_anchor_is_kept_is_refused(deep, hand_merge):
    method = Method("test-hand-merge", schedule=Schedule.one_shot("vision:3", 0.5), anchors=(0, 7))
    with pytest.raises(ValueError, match="anchor's patch slot"):
        encoder_run(deep, batch(deep), method)


@dataclass
class RecordsCls(Scorer):
    """Keeps the patches with the highest [CLS] attention of the encoder layer producing hidden_states[2] (a test
    scorer for ``EncoderRequest.cls_attention_layers``)."""

    def encoder_request(self):
        return EncoderRequest(cls_attention_layers=(2,))

    def score(self, state: LayerState) -> torch.Tensor:
        return state.encoder.cls_attention[2]


def test_recorded_cls_attention_is_the_towers_own_for_the_patches_present(deep):
    register_scorer("test-records-cls")(RecordsCls)
    inputs = batch(deep)
    tower = deep.model.model.vision_tower
    with torch.no_grad():
        tower.set_attn_implementation("eager")
        try:
            attention = tower(inputs["pixel_values"], output_attentions=True).attentions[1]  # layer 1: hidden_states[2]
        finally:
            tower.set_attn_implementation(deep.model.config._attn_implementation)
    reference = attention[:, :, 0, 1:].mean(1)  # (2, 64) [CLS] row, heads averaged
    method = Method("test-records-cls", schedule=Schedule.progressive(["vision:3"], [0.25]))
    _, _, traces = encoder_run(deep, inputs, method)
    vision = deep.adapter.vision_mask(inputs["input_ids"])
    for b, trace in enumerate(traces):
        first = int(vision[b].nonzero()[0]) - int((inputs["attention_mask"][b] == 0).sum())
        kept = torch.tensor(trace.stages[0]["kept"]) - first
        assert kept.tolist() == reference[b].topk(16).indices.sort().values.tolist()
