"""The proxy's quality and validity bars: accuracy per family under four token-keeping conditions.

- ``full``: no dropping;
- ``no image``: every vision token removed before layer 0 (should be near chance);
- ``evidence``: before ``layer`` only the question's ground-truth evidence tokens are kept (the ``given`` scorer);
- ``random``: before ``layer`` as many random vision tokens are kept (seeded).

Validity bar: evidence ≥ 95% of full, and random ≥ 10 points below evidence. Quality bar: full ≥
90% overall and ≥ 80% in every family (``verdict``; the bars' rationale is in ``docs/proxy.md``).
"""

from __future__ import annotations

from v2drop.method import Method
from v2drop.schedule import Schedule

BAR_CONDITIONS = ("full", "no image", "evidence", "random")  # see the module docstring


def bar_methods(sample, layer: int) -> dict[str, Method]:
    """The validity-bar conditions for one sample: no dropping, no image, its evidence only, as many random tokens."""
    n = len(sample.evidence)
    return {
        "full": Method.none(),
        "no image": Method("random", schedule=Schedule.one_shot(0, 0.0, min_keep=0)),
        "evidence": Method(
            "given", keep=tuple(sample.evidence), schedule=Schedule.one_shot(layer, n, keep_mode="absolute", min_keep=0)
        ),
        "random": Method("random", schedule=Schedule.one_shot(layer, n, keep_mode="absolute", min_keep=0)),
    }


def bar_answers(
    lvlm, bench, samples, layer: int = 2, conditions=BAR_CONDITIONS, progress: bool = False
) -> dict[str, list[bool]]:
    """Whether each sample is answered right, per condition: ``{condition: [correct, ...]}`` in the order of
    ``samples``.
    """
    from tqdm import tqdm

    correct: dict[str, list[bool]] = {name: [] for name in BAR_CONDITIONS if name in conditions}
    for sample in tqdm(samples, desc="check", disable=not progress):
        inputs = lvlm.prepare([lvlm.format_prompt(sample.question, n_images=len(sample.images))], [list(sample.images)])
        for name, method in bar_methods(sample, layer).items():
            if name in conditions:
                text = lvlm.generate_from_inputs(inputs, method, max_new_tokens=4).texts[0]
                correct[name].append(bench.is_correct(text, sample))
    return correct


def table_of(samples, correct: dict[str, list[bool]]) -> dict[str, dict[str, float]]:
    """``bar_answers`` as accuracy per condition and family (plus ``overall``)."""
    table = {}
    for name, right in correct.items():
        per_family: dict[str, list[bool]] = {}
        for sample, ok in zip(samples, right):
            per_family.setdefault(sample.family, []).append(ok)
        table[name] = {f: sum(v) / len(v) for f, v in sorted(per_family.items())}
        table[name]["overall"] = sum(right) / len(right)
    return table


def bar_table(
    lvlm, bench, samples, layer: int = 2, conditions=BAR_CONDITIONS, progress: bool = False
) -> dict[str, dict[str, float]]:
    """Accuracy per condition and family (plus ``overall``) of the quality and validity bars."""
    return table_of(samples, bar_answers(lvlm, bench, samples, layer, conditions, progress))


