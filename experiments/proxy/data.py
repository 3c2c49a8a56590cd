"""Training data of the proxy: seeded scene streams, conversations about a scene and their dense auxiliary turns.

A conversation asks one question of every family about a training scene (``image_questions``),
optionally each turn isolated so that it sees exactly its evaluation prompt (``isolation_mask``),
then adds auxiliary turns that give the decoder's lookups a first-order signal (``aux_turn``).
"""

from __future__ import annotations

import random

import torch

from experiments.proxy.model import VISION_TOKENS
from v2drop.benchmarks.digits import (
    COL_WORDS,
    GRID,
    PATCH,
    PATCHES,
    ROW_WORDS,
    Digits,
    cell_evidence,
    ident_question,
    image_questions,
)

EXTRA_FAMILIES = ("ident", "exist", "colour", "mc")  # families a conversation adds questions of past one per family
AUX_TURNS = (
    "digits",
    "which",
    "cells",
    "column_cells",
    "row_cells",
    "cell_phrases",
)  # the dense auxiliary turns ``aux_turn`` builds
WHICH_QUESTION = "What digit is in the image?"  # the ``which`` turn's question


def patch_words(objects) -> list[list[str]]:
    """For each of the 256 patches: the words it should carry (content, colour, row, column)."""
    per_cell = PATCHES // GRID
    words = []
    for p in range(VISION_TOKENS):
        pr, pc = divmod(p, PATCHES)
        row, col = pr // per_cell, pc // per_cell
        content = ["none", "<pad>"]  # <pad> = no colour word (left out of the target)
        for o in objects:
            if o.mask[pr * PATCH : (pr + 1) * PATCH, pc * PATCH : (pc + 1) * PATCH].any():
                content = [str(o.label), o.colour]
        words.append(content + [ROW_WORDS[row], COL_WORDS[col]])
    return words


class SceneStream(torch.utils.data.IterableDataset):
    """An endless, seeded stream of training scenes (train-split digits only), from scene ``start`` on."""

    def __init__(self, seed: int, start: int = 0):
        self.seed, self.start = seed, start

    def __iter__(self):
        bench = Digits(seed=self.seed)
        i = self.start
        while True:
            image, objects, rng = bench.scene("train", i)
            yield {"image": image, "objects": objects, "rng_seed": rng.random()}
            i += 1


def as_list(items):
    """The DataLoader's collate function: a batch stays the list of its items (scenes are PIL images and objects)."""
    return items


