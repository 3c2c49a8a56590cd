"""The proxy's training: the recipe's configs, the Lightning modules and callbacks, and ``train``.

Stages (``configs/proxy.yaml``; the recipe and its history are in ``docs/proxy.md``):

1. ``align``: the vision tower and projector learn to emit, for every patch, a token close to the
   (frozen) LLM input embeddings of what is there: the digit word (or ``none``), its colour and the
   row/column words of its grid cell — the vision tokens "speak the LLM's vocabulary".
2. ``lvlm``: the whole model on conversations about the image (``data.conversation``), input
   embeddings frozen so the alignment keeps its meaning; half of the conversations lose vision
   tokens before decoder layer 1 or 2 (``drops.draw_drop``) and are answered from what survives.
3. ``robust``: the same again, a second learning-rate cycle with more whole-object drops.
4. ``settle``: a short cycle in which every decoder layer trains, the layers frozen until then at
   their own learning rate (``frozen_lr``).
5. ``video`` (off in the shipped recipe): clips beside the image conversations (``video``).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

from experiments.proxy.check import bar_table, layer_changes
from experiments.proxy.data import (
    AUX_TURNS,
    SceneStream,
    as_list,
    conversation,
    isolation_mask,
    pad_conversations,
    patch_words,
)
from experiments.proxy.drops import check_drop_settings, draw_drop, drop_masks
from experiments.proxy.model import FRAME_WORDS, VISION_TOKENS, ProxyConfig, build_model, build_processor
from experiments.proxy.video import VIDEO_AUX_TURNS, ClipStream, video_loss
from v2drop.benchmarks.digits import FRAMES
from v2drop.config import config_to_dict, load_config

STAGES = ("align", "lvlm", "robust", "settle", "video")  # in training order
STAGE_SEEDS = {
    "align": 0,
    "lvlm": 1,
    "robust": 2,
    "video": 3,
    "settle": 4,
}  # a stage's data seed is offset by this (fixed when a stage is added)


@dataclass
class StageConfig:
    """One training stage (``configs/proxy.yaml``: ``align``, ``lvlm``, ``robust``, ``settle`` and ``video``)."""

    steps: int = 300  # optimiser steps (0: skip the stage)
    batch: int = 32  # scenes per step
    lr: float = 3e-3  # peak learning rate (one-cycle schedule)
    vision_lr: float = 1e-4  # peak learning rate of tower + projector (conversation stages)
    # conversation stages: keep the recipe's ``frozen_decoder_layers`` frozen (False: train them at ``frozen_lr``)
    frozen: bool = True
    frozen_lr: float = 0.0  # with ``frozen: false``: peak learning rate of the otherwise frozen first decoder layers
    # [low, high] share of vision tokens kept by a drop, whose conversation asks about what survives (None: no drops)
    token_keep: list | None = None
    turns: int = 5  # questions per conversation: one per family, then more retrieval questions
    isolated: bool = False  # each turn sees only the image prefix and itself (no answer leaks between turns)
    aux: list = field(
        default_factory=list
    )  # dense auxiliary turns after the questions (``data.AUX_TURNS``), e.g. [digits]
    # share of ident questions asked about a digit sharing its column with another, or an empty cell there
    # (``data.column_mate_question``)
    ident_mates: float = 0.0
    drop_kinds: dict = field(
        default_factory=lambda: {"tokens": 1.0}
    )  # drop shapes and their weights: tokens, blocks, objects (``drops.draw_drop``)
    drop_share: float = 0.5  # share of the conversations given a vision-token drop (when token_keep is set)
    drop_layers: list = field(
        default_factory=lambda: [0]
    )  # decoder layers a drop happens before (drawn uniformly; 0 = the input)
    all_objects: float = 0.0  # in an "objects" drop, probability that every object is kept (else each with even odds)
    content_ce: float = 0.0  # align stage: logit scale of the per-patch content-word cross-entropy (0: regression only)
    clips: int = 0  # video stage: clips per step, beside ``batch`` scenes
    frames: list = field(default_factory=lambda: [1, FRAMES])  # video stage: [min, max] frames per clip, drawn per step
    video_turns: int = 3  # video stage: questions per clip (one per family, then more frame/first questions)
    video_aux: list = field(
        default_factory=list
    )  # video stage: dense auxiliary turns after the questions (``video.VIDEO_AUX_TURNS``)
    frame_tags: float = 0.0  # video stage: weight of ``video.frame_tag_loss`` (0: none)
    frame_tag_layer: int = 1  # video stage: the decoder layer whose input the frame tags are read from

    def __post_init__(self):
        if self.token_keep is not None:
            check_drop_settings(self.token_keep, self.drop_kinds)
        for key, value, known in (("aux", self.aux, AUX_TURNS), ("video_aux", self.video_aux, VIDEO_AUX_TURNS)):
            if set(value) - set(known):
                raise ValueError(
                    f"{key} {list(value)} names unknown turns {sorted(set(value) - set(known))}; known: {list(known)}"
                )


@dataclass
class TrainConfig:
    """The whole recipe (``configs/proxy.yaml``)."""

    seed: int = 0  # everything (scenes, initialisation) follows from it
    output: str = "v2drop/assets/proxy"  # where the trained model and processor are saved
    workdir: str = "runs/proxy"  # checkpoints and logs
    threads: int = 2  # torch CPU threads
    precision: str = "32-true"  # Lightning precision (bf16 autocast is 10x slower on CPUs without bf16 units)
    model: ProxyConfig = field(default_factory=ProxyConfig)  # the model's shape
    align: StageConfig = field(default_factory=lambda: StageConfig(steps=300, batch=32, lr=3e-3))  # stage 1
    lvlm: StageConfig = field(
        default_factory=lambda: StageConfig(steps=800, batch=16, lr=1.5e-3, vision_lr=1e-4)
    )  # stage 2
    robust: StageConfig = field(
        default_factory=lambda: StageConfig(steps=600, batch=16, lr=7e-4, vision_lr=5e-5, token_keep=[0.05, 1.0])
    )  # stage 3
    settle: StageConfig = field(
        default_factory=lambda: StageConfig(steps=0, batch=16, lr=3e-4, vision_lr=0.0, frozen=False)
    )  # stage 4
    video: StageConfig = field(
        default_factory=lambda: StageConfig(steps=0, batch=8, lr=1e-3, vision_lr=0.0, clips=4)
    )  # stage 5
    # the first N decoder layers keep their initial weights in every stage whose ``frozen`` is true (docs/proxy.md)
    frozen_decoder_layers: int = 0
    checkpoint_every: int = 50  # steps between Lightning checkpoints (what an interrupted stage resumes from)
    monitor_every: int = 0  # every N steps print validation accuracy per family (0: never)
    monitor_samples: int = 100  # validation questions the monitor scores

    def __post_init__(self):
        lo, hi = self.video.frames
        if not 1 <= lo <= hi <= len(FRAME_WORDS):
            raise ValueError(
                f"video.frames must be [min, max] with 1 <= min <= max <= {len(FRAME_WORDS)}, got {[lo, hi]}"
            )


def one_cycle(opt: torch.optim.Optimizer, max_lr, steps: int):
    """Lightning's optimiser spec: ``opt`` under a per-step one-cycle schedule peaking at ``max_lr`` (one value per
    parameter group, or one for all).
    """
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, pct_start=0.05)
    return [opt], [{"scheduler": sched, "interval": "step"}]


class AlignModule(L.LightningModule):
    """Stage 1: tower + projector trained toward the summed word embeddings of each patch (everything else frozen).

    The regression is averaged over object and background patches separately (background is
    ~85% of the patches and would otherwise dominate). ``stage.content_ce`` > 0 adds, on object
    patches, a cross-entropy over the content words (digits and ``none``) with the token's dot
    products scaled by ``content_ce`` as logits: without it the tower learnt colour and position
    but not which digit a patch shows (argmax accuracy 8%, chance 10%).
    """

    def __init__(self, model, processor, stage: StageConfig):
        super().__init__()
        self.model, self.processor, self.stage = model, processor, stage
        tok = processor.tokenizer
        self.content_ids = torch.tensor([tok.convert_tokens_to_ids(w) for w in [str(d) for d in range(10)] + ["none"]])
        for p in self.model.parameters():
            p.requires_grad_(False)
        for m in (model.model.vision_tower, model.model.multi_modal_projector):
            for p in m.parameters():
                p.requires_grad_(True)

    def training_step(self, batch, batch_idx):
        """The alignment loss of a list of scenes."""
        tok, content_ce = self.processor.tokenizer, self.stage.content_ce
        pixels = self.processor.image_processor([b["image"] for b in batch], return_tensors="pt")["pixel_values"].to(
            self.device
        )
        feats = self.model.model.get_image_features(pixel_values=pixels).pooler_output
        feats = torch.stack(list(feats)).float()  # (B, 256, D)
        emb = self.model.model.get_input_embeddings().weight.detach().float()
        ids = torch.tensor(
            [[tok.convert_tokens_to_ids(w) for w in words] for b in batch for words in patch_words(b["objects"])],
            device=self.device,
        ).view(len(batch), VISION_TOKENS, 4)
        target = (emb[ids] * (ids != tok.pad_token_id)[..., None]).sum(2)  # (B, 256, D)
        error = ((feats - target) ** 2).sum(-1).div(target.pow(2).sum(-1))
        on_object = ids[..., 0] != tok.convert_tokens_to_ids("none")
        loss = 0.5 * sum(error[part].mean() for part in (on_object, ~on_object) if part.any())
        if content_ce > 0 and on_object.any():
            content_ids = self.content_ids.to(self.device)
            logits = feats[on_object] @ emb[content_ids].T * content_ce
            labels = (ids[..., 0][on_object][:, None] == content_ids).float().argmax(-1)
            loss = loss + torch.nn.functional.cross_entropy(logits, labels)
        self.log("align_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        """AdamW on the trainable parameters, one-cycle over the stage's steps."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return one_cycle(
            torch.optim.AdamW(params, lr=self.stage.lr, weight_decay=0.01), self.stage.lr, self.stage.steps
        )


