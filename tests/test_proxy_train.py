"""A miniature proxy trains a few steps through the real recipe and loads through v2drop.load."""

import json
import random
import re
from pathlib import Path

import pytest
import torch

import v2drop
from experiments.proxy.data import aux_turn, column_mate_question, conversation, isolation_mask, patch_words
from experiments.proxy.drops import VisionDrop, block_keep_mask, draw_drop, layer_masks
from experiments.proxy.model import ProxyConfig, build_model, build_processor, build_tokenizer
from experiments.proxy.train import AlignModule, ConversationModule, StageConfig, TrainConfig
from experiments.train_proxy import main as train_main
from v2drop.benchmarks import get_benchmark
from v2drop.benchmarks.digits import COL_WORDS, ROW_WORDS
from v2drop.config import config_from_dict
from v2drop.lvlm import LVLM
from v2drop.method import Method
from v2drop.schedule import Schedule

RECIPE = Path(__file__).parents[1] / "configs" / "proxy.yaml"


@pytest.mark.slow
def test_miniature_training_and_load(tmp_path, capsys):
    out, work = tmp_path / "proxy", tmp_path / "work"
    args = [
        "--set",
        f"output={out}",
        "--set",
        f"workdir={work}",
        "--set",
        "model.layers=2",
        "--set",
        "model.hidden=32",
        "--set",
        "model.intermediate=64",
        "--set",
        "model.vision_hidden=32",
        "--set",
        "align.steps=2",
        "--set",
        "align.batch=2",
        "--set",
        "lvlm.steps=2",
        "--set",
        "lvlm.batch=2",
        "--set",
        "robust.steps=2",
        "--set",
        "robust.batch=2",
        "--set",
        "settle.steps=2",
        "--set",
        "settle.batch=2",
        "--set",
        "video.steps=1",
        "--set",
        "video.batch=1",
        "--set",
        "video.clips=1",
        "--set",
        "video.frames=[1,2]",
        "--set",
        "video.frame_tags=1.0",
        "--set",
        "video.video_aux=[frames,firsts]",
        "--set",
        "video.token_keep=[0.1,1.0]",
        "--set",
        "monitor_every=1",
        "--set",
        "monitor_samples=5",
    ]
    train_main(args)
    assert (out / "model.safetensors").exists() and all(
        (work / stage / "done.pt").exists() for stage in ("lvlm", "settle", "video")
    )
    lvlm = v2drop.load(str(out))
    sample = get_benchmark("digits").load("test", 1)[0]
    prompt = lvlm.format_prompt(sample.question)
    assert prompt == f"USER: <image>\n{sample.question} ASSISTANT:"
    result = lvlm.generate([prompt], [list(sample.images)], max_new_tokens=2)
    assert len(result.prompt_ids[0]) == 256 + len(lvlm.tokenizer(sample.question)["input_ids"]) + 2
    # The first training turn is laid out exactly like the evaluation prompt.
    image, objects, _ = get_benchmark("digits").scene("test", 0)
    ids, labels = conversation(lvlm.processor, objects, random.Random(0))
    first_answer = next(i for i, l in enumerate(labels) if l != -100)
    eval_ids = lvlm.prepare([lvlm.format_prompt(lvlm.tokenizer.decode(ids[257 : first_answer - 1]))], [image])[
        "input_ids"
    ][0].tolist()
    assert ids[:first_answer] == eval_ids
    assert (
        json.loads((out / "train_config.json").read_text())["lvlm"]["steps"] == 2
    )  # the resolved recipe ships with the model
    # A second run resumes: finished stages are not trained again.
    train_main(args)
    # Resuming a stage under a different recipe is refused, naming what changed.
    with pytest.raises(SystemExit) as exit_:  # a user error: one line on stderr, exit status 2 (issue 20)
        train_main(args + ["--set", "lvlm.lr=0.01"])
    assert exit_.value.code == 2
    assert re.search(r"error: .*work/lvlm was trained with different settings \(lvlm\)", capsys.readouterr().err)