def aux_turn(tokenizer, objects, rng: random.Random, kind: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one dense auxiliary turn (``kind`` in ``AUX_TURNS``).

    ``digits``: the ten digit words in shuffled order, each followed by its colour, or ``none``
    when the digit is absent: ``7 red 2 none 0 white ...``. Every answer is predicted at the
    position of the digit it is about, so the lookup "which vision tokens show this digit" gets a
    direct, first-order training signal (the question formats only reach it through a hop from
    the answer position back to the digit word, a chicken-and-egg the randomly initialised decoder
    did not leave in 700 steps). It is a training device only: evaluation prompts never contain it.

    ``cells``: the occupied grid cells and as many empty ones, shuffled, each a row and a column
    word followed by the digit there or ``none``: ``upper left 7 bottom rightmost none ...`` (all
    sixteen cells, 80% ``none``, stayed at always-``none`` for 300 steps) — the same first-order
    signal for the opposite lookup, position as the key and the digit as the value (what ``ident``
    asks; ``digits`` only ever reads a digit as the key). ``column_cells``: the same, but the empty
    cells are drawn from the columns that hold a digit first, so most ``none`` answers need the row
    (a lookup by column alone finds a digit there). ``row_cells``: the cells of ``cells`` with the
    column word first, ``left upper 7 ...``, so the lookup at the last word before the answer is
    keyed by the row (in ``cells`` and in ``ident``'s question the column comes last, and the
    decoder learnt to look cells up by their column alone). ``cell_phrases``: the cells of ``cells``
    in ``ident``'s own words, ``upper row, left column 7 ...``, so the row sits as far before the
    answer as it does in the question. ``which``: "What digit is in the image?" when
    exactly one digit is visible (nothing otherwise).
    """
    if kind not in AUX_TURNS:
        raise ValueError(f"Unknown auxiliary turn {kind!r}; known: {list(AUX_TURNS)}")
    tid = tokenizer.convert_tokens_to_ids
    if kind == "which":
        if len(objects) != 1:
            return [], []
        prompt = tokenizer(WHICH_QUESTION, add_special_tokens=False)["input_ids"] + [tid("ASSISTANT:")]
        target = [tid(str(objects[0].label)), tid("</s>")]
        return prompt + target, [-100] * len(prompt) + target
    if kind in ("cells", "column_cells", "row_cells", "cell_phrases"):
        where = {(o.row, o.col): str(o.label) for o in objects}
        empty = [(r, c) for r in range(len(ROW_WORDS)) for c in range(len(COL_WORDS)) if (r, c) not in where]
        wanted = min(len(where), len(empty))
        if kind in ("cells", "row_cells", "cell_phrases"):
            cells = list(where) + rng.sample(empty, wanted)
        else:
            columns = {c for _, c in where}
            near = [e for e in empty if e[1] in columns]
            far = [e for e in empty if e[1] not in columns]
            picked = rng.sample(near, min(wanted, len(near)))
            cells = list(where) + picked + rng.sample(far, wanted - len(picked))
        rng.shuffle(cells)
        ids, labels = [], []
        for r, c in cells:
            answer = tid(where.get((r, c), "none"))
            if kind == "cell_phrases":
                words = tokenizer(f"{ROW_WORDS[r]} row, {COL_WORDS[c]} column", add_special_tokens=False)["input_ids"]
            else:
                words = [tid(ROW_WORDS[r]), tid(COL_WORDS[c])]
            ids += (words[::-1] if kind == "row_cells" else words) + [answer]
            labels += [-100] * len(words) + [answer]
        return ids, labels
    colour = {o.label: o.colour for o in objects}
    digits = list(range(10))
    rng.shuffle(digits)
    ids, labels = [], []
    for d in digits:
        answer = tid(colour.get(d, "none"))
        ids += [tid(str(d)), answer]
        labels += [-100, answer]
    return ids, labels


def question_turn(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Ids and labels of ``{question} ASSISTANT: {answer} </s>``, only the answer and ``</s>`` supervised."""
    tid = tokenizer.convert_tokens_to_ids
    prompt = tokenizer(question, add_special_tokens=False)["input_ids"] + [tid("ASSISTANT:")]
    target = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tid("</s>")]
    return prompt + target, [-100] * len(prompt) + target


def column_mate_question(rng: random.Random, objects, visible=None):
    """An ``ident`` question whose answer needs the row: about a digit that shares its column with another (three times
    in four) or an empty cell of such a column; None when no two digits share a column.

    ``ident`` fails when the lookup goes by column alone (docs/proxy.md): a benchmark scene rarely
    puts two digits in one column, so training on its questions alone seldom punishes that.
    """
    seen = {o.label for o in objects} if visible is None else set(visible)
    where = {(o.row, o.col): o for o in objects}
    mates = [o for o in objects if any(p.col == o.col and p is not o for p in objects)]
    if not mates:
        return None
    empty = [(r, c) for r in range(len(ROW_WORDS)) for c in {o.col for o in mates} if (r, c) not in where]
    if not empty or rng.random() < 0.75:
        o = rng.choice(mates)
        row, col, answer, evidence = o.row, o.col, str(o.label) if o.label in seen else "none", o.evidence()
    else:
        row, col = rng.choice(empty)
        answer, evidence = "none", cell_evidence(row, col)
    return ("ident", ident_question(row, col), answer, evidence, ())


def with_column_mates(rng: random.Random, questions: list, objects, visible, share: float) -> list:
    """``questions`` with, at probability ``share``, its ``ident`` question replaced by a ``column_mate_question`` (no
    RNG drawn when ``share`` is 0).
    """
    if share <= 0 or rng.random() >= share:
        return questions
    mate = column_mate_question(rng, objects, visible)
    return questions if mate is None else [mate if q[0] == "ident" else q for q in questions]