class ConversationModule(L.LightningModule):
    """Stages 2–5: the LVLM trained on conversations, input embeddings frozen, the first ``frozen_layers`` decoder
    layers frozen or (``stage.frozen`` false) at ``stage.frozen_lr``.

    With ``stage.token_keep`` = [low, high], a ``stage.drop_share`` of the conversations lose vision
    tokens (``drops.draw_drop``) before a decoder layer drawn from ``stage.drop_layers`` and are
    asked about what survives; ``stage.isolated``: turns see only the image prefix
    (``data.isolation_mask``). A batch is a list of scenes, or (video stage) a dict of ``scenes``
    and ``clips`` (``video.video_loss``).
    """

    def __init__(self, model, processor, stage: StageConfig, frozen_layers: int = 0):
        super().__init__()
        self.model, self.processor, self.stage = model, processor, stage
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.model.model.get_input_embeddings().weight.requires_grad_(False)
        self.first_layers = self.model.model.language_model.layers[:frozen_layers]
        for layer in self.first_layers:
            layer.requires_grad_(not stage.frozen)

    def training_step(self, batch, batch_idx):
        """The loss of a list of scenes, or of a video step's scenes and clips."""
        if isinstance(batch, dict):
            loss = self.image_loss(batch["scenes"]) if batch["scenes"] else 0.0
            loss = loss + video_loss(self, batch["clips"])
        else:
            loss = self.image_loss(batch)
        self.log("loss", loss, prog_bar=True)
        return loss

    def image_loss(self, batch):
        """Loss of the conversations about a list of scenes."""
        stage, convs, drops = self.stage, [], []
        for b in batch:
            drop, visible = None, None
            if stage.token_keep is not None:
                rng = random.Random(f"drop-{b['rng_seed']}")
                if rng.random() < stage.drop_share and (
                    drawn := draw_drop(
                        b["objects"], rng, stage.token_keep, stage.drop_kinds, stage.drop_layers, stage.all_objects
                    )
                ):
                    drop, visible = drawn[0], {o.label for o in drawn[1]}
            convs.append(
                conversation(
                    self.processor,
                    b["objects"],
                    random.Random(b["rng_seed"]),
                    stage.turns,
                    stage.isolated,
                    stage.aux,
                    visible,
                    stage.ident_mates,
                )
            )
            drops.append(drop)
        ids, labels, segments, positions = pad_conversations(convs, self.processor.tokenizer.pad_token_id)
        pixels = self.processor.image_processor([b["image"] for b in batch], return_tensors="pt")["pixel_values"]
        return self.forward_with_drops(ids, labels, pixels, segments, positions, drops).loss

    def forward_with_drops(self, ids, labels, pixels, segments, positions, drops, hidden_states: bool = False):
        """The model on whole conversations (``segments``: 0 prefix, k turn k, -1 padding), each sample's ``VisionDrop``
        (or None) applied by per-layer masks.
        """
        base = isolation_mask(segments, torch.float32)
        decoder = self.model.model.language_model
        masks = drop_masks(
            ids, self.processor.tokenizer.convert_tokens_to_ids("<image>"), drops, base, len(decoder.layers)
        )
        # The decoder layers take the mask as a keyword: each layer gets its own through a pre-hook.
        hooks = [
            layer.register_forward_pre_hook(
                lambda mod, args, kwargs, m=m: (args, {**kwargs, "attention_mask": m.to(self.device)}), with_kwargs=True
            )
            for layer, m in zip(decoder.layers, masks)
            if m is not base
        ]
        try:
            return self.model(
                input_ids=ids.to(self.device),
                pixel_values=pixels.to(self.device),
                attention_mask=base.to(self.device),
                position_ids=positions.to(self.device),
                labels=labels.to(self.device),
                output_hidden_states=hidden_states,
            )
        finally:
            for hook in hooks:
                hook.remove()

    def configure_optimizers(self):
        """AdamW with the tower + projector at ``stage.vision_lr``, unfrozen first layers at ``stage.frozen_lr`` and the
        rest at ``stage.lr``, one-cycle over the stage's steps.
        """
        vision = list(self.model.model.vision_tower.parameters()) + list(
            self.model.model.multi_modal_projector.parameters()
        )
        first = [p for p in self.first_layers.parameters() if p.requires_grad]
        special = {id(p) for p in vision + first}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in special]
        groups, lrs = (
            [{"params": rest, "lr": self.stage.lr}, {"params": vision, "lr": self.stage.vision_lr}],
            [self.stage.lr, self.stage.vision_lr],
        )
        if first:  # a group of its own only when it trains, so the optimiser of a frozen-layer stage is as before
            groups.append({"params": first, "lr": self.stage.frozen_lr})
            lrs.append(self.stage.frozen_lr)
        opt = torch.optim.AdamW(groups, weight_decay=0.05, betas=(0.9, 0.98))
        return one_cycle(opt, lrs, self.stage.steps)