def test_an_interrupted_stage_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """A stage that crashes at step 2 and is resumed ends bit-identical to one that ran straight through."""
    import experiments.proxy.train as proxy_train

    def args(name):
        return [
            "--set",
            f"output={tmp_path / name / 'out'}",
            "--set",
            f"workdir={tmp_path / name / 'work'}",
            "--set",
            "model.layers=2",
            "--set",
            "model.hidden=32",
            "--set",
            "model.intermediate=64",
            "--set",
            "model.vision_hidden=32",
            "--set",
            "align.steps=1",
            "--set",
            "align.batch=2",
            "--set",
            "lvlm.steps=4",
            "--set",
            "lvlm.batch=2",
            "--set",
            "lvlm.token_keep=[0.1,1.0]",
            "--set",
            "robust.steps=0",
            "--set",
            "settle.steps=0",
            "--set",
            "checkpoint_every=1",
        ]

    train_main(args("straight"))

    class Crashing(proxy_train.PrintLoss):
        def on_train_batch_end(self, trainer, *a):
            super().on_train_batch_end(trainer, *a)
            if self.stage == "lvlm" and trainer.global_step == 2:
                raise RuntimeError("simulated crash")

    monkeypatch.setattr(proxy_train, "PrintLoss", Crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_main(args("resumed"))
    assert not (tmp_path / "resumed" / "work" / "lvlm" / "done.pt").exists()
    monkeypatch.undo()
    train_main(args("resumed"))
    a = torch.load(tmp_path / "straight" / "work" / "lvlm" / "done.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "work" / "lvlm" / "done.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_rejects_unknown_keys_and_bad_drop_settings():
    with pytest.raises(
        ValueError, match=r"unknown key 'lvlm.step' in section 'lvlm' of StageConfig; valid keys: .*steps"
    ):
        config_from_dict(TrainConfig, {"lvlm": {"step": 3}})
    with pytest.raises(ValueError, match=r"token_keep must be \[low, high\]"):
        config_from_dict(TrainConfig, {"robust": {"token_keep": [0.0, 1.0]}})
    with pytest.raises(
        ValueError,
        match=(
            r"aux \['grid'\] names unknown turns \['grid'\]; known: \['digits', 'which', 'cells', 'column_cells', "
            r"'row_cells', 'cell_phrases'\]"
        ),
    ):
        config_from_dict(TrainConfig, {"lvlm": {"aux": ["grid"]}})


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--config", "{tmp}/missing.yaml"], ["error:", "missing.yaml", "does not exist"]),
        (["--config", "{recipe}", "--set", "lvlm.step=3"], ["error:", "'lvlm.step'", "valid keys"]),
        (["--config", "{recipe}", "--set", "lvlm.steps=many"], ["error:", "lvlm.steps", "many"]),
        (
            ["--config", "{recipe}", "--set", "video.frames=[2, 9]"],
            ["error:", "video.frames must be [min, max]", "[2, 9]"],
        ),
    ],
)
def test_train_cli_reports_bad_input_in_one_line_with_status_2(argv, words, capsys, tmp_path):
    """A missing recipe, an unknown key or a bad value: ``error: ...`` on one line, exit status 2, no traceback, nothing
    trained.
    """
    with pytest.raises(SystemExit) as exit_:
        train_main([a.format(tmp=tmp_path, recipe=RECIPE) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    for word in words:
        assert word in err


def test_isolated_turns_see_exactly_the_evaluation_prompt():
    """With isolated turns, the logits at every turn's answer position equal those of the evaluation prompt alone."""
    processor = build_processor()
    torch.manual_seed(0)
    model = build_model(ProxyConfig(hidden=32, intermediate=64, layers=2, vision_hidden=32), processor.tokenizer).eval()
    image, objects, _ = get_benchmark("digits").scene("train", 3)
    ids, labels, segments, positions = conversation(processor, objects, random.Random(1), turns=7, isolated=True)
    pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor([ids]),
            pixel_values=pixels,
            position_ids=torch.tensor([positions]),
            attention_mask=isolation_mask(torch.tensor([segments])),
        ).logits[0]
        answer_starts = [i for i in range(len(labels)) if labels[i] != -100 and (i == 0 or labels[i - 1] == -100)]
        assert len(answer_starts) == 7
        for start in answer_starts:
            turn = segments[start]
            first = segments.index(turn)
            prompt = ids[:257] + ids[first:start]
            assert positions[first:start] == list(range(257, 257 + start - first))  # the prompt's own position ids
            alone = model(
                input_ids=torch.tensor([prompt]),
                pixel_values=pixels,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            ).logits[0, -1]
            torch.testing.assert_close(
                logits[start - 1], alone, atol=1e-4, rtol=0
            )  # float noise only: a leak moves logits by O(1)
            text = processor.tokenizer.decode(prompt[257:])
            assert processor(text=f"USER: <image>\n{text}", images=[image])["input_ids"][0] == prompt


def test_digits_aux_turn_names_every_digit_with_its_colour_or_none():
    """The dense auxiliary turn: each digit word once, answered (at its own position) by its colour or none."""
    tok = build_tokenizer()
    image, objects, _ = get_benchmark("digits").scene("train", 5)
    ids, labels = aux_turn(tok, objects, random.Random(0), "digits")
    words, answers = tok.convert_ids_to_tokens(ids[0::2]), tok.convert_ids_to_tokens(ids[1::2])
    assert sorted(words) == [str(d) for d in range(10)]
    colour = {str(o.label): o.colour for o in objects}
    assert answers == [colour.get(w, "none") for w in words]
    assert labels[0::2] == [-100] * 10 and labels[1::2] == ids[1::2]  # only the answers are supervised
    with pytest.raises(
        ValueError,
        match=(
            r"Unknown auxiliary turn 'grid'; known: \['digits', 'which', 'cells', 'column_cells', 'row_cells', "
            r"'cell_phrases'\]"
        ),
    ):
        aux_turn(tok, objects, random.Random(0), "grid")


def test_cells_aux_turn_names_every_cell_with_its_digit_or_none():
    """``cells``: every occupied cell and as many empty ones, as row and column words answered by the digit or none."""
    tok = build_tokenizer()
    _, objects, _ = get_benchmark("digits").scene("train", 5)
    ids, labels = aux_turn(tok, objects, random.Random(0), "cells")
    rows, cols, answers = (tok.convert_ids_to_tokens(ids[i::3]) for i in range(3))
    cells = list(zip(rows, cols))
    assert len(set(cells)) == len(cells) == 2 * len(objects) and set(cells) <= {
        (r, c) for r in ROW_WORDS for c in COL_WORDS
    }
    where = {(ROW_WORDS[o.row], COL_WORDS[o.col]): str(o.label) for o in objects}
    assert set(where) < set(cells) and answers == [where.get(cell, "none") for cell in cells]
    assert answers.count("none") == len(objects) > 0
    assert labels[0::3] == labels[1::3] == [-100] * len(cells) and labels[2::3] == ids[2::3]
    hidden, _ = aux_turn(
        tok, objects[1:], random.Random(0), "cells"
    )  # a dropped object is not there: its cell is empty
    assert len(hidden) == 3 * 2 * (len(objects) - 1)


def test_column_cells_aux_turn_draws_its_empty_cells_from_columns_holding_a_digit():
    """``column_cells``: like ``cells``, but the empty cells come from the columns with a digit while there are any, so
    the row decides.
    """
    tok = build_tokenizer()
    bench = get_benchmark("digits")
    for scene in range(40):
        _, objects, _ = bench.scene("train", scene)
        ids, labels = aux_turn(tok, objects, random.Random(scene), "column_cells")
        cells = [
            (ROW_WORDS.index(r), COL_WORDS.index(c), a)
            for r, c, a in zip(*(tok.convert_ids_to_tokens(ids[i::3]) for i in range(3)))
        ]
        where = {(o.row, o.col): str(o.label) for o in objects}
        assert len({(r, c) for r, c, _ in cells}) == len(cells) == 2 * len(objects)
        assert [a for _, _, a in cells] == [where.get((r, c), "none") for r, c, _ in cells]
        near = {(r, c) for r in range(4) for c in {c for _, c in where} if (r, c) not in where}
        empty = {(r, c) for r, c, a in cells if a == "none"}
        assert empty <= near if len(near) >= len(objects) else near < empty
        assert labels[2::3] == ids[2::3] and labels[0::3] == labels[1::3] == [-100] * len(cells)


def test_row_cells_and_cell_phrases_ask_the_cells_of_cells_in_other_words():
    """``row_cells``: the cells of ``cells`` column word first; ``cell_phrases``: the same cells in ``ident``'s wording;
    only the answers are supervised.
    """
    tok = build_tokenizer()
    _, objects, _ = get_benchmark("digits").scene("train", 5)
    where = {(ROW_WORDS[o.row], COL_WORDS[o.col]): str(o.label) for o in objects}
    cells_ids, _ = aux_turn(tok, objects, random.Random(0), "cells")
    cells = list(zip(*(tok.convert_ids_to_tokens(cells_ids[i::3]) for i in range(2))))
    ids, labels = aux_turn(tok, objects, random.Random(0), "row_cells")
    cols, rows, answers = (tok.convert_ids_to_tokens(ids[i::3]) for i in range(3))
    assert list(zip(rows, cols)) == cells and answers == [where.get(cell, "none") for cell in cells]
    assert labels[0::3] == labels[1::3] == [-100] * len(cells) and labels[2::3] == ids[2::3]
    ids, labels = aux_turn(tok, objects, random.Random(0), "cell_phrases")
    text = " ".join(tok.convert_ids_to_tokens(ids))
    assert text == " ".join(f"{r} row , {c} column {where.get((r, c), 'none')}" for r, c in cells)
    assert [i for i, l in zip(ids, labels) if l != -100] == tok.convert_tokens_to_ids(
        [where.get(cell, "none") for cell in cells]
    )


def test_column_mate_questions_ask_about_cells_where_the_row_decides():
    """``column_mate_question``: a digit sharing its column with another (answered by it, or none once dropped) or an
    empty cell of such a column; None without mates.
    """
    bench = get_benchmark("digits")
    kinds = set()
    for scene in range(200):
        _, objects, _ = bench.scene("train", scene)
        question = column_mate_question(random.Random(scene), objects)
        columns = [o.col for o in objects]
        mate_columns = {c for c in columns if columns.count(c) > 1}
        if not mate_columns:
            assert question is None
            continue
        family, text, answer, evidence, _ = question
        row, col = (
            ROW_WORDS.index(text.split("the ")[1].split(" row")[0]),
            COL_WORDS.index(text.split("row, ")[1].split(" column")[0]),
        )
        assert family == "ident" and col in mate_columns
        at = [o for o in objects if (o.row, o.col) == (row, col)]
        assert answer == (str(at[0].label) if at else "none")
        kinds.add("digit" if at else "empty")
        if at:
            assert column_mate_question(random.Random(scene), objects, visible=set())[2] in (
                "none",
            )  # every digit dropped
    assert kinds == {"digit", "empty"}


def test_ident_mates_zero_leaves_a_conversation_unchanged():
    """The default ``ident_mates`` 0 draws nothing from the RNG, so recipes without it train on exactly the same
    conversations.
    """
    processor = build_processor()
    _, objects, _ = get_benchmark("digits").scene("train", 9)
    plain = conversation(processor, objects, random.Random(4), turns=9, isolated=True, aux=["digits", "cells"])
    assert (
        conversation(
            processor, objects, random.Random(4), turns=9, isolated=True, aux=["digits", "cells"], ident_mates=0.0
        )
        == plain
    )


def test_which_aux_turn_asks_for_the_digit_only_when_one_is_visible():
    """``which``: "What digit is in the image? ASSISTANT: 7 </s>" with one object, nothing with more; only the answer is
    supervised.
    """
    tok = build_tokenizer()
    _, objects, _ = get_benchmark("digits").scene("train", 11)
    assert len(objects) >= 2 and aux_turn(tok, objects, random.Random(0), "which") == ([], [])
    ids, labels = aux_turn(tok, objects[:1], random.Random(0), "which")
    assert tok.decode(ids) == f"What digit is in the image? ASSISTANT: {objects[0].label} </s>"
    assert labels[:-2] == [-100] * (len(ids) - 2) and labels[-2:] == ids[-2:]


def test_aux_turn_is_isolated_and_leaves_the_questions_unchanged():
    """Adding the auxiliary turn appends one isolated segment at the evaluation prompt's positions; the questions are
    identical.
    """
    processor = build_processor()
    _, objects, _ = get_benchmark("digits").scene("train", 7)
    plain = conversation(processor, objects, random.Random(3), turns=6, isolated=True)
    ids, labels, segments, positions = conversation(
        processor, objects, random.Random(3), turns=6, isolated=True, aux=["digits"]
    )
    n = len(plain[0])
    assert (ids[:n], labels[:n], segments[:n], positions[:n]) == plain
    assert segments[n:] == [7] * 20 and positions[n:] == list(range(257, 277))


def test_tied_qk_init_starts_every_query_head_equal_to_its_key_head():
    """The mimetic start: each query head's weights equal the key head it shares under GQA; 0 keeps transformers'
    init."""
    tok = build_tokenizer()
    decoder = build_model(
        ProxyConfig(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vision_hidden=32, tied_qk_init=0.1), tok
    ).model.language_model
    for layer in decoder.layers:
        q, k = layer.self_attn.q_proj.weight.view(4, 8, 32), layer.self_attn.k_proj.weight.view(2, 8, 32)
        for h in range(4):
            torch.testing.assert_close(q[h], k[h // 2], rtol=0, atol=0)
        assert 0.07 < k.std().item() < 0.13
    untied = (
        build_model(ProxyConfig(hidden=32, intermediate=64, layers=2, vision_hidden=32), tok)
        .model.language_model.layers[0]
        .self_attn
    )
    assert not torch.equal(untied.q_proj.weight.view(4, 8, 32)[0], untied.k_proj.weight.view(2, 8, 32)[0])


def test_align_content_term_is_the_cross_entropy_of_each_object_patch_against_its_digit_word():
    """``content_ce`` adds exactly the cross-entropy of object patches' word logits against the digit they show."""
    processor = build_processor()
    torch.manual_seed(0)
    model = build_model(ProxyConfig(hidden=32, intermediate=64, layers=2, vision_hidden=32), processor.tokenizer)
    batch = [dict(zip(("image", "objects"), get_benchmark("digits").scene("train", i)[:2])) for i in (1, 2)]
    plain = AlignModule(model, processor, StageConfig(lr=1e-3, steps=1)).training_step(batch, 0)
    scaled = AlignModule(model, processor, StageConfig(lr=1e-3, steps=1, content_ce=50.0)).training_step(batch, 0)
    tok, emb = processor.tokenizer, model.model.get_input_embeddings().weight
    pixels = processor.image_processor([b["image"] for b in batch], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = torch.cat(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
    words = [w for b in batch for w in patch_words(b["objects"])]
    on_object = [i for i, w in enumerate(words) if w[0] != "none"]
    assert 0 < len(on_object) < len(words)
    content = [str(d) for d in range(10)] + ["none"]
    logits = feats[on_object] @ emb[[tok.convert_tokens_to_ids(w) for w in content]].T * 50.0
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([content.index(words[i][0]) for i in on_object]))
    torch.testing.assert_close(scaled - plain, expected, atol=1e-5, rtol=1e-5)


def test_block_dropout_keeps_whole_aligned_blocks():
    """Block dropout keeps every token of a random set of aligned 4x4-patch blocks and nothing else."""
    for share, blocks in ((0.0, 1), (1 / 16, 1), (0.3, 5), (1.0, 16)):
        kept = block_keep_mask(share, torch.Generator().manual_seed(3)).view(16, 16)
        assert kept.sum() == 16 * blocks
        per_block = kept.view(4, 4, 4, 4).sum(dim=(1, 3))  # (block row, block col)
        assert set(per_block.flatten().tolist()) <= {0, 16}
    one = block_keep_mask(0.01, torch.Generator().manual_seed(0)).nonzero().flatten().tolist()
    top, left = divmod(one[0], 16)
    assert top % 4 == 0 and left % 4 == 0
    assert one == [(top + r) * 16 + left + c for r in range(4) for c in range(4)]


def test_frozen_decoder_layers_keep_their_weights_while_the_rest_trains():
    """``frozen_layers=1``: an optimiser step changes decoder layer 1 but leaves layer 0 bit-identical."""
    processor = build_processor()
    torch.manual_seed(0)
    model = build_model(ProxyConfig(hidden=32, intermediate=64, layers=2, vision_hidden=32), processor.tokenizer)
    module = ConversationModule(
        model, processor, StageConfig(lr=1e-2, vision_lr=1e-3, steps=2, isolated=True), frozen_layers=1
    )
    layers = model.model.language_model.layers
    before = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in layers]
    batch = [dict(zip(("image", "objects"), get_benchmark("digits").scene("train", i)[:2]), rng_seed=i) for i in (1, 2)]
    (opt,), _ = module.configure_optimizers()
    module.training_step(batch, 0).backward()
    opt.step()
    assert all(torch.equal(v, layers[0].state_dict()[k]) for k, v in before[0].items())
    assert not torch.equal(before[1]["self_attn.q_proj.weight"], layers[1].self_attn.q_proj.weight)


def test_an_unfrozen_stage_trains_the_frozen_layers_at_their_own_rate():
    """``frozen: false``: the first decoder layers train, in their own optimiser group at ``frozen_lr``; the rest at
    ``lr``.
    """
    processor = build_processor()
    torch.manual_seed(0)
    model = build_model(ProxyConfig(hidden=32, intermediate=64, layers=2, vision_hidden=32), processor.tokenizer)
    stage = StageConfig(lr=1e-2, vision_lr=1e-3, frozen=False, frozen_lr=5e-3, steps=40, isolated=True)
    module = ConversationModule(model, processor, stage, frozen_layers=1)
    layer0 = model.model.language_model.layers[0]
    (opt,), (sched,) = module.configure_optimizers()
    groups = {id(p): g["max_lr"] for g in opt.param_groups for p in g["params"]}
    assert {groups[id(p)] for p in layer0.parameters()} == {5e-3}
    assert groups[id(model.model.language_model.layers[1].self_attn.q_proj.weight)] == 1e-2
    before = layer0.self_attn.q_proj.weight.clone()
    batch = [dict(zip(("image", "objects"), get_benchmark("digits").scene("train", i)[:2]), rng_seed=i) for i in (1, 2)]
    module.training_step(batch, 0).backward()
    opt.step()
    assert not torch.equal(before, layer0.self_attn.q_proj.weight)


def tiny_recipe(tmp_path, name, *extra):
    """``--set`` arguments of a two-layer recipe writing under ``tmp_path / name``."""
    sets = [
        f"output={tmp_path / name / 'out'}",
        f"workdir={tmp_path / name / 'work'}",
        "model.layers=2",
        "model.hidden=32",
        "model.intermediate=64",
        "model.vision_hidden=32",
        "align.steps=1",
        "align.batch=2",
        "lvlm.steps=1",
        "lvlm.batch=2",
        "robust.steps=1",
        "robust.batch=2",
        "frozen_decoder_layers=1",
        "settle.steps=0",
        "settle.batch=2",
        *extra,
    ]
    return [a for s in sets for a in ("--set", s)]


def test_a_later_stage_starts_from_a_saved_model_of_the_same_recipe(tmp_path, capsys):
    """``--init M --start settle`` equals the whole recipe run at once; a model of another recipe is refused with what
    differs.
    """
    train_main(tiny_recipe(tmp_path, "base"))  # align, lvlm, robust (settle off)
    whole = tiny_recipe(tmp_path, "whole", "settle.steps=2")
    train_main(whole)
    train_main(
        tiny_recipe(tmp_path, "later", "settle.steps=2")
        + ["--init", str(tmp_path / "base" / "out"), "--start", "settle"]
    )
    a = torch.load(tmp_path / "whole" / "work" / "settle" / "done.pt", weights_only=True)
    b = torch.load(tmp_path / "later" / "work" / "settle" / "done.pt", weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # the saved model round-trips through safetensors
    assert not (tmp_path / "later" / "work" / "lvlm").exists()  # earlier stages were not trained again
    with pytest.raises(SystemExit) as exit_:
        train_main(
            tiny_recipe(tmp_path, "other", "settle.steps=2", "lvlm.lr=0.01")
            + ["--init", str(tmp_path / "base" / "out"), "--start", "settle"]
        )
    assert exit_.value.code == 2
    assert re.search(
        r"error: .*was not trained by this recipe's stages before 'settle' \(differs in: lvlm\)",
        capsys.readouterr().err,
    )
    with pytest.raises(SystemExit):
        train_main(whole + ["--start", "settle"])
    assert "--start and --init go together" in capsys.readouterr().err


def test_layer_masks_close_dropped_columns_from_their_layer_on():
    """Hand-made mask: sample 0 drops positions 1 and 2 before layer 1; sample 1 drops nothing."""
    base = isolation_mask(torch.zeros(2, 4, dtype=torch.long))
    masks = layer_masks(base, [(1, torch.tensor([1, 2])), (-1, torch.tensor([], dtype=torch.long))], depth=3)
    assert masks[0] is base and masks[1] is masks[2]
    open_ = masks[1][0, 0] == 0
    expected = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool
    )  # causal minus columns 1-2, diagonal kept
    assert torch.equal(open_, expected)
    assert torch.equal(masks[1][1], base[1])


def test_draw_drop_asks_only_about_the_objects_that_keep_a_token():
    """Drops keep a share of the tokens, whole blocks or whole objects; the visible objects are exactly those with a
    kept token.
    """
    image, objects, _ = get_benchmark("digits").scene("train", 11)
    assert len(objects) >= 2
    evidence = [set(o.evidence()) for o in objects]
    seen_partial = False
    for kind in ("tokens", "blocks", "objects"):
        for seed in range(30):
            drop, visible = draw_drop(objects, random.Random(seed), (0.05, 0.5), {kind: 1.0}, [1, 2])
            kept = set(drop.kept.nonzero().flatten().tolist())
            assert drop.layer in (1, 2) and 1 <= len(kept) <= (128 if kind == "tokens" else 256)
            assert visible == [o for o, ev in zip(objects, evidence) if kept & ev] and visible
            seen_partial |= len(visible) < len(objects)
            if kind == "objects":
                assert all(ev <= kept or not ev & kept for ev in evidence)  # whole objects or nothing of them
    assert seen_partial
    drop, _ = draw_drop(
        objects, random.Random(0), (0.001, 0.001), {"blocks": 1.0}, [2]
    )  # one block, redrawn until an object is in it
    assert int(drop.kept.sum()) == 16
    for seed in range(10):  # all_objects=1: every object kept whole, the count question's evidence
        drop, visible = draw_drop(objects, random.Random(seed), (0.05, 0.5), {"objects": 1.0}, [2], all_objects=1.0)
        assert visible == list(objects) and set().union(*evidence) <= set(drop.kept.nonzero().flatten().tolist())
    with pytest.raises(ValueError, match=r"Unknown drop kinds \['cells'\]; known: \['tokens', 'blocks', 'objects'\]"):
        draw_drop(objects, random.Random(0), (0.1, 1.0), {"cells": 1.0}, [2])
    with pytest.raises(ValueError, match=r"token_keep must be \[low, high\]"):
        draw_drop(objects, random.Random(0), (0.0, 1.0), {"tokens": 1.0}, [2])


def test_a_training_drop_equals_the_engine_dropping_the_same_tokens():
    """Closing dropped tokens' columns from layer 2 in training gives the logits the engine gives when it removes them
    before layer 2.
    """
    processor = build_processor()
    torch.manual_seed(0)
    model = build_model(ProxyConfig(hidden=32, intermediate=64, layers=4, vision_hidden=32), processor.tokenizer).eval()
    module = ConversationModule(model, processor, StageConfig(lr=1e-3, vision_lr=1e-3, steps=1, isolated=True))
    image, objects, _ = get_benchmark("digits").scene("train", 4)
    ids, labels, segments, positions = conversation(processor, objects, random.Random(2), turns=1, isolated=True)
    kept = torch.zeros(256, dtype=torch.bool)
    kept[torch.randperm(256, generator=torch.Generator().manual_seed(0))[:40]] = True
    pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    t = lambda x: torch.tensor([x])  # noqa: E731
    with torch.no_grad():
        logits = module.forward_with_drops(
            t(ids), t(labels), pixels, t(segments), t(positions), [VisionDrop(2, kept)]
        ).logits[0]
    answer = next(i for i, l in enumerate(labels) if l != -100)
    lvlm = LVLM(model, processor)
    inputs = lvlm.prepare([lvlm.format_prompt(processor.tokenizer.decode(ids[257 : answer - 1]))], [[image]])
    assert inputs["input_ids"][0].tolist() == ids[:answer]
    keep = Method(
        "given",
        keep=tuple(kept.nonzero().flatten().tolist()),
        schedule=Schedule.one_shot(2, 40, keep_mode="absolute", min_keep=0),
    )
    engine = lvlm.generate_from_inputs(inputs, keep, max_new_tokens=1).first_logits[0]
    torch.testing.assert_close(logits[answer - 1], engine, atol=1e-4, rtol=0)
    full = lvlm.generate_from_inputs(inputs, Method.none(), max_new_tokens=1).first_logits[0]
    assert (full - engine).abs().max() > 1e-3  # the drop changed the answer's logits
