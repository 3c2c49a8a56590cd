"""CDPruner: a conditional DPP on the projected vision features, weighted by their relevance to the instruction.

Official definition: Theia-4869/CDPruner, llava/model/llava_arch.py ``encode_images`` (lines 141-186): cosine
similarity of the projected features (lines 149-152); relevance = the negated mean cosine of each token to the text
embeddings, min-max normalised with a 1e-6 offset (lines 155-160); kernel r_i · sim_ij · r_j (line 167); fast greedy
MAP inference: pick ``argmax`` of the gains, ``e = (L[j] − c[:, j] · c) / √d_j``, gains −= e², the picked gain −inf
(lines 169-182). The relevance here uses the LLM's input embeddings of the instruction (``relevance="llm_embeddings"``)
instead of the CLIP text tower's embedding of the question (clip_encoder.py lines 38-96).
"""

import pytest
import torch
from prellm_helpers import check_preset, check_proxy_run, kept_by, pre_llm_run, prellm_state

from v2drop.scorers.cdpruner import CDPrunerScorer, dpp_greedy, relevance
from v2drop.scorers.vispruner import share
from v2drop.testing import FAMILIES


def hand_state():
    """Text (1, 1) at 0, vision tokens a (1, 0), b (2, 0), c (0, 1), d (.6, .8) at 1..4, the instruction (1, 0) at 5."""
    hidden = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]]])
    return prellm_state(hidden, 4)


def kept(k, negate=True):
    return kept_by(CDPrunerScorer(negate=negate), hand_state(), k)


def test_hand_made_official_sign():
    """Cosines to the instruction (1, 0): a 1, b 1, c 0, d .6; negated and min-max normalised (lines 159-160):
    r = 1e-6, 1e-6, 1 + 1e-6, .4 + 1e-6. The first pick is the largest r² (c); then d's gain is
    r_d² − (r_c r_d cos(c, d))² / r_c² = .16 − .32² = .0576, a's and b's stay 1e-12: c and d."""
    assert kept(2) == [2, 3]


def test_hand_made_unnegated_relevance_and_a_used_up_rank():
    """negate=False: r = 1 + 1e-6, 1 + 1e-6, 1e-6, .6 + 1e-6. First a (a and b tie; the lower index), then d
    (.36 · (1 − .36) = .2304; b's gain is 0, it is a's direction). k = 3: a and d span the plane, every gain left is
    rounding, so the last pick follows the diagonal: b (r² ≈ 1) before c (1e-12)."""
    assert kept(2, negate=False) == [0, 3]
    assert kept(3, negate=False) == [0, 1, 3]


def test_hand_made_greedy_map_order():
    """Diagonal 4, 2, 1.5: pick 0; e = L[0] / 2 = (2, 1, 0), gains 2 − 1 = 1 and 1.5: pick 2, then 1."""
    kernel = torch.tensor([[4.0, 2.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 1.5]])
    assert dpp_greedy(kernel, 3).tolist() == [0, 2, 1]


def test_each_pick_maximises_the_determinant():
    """The fast inference is the greedy log-det maximisation: each pick maximises det(L[S ∪ {j}])."""
    torch.manual_seed(0)
    x = torch.randn(12, 20, dtype=torch.float64)
    kernel = x @ x.T
    order = dpp_greedy(kernel, 6).tolist()
    picked = []
    for _ in range(6):
        dets = {j: torch.linalg.det(kernel[picked + [j]][:, picked + [j]]) for j in range(12) if j not in picked}
        picked.append(max(dets, key=dets.get))
    assert order == picked


def test_relevance_formula():
    vision = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # mean cosines .5, .5, .707: negated −.5, −.5, −.707 -> (r + .707 + 1e-6) / .207
    expected = (torch.tensor([-0.5, -0.5, -(2**-0.5)]) + 2**-0.5 + 1e-6) / (2**-0.5 - 0.5)
    torch.testing.assert_close(relevance(vision, text), expected)
    assert relevance(vision[:1].expand(3, -1), text).tolist() == [1.0, 1.0, 1.0]


def test_clip_text_relevance_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="CLIP text tower"):
        CDPrunerScorer(relevance="clip_text")


@pytest.mark.parametrize("family", FAMILIES)
def test_pre_llm_run_follows_the_definition_on_every_family(tiny, family):
    """k = 3 of each sample's one image: the DPP's picks on the layer-0 embeddings, relevance to the text after the
    sample's last vision token; k shared out over the image's tiles where the family tiles it (InternVL3: one DPP a
    tile, the thumbnail included)."""
    lvlm = tiny(family)
    inputs, out = pre_llm_run(lvlm, family, "cdpruner", 3)
    with torch.no_grad():
        embeds = lvlm.adapter.embed(inputs)
    vision = lvlm.adapter.vision_mask(inputs["input_ids"]) & inputs["attention_mask"].bool()
    pad = (inputs["attention_mask"] == 0).sum(1)
    coords = lvlm.adapter.vision_coords(inputs, vision)
    for b, trace in enumerate(out.traces):
        positions = vision[b].nonzero().flatten()
        assert len(positions) > 3
        text = embeds[b, positions[-1] + 1 :]
        r = relevance(embeds[b, positions], text).double()
        x = torch.nn.functional.normalize(embeds[b, positions].float(), dim=-1).double()
        tiles, expected = coords[b, positions, 0], []
        for tile, k in zip(tiles.unique().tolist(), share(3, len(tiles.unique()))):
            members = (tiles == tile).nonzero().flatten()
            expected.append(members[dpp_greedy(r[members, None] * (x[members] @ x[members].T) * r[None, members], k)])
        expected = torch.cat(expected)
        assert trace.stages[0]["layer"] == -1
        assert trace.stages[0]["kept"] == sorted((positions[expected] - pad[b]).tolist())


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_presets_keep_their_budget(budget):
    method = check_preset("cdpruner", budget)
    assert method.scorer.relevance == "llm_embeddings" and method.scorer.negate


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_runs_on_the_bundled_proxy(budget):
    check_proxy_run("cdpruner", budget)


def official_steps(features, text, T):
    """The official encode_images kernel and fast MAP loop (lines 149-182) for one image, batch of one; the
    relevance is computed against the given text rows, as ``relevance="llm_embeddings"`` does."""
    unit = features / features.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.T
    rel = -((unit @ (text / text.norm(dim=-1, keepdim=True)).T).mean(dim=-1))
    rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    kernel = rel[:, None] * similarity * rel[None]
    cis = torch.zeros(T, len(features))
    gains = torch.diagonal(kernel).clone()
    picks = []
    for i in range(T):
        j = int(torch.argmax(gains))
        picks.append(j)
        e = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(gains[j])
        cis[i] = e
        gains -= e.square()
        gains[j] = -float("inf")
    return sorted(picks)


@pytest.mark.parametrize("T", [16, 64])
def test_matches_the_official_steps(T):
    """Random projected features (256 tokens, D = 128, full rank) and instruction rows: the same kept set."""
    torch.manual_seed(T)
    features, text = torch.randn(256, 128), torch.randn(5, 128)
    r = relevance(features, text).double()
    x = torch.nn.functional.normalize(features, dim=-1).double()
    assert sorted(dpp_greedy(r[:, None] * (x @ x.T) * r[None], T).tolist()) == official_steps(features, text, T)