class PrintLoss(L.Callback):
    """Prints the step, loss and elapsed time every ``every`` steps and at the last (for logs without a TTY)."""

    def __init__(self, stage: str, every: int = 25):
        self.stage, self.every, self.start = stage, every, time.time()

    def on_train_start(self, trainer, pl_module):
        """Start the clock."""
        self.start = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Print every ``every`` steps."""
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            print(
                f"[{self.stage}] step {step}/{trainer.max_steps} loss {loss:.4f} {time.time() - self.start:.0f}s",
                flush=True,
            )


class Monitor(L.Callback):
    """Prints the bar conditions (full, evidence, random) on ``n`` validation questions of each benchmark, and each
    decoder layer's change to the vision tokens, every ``every`` steps.
    """

    def __init__(self, processor, every: int, n: int, benchmarks=("digits",)):
        from v2drop.benchmarks import get_benchmark

        self.processor, self.every = processor, every
        self.sets = [(bench, bench.load("validation", n)) for bench in map(get_benchmark, benchmarks)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Every ``every`` steps: the bar table of each benchmark, then back to training mode."""
        from v2drop.lvlm import LVLM

        if trainer.global_step % self.every:
            return
        for bench, samples in self.sets:
            with torch.no_grad():
                lvlm = LVLM(pl_module.model, self.processor)
                table = bar_table(
                    lvlm, bench, samples, layer=min(2, lvlm.depth - 1), conditions=("full", "evidence", "random")
                )
            for name, row in table.items():
                print(
                    f"[monitor] step {trainer.global_step} {bench.name} {name:<8} "
                    + " ".join(f"{k} {v:.2f}" for k, v in row.items()),
                    flush=True,
                )
            changes = layer_changes(lvlm, samples[:20])
            print(
                f"[monitor] step {trainer.global_step} {bench.name} layer changes "
                + " ".join(f"{c:.1f}" for c in changes),
                flush=True,
            )
        pl_module.model.train()