def conversation(
    processor,
    objects,
    rng: random.Random,
    turns: int = 5,
    isolated: bool = False,
    aux=(),
    visible=None,
    ident_mates: float = 0.0,
):
    """Token ids and labels (plus segments and positions when ``isolated``) of one conversation about a scene, every
    answer supervised.

    The first five turns ask one question of every family (shuffled); turns beyond five add more
    questions of the retrieval families (``EXTRA_FAMILIES``): each costs a few tokens next to the
    256 vision tokens, so they multiply the learning signal per image almost for free. ``aux``
    names dense auxiliary turns (``aux_turn``) added after the questions. ``visible`` (labels, or
    None for all): answer as if only those objects were in the image (``image_questions``).
    ``ident_mates``: share of the ``ident`` questions asked about column mates instead
    (``with_column_mates``).
    ``isolated``: every turn continues the shared ``USER: <image>`` prefix at the positions of its
    evaluation prompt and sees nothing else (``segments``: 0 for the prefix, k for turn k).
    """
    tok = processor.tokenizer
    qa = with_column_mates(rng, image_questions(rng, objects, visible), objects, visible, ident_mates)
    rng.shuffle(qa)
    seen = {q for _, q, *_ in qa}
    for _ in range(8 * turns):
        if len(qa) >= turns:
            break
        drawn = with_column_mates(rng, image_questions(rng, objects, visible), objects, visible, ident_mates)
        extra = [x for x in drawn if x[0] in EXTRA_FAMILIES and x[1] not in seen]
        if extra:
            pick = rng.choice(extra)
            seen.add(pick[1])
            qa.append(pick)
    image_id, user = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("USER:")
    shown = objects if visible is None else [o for o in objects if o.label in visible]
    extra = [aux_turn(tok, shown, rng, kind) for kind in aux]
    if isolated:
        ids = [user] + [image_id] * VISION_TOKENS
        labels, segments, positions = [-100] * len(ids), [0] * len(ids), list(range(len(ids)))
        parts = [question_turn(tok, question, answer) for _, question, answer, _, _ in qa] + extra
        for turn, (part_ids, part_labels) in enumerate(parts, start=1):
            ids, labels = ids + part_ids, labels + part_labels
            segments += [turn] * len(part_ids)
            positions += list(range(VISION_TOKENS + 1, VISION_TOKENS + 1 + len(part_ids)))
        return ids, labels, segments, positions
    ids, labels = [], []
    for turn, (_, question, answer, _, _) in enumerate(qa):
        part_ids, part_labels = question_turn(tok, question, answer)
        prefix = [user] + ([image_id] * VISION_TOKENS if turn == 0 else [])
        ids += prefix + part_ids
        labels += [-100] * len(prefix) + part_labels
    for aux_ids, aux_labels in extra:
        ids, labels = ids + aux_ids, labels + aux_labels
    return ids, labels


def isolation_mask(segments: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, L, L) additive mask: causal, every turn sees the shared prefix (segment 0) and itself only.

    ``segments`` (B, L): 0 for the prefix, k for turn k, -1 for padding (which sees only itself).
    """
    L = segments.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal & (k != -1) & ((k == 0) | (k == q))
    allowed |= torch.eye(L, dtype=torch.bool)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def pad_conversations(convs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L) ids, labels, segments and positions of conversations padded to the longest.

    A conversation is (ids, labels) — one segment 0, positions 0, 1, ... — or (ids, labels,
    segments, positions); padding is segment -1 and label -100.
    """
    length = max(len(c[0]) for c in convs)
    ids = torch.full((len(convs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(convs), length), -100, dtype=torch.long)
    segments = torch.full((len(convs), length), -1, dtype=torch.long)
    positions = torch.arange(length).repeat(len(convs), 1)
    for k, c in enumerate(convs):
        n = len(c[0])
        ids[k, :n], labels[k, :n] = torch.tensor(c[0]), torch.tensor(c[1])
        segments[k, :n] = torch.tensor(c[2]) if len(c) > 2 else 0
        if len(c) > 3:
            positions[k, :n] = torch.tensor(c[3])
    return ids, labels, segments, positions