def verdict(table: dict[str, dict[str, float]]) -> dict[str, bool]:
    """Whether a ``bar_table`` (with every condition) passes each part of the quality and validity bars."""
    families = [f for f in table["full"] if f != "overall"]
    full, ev, rnd = table["full"]["overall"], table["evidence"]["overall"], table["random"]["overall"]
    return {
        "quality_overall_ge_0.90": full >= 0.90,
        "quality_every_family_ge_0.80": all(table["full"][f] >= 0.80 for f in families),
        "validity_evidence_ge_95pct_of_full": ev >= 0.95 * full,
        "validity_random_10_points_below_evidence": rnd <= ev - 0.10,
    }


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A ``bar_table`` as fixed-width text: one row per condition, one column per family and ``overall``."""
    columns = [f for f in next(iter(table.values())) if f != "overall"] + ["overall"]
    lines = [f"{'condition':<12}" + "".join(f"{f:>9}" for f in columns)]
    lines += [f"{name:<12}" + "".join(f"{row[f]:>9.3f}" for f in columns) for name, row in table.items()]
    return "\n".join(lines)


def layer_changes(lvlm, samples) -> list[float]:
    """Mean L2 change ‖h_{l+1} − h_l‖ that each decoder layer l makes to the vision tokens, over ``samples`` (no
    dropping).

    V²Drop's variation at layer l+1 is exactly this change; a layer that barely moves the tokens
    (an untrained one) makes every method that reads it read noise.
    """
    import torch

    image_id = lvlm.model.config.image_token_id
    total, count = None, 0
    with torch.no_grad():
        for sample in samples:
            inputs = lvlm.prepare(
                [lvlm.format_prompt(sample.question, n_images=len(sample.images))], [list(sample.images)]
            )
            hidden = lvlm.model(
                **inputs, output_hidden_states=True
            ).hidden_states  # embeddings, then each layer's output
            vision = inputs["input_ids"][0] == image_id
            steps = torch.stack(
                [(b[0, vision] - a[0, vision]).float().norm(dim=-1).sum() for a, b in zip(hidden[:-1], hidden[1:])]
            )
            total, count = (steps if total is None else total + steps), count + int(vision.sum())
    return (total / count).tolist()


def ident_by_column_mates(bench, samples, correct: list[bool]) -> dict[str, dict]:
    """``ident`` accuracy (``correct``: per sample, as ``bar_answers`` gives it) split by whether another digit shares
    the asked cell's column (``with mate``) or not (``alone``): ``{kind: {"accuracy", "n"}}``.

    A model that looks a cell up by its column alone answers the ``alone`` questions and fails the
    others (docs/proxy.md, "How ident learnt the row"). Needs a benchmark with
    ``scene(split, index)`` (``digits``) and sample ids ``{split}-{scene}-{family}``.
    """
    from v2drop.benchmarks.digits import asked_cell

    split_correct: dict[str, list[bool]] = {"with mate": [], "alone": []}
    for sample, ok in zip(samples, correct):
        if sample.family != "ident":
            continue
        split, scene, _ = sample.id.rsplit("-", 2)
        row, col = asked_cell(sample.question)
        objects = bench.scene(split, int(scene))[1]
        split_correct["with mate" if any(o.col == col and o.row != row for o in objects) else "alone"].append(ok)
    return {kind: {"accuracy": sum(v) / len(v) if v else None, "n": len(v)} for kind, v in split_correct.items()}


CELL_WORDINGS = {  # how a cell lookup is worded: the training turns' words, then the evaluation question
    "cells": "{row} {col}",
    "row_cells": "{col} {row}",
    "cell_phrases": "{row} row, {col} column",
    "question": None,  # the ident question's evaluation prompt, "... in the {row} row, {col} column? ASSISTANT:"
}


def cell_lookups(lvlm, bench, split: str = "test", scenes: int = 100) -> list[dict]:
    """The next-token answer for every digit of the first ``scenes`` scenes, asked in each ``CELL_WORDINGS`` after the
    image prefix: one record per digit and wording.

    Records are ``{"scene", "row", "col", "mate", "wording", "correct"}`` (``mate``: another digit
    shares the column). A model that keys its lookup on the last position word answers a wording
    whose last word is the row (``row_cells``) with mates present, and the others without; see
    docs/proxy.md ("How ident learnt the row"). Needs ``digits``-like ``scene(split, index)``.
    """
    import torch

    from v2drop.benchmarks.digits import COL_WORDS, ROW_WORDS, ident_question

    tok, image_id = lvlm.processor.tokenizer, lvlm.model.config.image_token_id
    records = []
    with torch.no_grad():
        for scene in range(scenes):
            image, objects, _ = bench.scene(split, scene)
            for o in objects:
                inputs = lvlm.prepare([lvlm.format_prompt(ident_question(o.row, o.col))], [[image]])
                ids = inputs["input_ids"][0]
                prefix = ids[: int((ids == image_id).nonzero().max()) + 1].tolist()
                for wording, text in CELL_WORDINGS.items():
                    if text is None:
                        prompt = ids.tolist()
                    else:
                        words = text.format(row=ROW_WORDS[o.row], col=COL_WORDS[o.col])
                        prompt = prefix + tok(words, add_special_tokens=False)["input_ids"]
                    prompt = torch.tensor([prompt], device=ids.device)
                    logits = lvlm.model(
                        input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values=inputs["pixel_values"]
                    ).logits
                    answer = tok.convert_ids_to_tokens(int(logits[0, -1].argmax()))
                    records.append(
                        {
                            "scene": scene,
                            "row": o.row,
                            "col": o.col,
                            "wording": wording,
                            "correct": answer == str(o.label),
                            "mate": any(p.col == o.col and p is not o for p in objects),
                        }
                    )
    return records


def lookup_table(records: list[dict]) -> dict[str, dict[str, dict]]:
    """``cell_lookups`` records as ``{wording: {"alone" | "with mate": {"accuracy", "n"}}}``."""
    table: dict[str, dict[str, list[bool]]] = {}
    for r in records:
        table.setdefault(r["wording"], {"alone": [], "with mate": []})["with mate" if r["mate"] else "alone"].append(
            r["correct"]
        )
    return {
        w: {k: {"accuracy": sum(v) / len(v) if v else None, "n": len(v)} for k, v in kinds.items()}
        for w, kinds in table.items()
    }


def check(lvlm, bench, samples, layer: int = 2, progress: bool = True, change_samples: int = 60) -> dict:
    """The bar table of ``samples``, its verdict, the per-layer change to vision tokens on the first ``change_samples``
    and (``digits``) ``ident`` by column mates.

    Returns ``{"table", "verdict", "layer", "n", "layer_changes", "ident_by_column_mates"}`` (the last None for other
    benchmarks).
    """
    correct = bar_answers(lvlm, bench, samples, layer, progress=progress)
    table = table_of(samples, correct)
    changes = layer_changes(lvlm, samples[:change_samples])
    mates = (
        ident_by_column_mates(bench, samples, correct["full"])
        if hasattr(bench, "scene") and bench.modality == "image"
        else None
    )
    return {
        "table": table,
        "verdict": verdict(table),
        "layer": layer,
        "n": len(samples),
        "layer_changes": changes,
        "ident_by_column_mates": mates,
    }