def train(
    cfg: TrainConfig,
    resume: bool = True,
    progress: bool = True,
    init: str | Path | None = None,
    start: str | None = None,
) -> Path:
    """Run the stages (resuming from the last checkpoint of each) and save the model, the processor and the resolved
    recipe.

    ``start`` (with ``init``, a saved proxy): begin at stage ``start`` from ``init``'s weights
    instead of training the stages before it; ``init`` must have been trained by this very recipe
    up to there (``load_earlier_stages``).
    """
    torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True)
    processor = build_processor()
    model = build_model(cfg.model, processor.tokenizer)
    stages = STAGES
    if start is not None:
        load_earlier_stages(cfg, model, init, start)
        stages = STAGES[STAGES.index(start) :]
    for name in stages:
        if getattr(cfg, name).steps > 0:
            train_stage(cfg, name, model, processor, resume, progress)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "train_config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    started = out / "started_from.json"  # provenance: which saved model stood in for the earlier stages
    if start is not None:
        started.write_text(json.dumps({"start": start, "init": str(init)}, indent=1))
    elif started.exists():
        started.unlink()
    return out


def load_earlier_stages(cfg: TrainConfig, model, init: str | Path, start: str) -> None:
    """Load into ``model`` the weights of the saved proxy ``init`` (bundled name or directory), refusing one not trained
    by ``cfg``'s stages before ``start``.
    """
    from transformers import LlavaForConditionalGeneration

    from v2drop.bundled import LOCAL_MODELS

    if start not in STAGES:
        raise ValueError(f"unknown stage {start!r}; stages: {list(STAGES)}")
    path = Path(LOCAL_MODELS.get(str(init), init))
    if not (path / "train_config.json").is_file():
        raise ValueError(
            f"{init!r} is not a saved proxy (no {path / 'train_config.json'}): its recipe cannot be checked"
        )
    saved = load_config(TrainConfig, path / "train_config.json")
    earlier = STAGES[: STAGES.index(start)]
    theirs, ours = stage_record(saved, earlier), stage_record(cfg, earlier)
    diff = [k for k in ours if theirs[k] != ours[k]]
    diff += [f"{n} (trained)" for n in STAGES[STAGES.index(start) :] if getattr(saved, n).steps > 0]
    if diff:
        raise ValueError(
            f"{init!r} was not trained by this recipe's stages before {start!r} (differs in: {', '.join(diff)}); "
            "train from scratch or use the model those stages produced"
        )
    model.load_state_dict(LlavaForConditionalGeneration.from_pretrained(path).state_dict())


def train_stage(cfg: TrainConfig, name: str, model, processor, resume: bool = True, progress: bool = True) -> None:
    """Train stage ``name`` in place (or load its finished weights), checkpointing under ``{workdir}/{name}``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    stage, work = getattr(cfg, name), Path(cfg.workdir) / name
    done, last = work / "done.pt", work / "checkpoints" / "last.ckpt"
    check_stage_record(work / "stage.json", cfg, name, resume)
    if resume and done.exists():
        model.load_state_dict(torch.load(done, weights_only=True))
        return
    module = (
        AlignModule(model, processor, stage)
        if name == "align"
        else ConversationModule(model, processor, stage, cfg.frozen_decoder_layers)
    )
    callbacks = [
        ModelCheckpoint(dirpath=last.parent, save_last=True, every_n_train_steps=cfg.checkpoint_every, save_top_k=0),
        PrintLoss(name),
    ]
    if cfg.monitor_every and name != "align":
        callbacks.append(
            Monitor(
                processor,
                cfg.monitor_every,
                cfg.monitor_samples,
                ("digits", "digits-video") if name == "video" else ("digits",),
            )
        )
    trainer = L.Trainer(
        max_steps=stage.steps,
        accelerator="cpu",
        devices=1,
        precision=cfg.precision,
        logger=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        log_every_n_steps=10,
        callbacks=callbacks,
    )
    resuming = resume and last.exists()
    # Lightning cannot fast-forward an iterable stream: start it where the checkpoint stopped,
    # so an interrupted stage sees the scenes an uninterrupted one would (scenes are seeded by index).
    done_steps = torch.load(last, map_location="cpu", weights_only=False)["global_step"] if resuming else 0
    trainer.fit(
        module, train_dataloaders=stage_loader(cfg, name, done_steps), ckpt_path=str(last) if resuming else None
    )
    done.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), done)


def stage_loader(cfg: TrainConfig, name: str, done_steps: int = 0) -> torch.utils.data.DataLoader:
    """The seeded data of stage ``name`` from step ``done_steps`` on: lists of scenes, or (video) dicts of scenes and
    clips.
    """
    stage, seed = getattr(cfg, name), cfg.seed + STAGE_SEEDS[name] * 10**6
    if name == "video":
        return torch.utils.data.DataLoader(
            ClipStream(seed, stage.batch, stage.clips, stage.frames, start=done_steps),
            batch_size=None,
            collate_fn=as_list,
        )
    return torch.utils.data.DataLoader(
        SceneStream(seed, start=done_steps * stage.batch), batch_size=stage.batch, collate_fn=as_list
    )


def stage_record(cfg: TrainConfig, stages) -> dict:
    """What weights trained through ``stages`` depend on: the seed, the model shape, the frozen layers and each of those
    stages' settings (JSON-normalised).
    """
    record = {"seed": cfg.seed, "model": config_to_dict(cfg.model), "frozen_decoder_layers": cfg.frozen_decoder_layers}
    record.update({n: config_to_dict(getattr(cfg, n)) for n in stages})
    return json.loads(json.dumps(record))  # tuples -> lists, as read back


def check_stage_record(path: Path, cfg: TrainConfig, name: str, resume: bool) -> None:
    """Record what a stage's checkpoints were trained with; refuse to resume them under a different recipe.

    A stage's weights depend on the seed, the model shape, its own settings and every earlier
    stage's, so those are what must match.
    """
    record = stage_record(cfg, STAGES[: STAGES.index(name) + 1])
    if resume and path.exists():
        saved = json.loads(path.read_text())
        if saved != record:
            diff = sorted(k for k in set(saved) | set(record) if saved.get(k) != record.get(k))
            raise ValueError(
                f"{path.parent} was trained with different settings ({', '.join(diff)}); "
                "use another workdir or --fresh to start over"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
