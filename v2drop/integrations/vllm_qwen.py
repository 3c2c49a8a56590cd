"""The vLLM plugin's Qwen2-VL and Qwen2.5-VL models: v2drop's pre-LLM methods on every image, with the engine's M-RoPE.

Registered by ``v2drop.integrations.vllm.register`` next to the LLaVA model, and used, as that one, only when
an engine asks through ``hf_overrides``::

    llm = vllm.LLM(model=path, **qwen_engine_args("divprune-llava15-64", "qwen2_vl"), dtype="float32")
    # {"hf_overrides": {"architectures": ["V2DropQwen2VLForConditionalGeneration"],
    #                   "v2drop_method": {... the method as config data, keep 0.111 of each image ...}}}

The architectures are vLLM's ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` plus,
for a method with one pre-LLM stage (``check_qwen_method``):

- **Placeholders**: each image's ``<|image_pad|>`` run is the stage's kept count of the image's
  ``grid_thw.prod() // merge_size**2`` tokens (vLLM's prompt update is cut to it); for ``frame_pool`` and ``pool``
  the cells of the grid the image's merged grid is pooled to (``item_kept_count``).
- **Kept rows**: the vision tower's merged output of each image, cut to the rows the method's scorer keeps,
  chosen by the engine's own drop stage (``v2drop.engine.stages.drop``) on the image alone, its tokens laid
  on the image's merged grid (frame, row, column) as the engine lays them (``Adapter.vision_coords``).
- **M-RoPE positions** (``get_mrope_input_positions``), as the engine gives them for the method's
  ``position_policy``: ``renumber`` numbers the whole prompt 0..n-1 on all three rows (the engine renumbers
  every token after a drop) and decoding continues from n; ``preserve`` gives every kept token its position
  in the unpruned prompt (the image's 3-D grid positions, text after an image continuing from the unpruned
  grid's largest position + 1) and decoding continues from the largest + 1. vLLM fixes a request's
  positions before its images are encoded, so ``preserve`` needs a kept set known from the grid alone:
  ``uniform`` and ``position``; DivPrune (it reads the features) runs with ``renumber`` only.

Budgets: the keep value of the stage applies per image (``Schedule.kept_count`` of that image's tokens), the
engine's per sample, so the two agree on one image per prompt. Qwen's images have a variable token count, so
``qwen_method`` turns the absolute counts of a preset written for LLaVA-1.5's 576 tokens (``divprune-llava15-64``)
into the same share of every image (``Schedule.to_relative(reference_vision_tokens)``: 64 / 576 = 0.111, each
image keeps ``max(1, floor(n * 0.111))``); a relative keep is a fixed fraction as it is, and absolute counts of
a method given as data stay counts per image (at most the image's tokens).

Without torchvision (the CPU environments) images only: ``register`` points transformers'
``image_processing_qwen2_vl`` at its PIL twin, and the processing info builds Qwen's processor without its
video processor (which needs torchvision) and leaves videos out of the modality limits. With torchvision a
video's embeddings are pruned as one item (all its frames) in the same way; that path is untested.

Scorers (``QWEN_SUPPORTED_SCORERS``): ``uniform``, ``position``, ``random``, ``given``, ``divprune``, ``cdpruner``,
``vidcom2`` (an image is one frame), ``frame_pool`` and ``pool``. For ``cdpruner`` the processor hands every image its
prompt's instruction ids after the last ``<|image_pad|>`` / ``<|video_pad|>``, as for LLaVA-1.5 (the model embeds them
with the LLM's input embeddings); for ``random`` its prompt's seed, the engine's ``sample_keys`` of the prompt with
every ``<|image_pad|>`` expanded to its image's token count (``expanded_sample_key``; a per-image multimodal field
``SAMPLE_KEY`` that also enters the images' cache keys); both images only. Refused with the reason
(``QWEN_REFUSED_SCORERS``): VisionZip, VisPruner, HiPrune, HoloV (Qwen's tower has no [CLS] token, as in the engine),
HoliTom and FastVID (kept count not fixed by the budget), ``frames`` (one image is one frame), ``downsample``
(re-encoding), FlowCut and VScan (vision-encoder stages), ``composite`` and ``staged`` before the LLM. Decoder
stages (every stage in the decoder) scored by V²Drop, FastV, PDrop or composites of them (not SparseVLM: LLaVA-1.5
only, ``vllm_inllm.check_qwen``) run in the in-LLM
architectures of ``v2drop.integrations.vllm_inllm`` (``QWEN_ARCHITECTURES`` there; FastV's and PDrop's attention
rows recomputed with the layers' own M-RoPE, ``v2drop.integrations.vllm_attention``), which ``qwen_engine_args``
picks and ``register`` registers; they share this module's processing (``processing_classes``: every image token
kept).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import time
import types

import numpy as np
import torch

from v2drop.integrations.vllm import (
    INSTRUCTION_KEY,
    INSTRUCTION_SCORERS,
    METHOD_KEY,
    REFUSED_SCORERS,
    SAMPLE_KEY,
    expanded_sample_key,
    instruction_field,
    instruction_ids,
    instruction_rows,
    resolve,
    use_twin_module,
)
from v2drop.integrations.vllm import kept_per_image as kept_count  # an item's kept count under a method
from v2drop.integrations.vllm_inllm import QWEN_ARCHITECTURES as QWEN_INLLM_ARCHITECTURES
from v2drop.integrations.vllm_inllm import check_qwen, runs_in_llm

# vLLM's architecture -> the plugin's architecture running v2drop's pre-LLM methods on it
QWEN_ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "V2DropQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "V2DropQwen2_5_VLForConditionalGeneration",
}
FAMILIES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
# scorers the Qwen models run: pre-LLM scorers of the image's own tokens (and, for ``INSTRUCTION_SCORERS``, its prompt's
# instruction; for ``random``, its prompt's seed) with a kept count fixed by the budget and the image's grid
QWEN_SUPPORTED_SCORERS = (
    "uniform",
    "position",
    "random",
    "given",
    "divprune",
    "cdpruner",
    "vidcom2",
    "frame_pool",
    "pool",
)
# Why the other pre-LLM scorers are refused on Qwen (a scorer not named here: it scores inside the decoder)
QWEN_REFUSED_SCORERS = {
    **{
        name: "it reads the vision tower's [CLS] token, and the Qwen2-VL / Qwen2.5-VL tower has no [CLS] token "
        "(v2drop's engine refuses it on these families too)"
        for name in ("visionzip", "vispruner", "hiprune", "holov")
    },
    "holitom": REFUSED_SCORERS["holitom"],
    "fastvid": REFUSED_SCORERS["fastvid"],
    "frames": REFUSED_SCORERS["frames"],
    "downsample": "it re-encodes a smaller image, and Qwen's processor sets an image's token count (v2drop's engine "
    "cannot re-encode these families either)",
    **{
        name: "it combines other scorers, which the plugin's Qwen models do not run as one (use its parts by name)"
        for name in ("composite", "staged")
    },
    **{
        name: "it runs inside the vision encoder (vision-encoder stages), which v2drop's engine runs on LLaVA-1.5 only"
        for name in ("flowcut", "vscan")
    },
}
POOLING_SCORERS = ("frame_pool", "pool")  # scorers whose kept count is the cells of the pooled grids of an item
GRID_SCORERS = ("uniform", "position")  # scorers whose kept set follows from the token grid alone (``preserve``)
_QWEN_IMAGE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_MODULES = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}


def register() -> None:
    """Register the Qwen2-VL / Qwen2.5-VL architectures with vLLM (the PIL image processor first if needed)."""
    use_pil_qwen2vl_image_processor()
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for arch in QWEN_ARCHITECTURES.values():
        if arch not in supported:
            ModelRegistry.register_model(arch, f"{__name__}:{arch}")
    for arch in QWEN_INLLM_ARCHITECTURES.values():  # decoder stages (v2drop/integrations/vllm_inllm.py)
        if arch not in supported:
            ModelRegistry.register_model(arch, f"v2drop.integrations.vllm_inllm:{arch}")


def use_pil_qwen2vl_image_processor() -> bool:
    """Make ``transformers.models.qwen2_vl.image_processing_qwen2_vl`` its PIL twin when torchvision is missing.

    The twin module (``image_processing_pil_qwen2_vl``: ``smart_resize``, ``Qwen2VLImageProcessorPil``) also
    answers to ``Qwen2VLImageProcessor``, the name vLLM's Qwen2-VL module imports. Returns True when redirected.
    """
    return use_twin_module(_QWEN_IMAGE, _pil_qwen2vl_twin)


def _pil_qwen2vl_twin() -> types.ModuleType:
    """transformers' PIL Qwen2-VL image-processor module, also answering to ``Qwen2VLImageProcessor``."""
    pil = importlib.import_module("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    twin = types.ModuleType(_QWEN_IMAGE, pil.__doc__)
    twin.__dict__.update({k: v for k, v in vars(pil).items() if k not in ("__name__", "__doc__")})
    twin.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil
    return twin


def qwen_method(spec):
    """The Method ``spec`` names (preset, ``scorer:preset``, YAML, config data, Method or ``"none"``), with a preset's
    absolute keep counts turned into the same share of each image (of the preset's ``reference_vision_tokens``)."""
    from v2drop.method import Method, resolve_method
    from v2drop.presets import get_preset, list_presets

    preset = None
    if isinstance(spec, str) and spec in list_presets():
        method, preset = resolve(spec), spec
    elif isinstance(spec, str) and ":" in spec and spec.partition(":")[2] in list_presets():
        scorer, _, preset = spec.partition(":")  # a scorer on a preset's schedule (as experiments.serve_bench reads)
        method = resolve_method(scorer, preset)
    else:
        method = resolve(spec)
    if preset is not None and method.drops and method.schedule.keep_mode == "absolute":
        data = method.to_dict()
        data["schedule"] = method.schedule.to_relative(get_preset(preset).reference_vision_tokens).to_dict()
        method = Method.from_dict(data)
    return method


def qwen_engine_args(method="none", family: str = "qwen2_vl") -> dict:
    """``vllm.LLM`` keyword arguments running ``method`` on a Qwen2-VL (``family`` ``qwen2_vl``) or Qwen2.5-VL
    (``qwen2_5_vl``) checkpoint in the plugin; the method goes as config data (``qwen_method``). A method whose stages
    all sit before decoder layers (V²Drop's, FastV's, PDrop's) gets the in-LLM architecture
    (``vllm_inllm.QWEN_ARCHITECTURES``), which needs chunked prefill and prefix caching off
    (``vllm_inllm.ENGINE_KWARGS``)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    method = qwen_method(method)
    check_qwen_method(method)  # fail here, with the reason, rather than inside vLLM's engine process
    architectures = QWEN_INLLM_ARCHITECTURES if runs_in_llm(method) else QWEN_ARCHITECTURES
    return {
        "hf_overrides": {
            "architectures": [architectures[FAMILIES[family]]],
            METHOD_KEY: method.to_dict() if method.drops else "none",
        }
    }


def family_of(model: str) -> str | None:
    """``qwen2_vl`` / ``qwen2_5_vl`` for a checkpoint (path or hub id) of those families, else None."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model).model_type
    return model_type if model_type in FAMILIES else None


def engine_args_for(model: str, method) -> dict:
    """The plugin's ``vllm.LLM`` keyword arguments for ``method`` on checkpoint ``model``: the Qwen models'
    (``qwen_engine_args``) for Qwen2-VL / Qwen2.5-VL, the LLaVA model's (``engine_args``) otherwise."""
    from v2drop.integrations.vllm import engine_args

    family = family_of(model)
    if family is not None:
        return qwen_engine_args(method, family)
    return engine_args(method.to_dict() if method.drops else "none")


def check_qwen_method(method) -> None:
    """Raise ValueError, with the reason, unless the plugin's Qwen models can run ``method``."""
    from v2drop.integrations.vllm import check_method
    from v2drop.schedule import PRE_LLM

    if not method.drops:
        return
    if runs_in_llm(method):  # only decoder stages: the in-LLM architecture's rules (SparseVLM: LLaVA-1.5 only)
        check_method(method)
        check_qwen(method)
        return
    if method.scorer_name not in QWEN_SUPPORTED_SCORERS:
        reason = QWEN_REFUSED_SCORERS.get(
            method.scorer_name, "it scores an image from more than its own vision tokens (decoder attention)"
        )
        raise ValueError(
            f"Scorer {method.scorer_name!r} is not supported by the vLLM plugin's Qwen2-VL / Qwen2.5-VL models: "
            f"{reason}; supported: {', '.join(QWEN_SUPPORTED_SCORERS)}"
        )
    layers = [s.layer for s in method.schedule.stages]
    if layers != [PRE_LLM]:
        check_method(method)  # the LLaVA plugin's reason: decoder and pre-LLM stages in one method
    if method.position_policy != "renumber" and method.scorer_name not in GRID_SCORERS:
        raise ValueError(
            f"Method {method.scorer_name!r} keeps the original position ids (position_policy 'preserve'), which "
            "depend on the kept set; vLLM fixes a request's M-RoPE positions before its images are encoded, so "
            "'preserve' runs only with scorers whose kept set follows from the token grid "
            f"({', '.join(GRID_SCORERS)}); use position_policy 'renumber' (as the pre-LLM presets do)"
        )


@functools.cache
def _checked(spec: str):
    """The checked Method of a JSON-encoded ``v2drop_method`` value (cached: the processor asks per item)."""
    method = resolve(json.loads(spec))
    check_qwen_method(method)
    return method


def _method_of(config):
    """The checked Method named by an hf config's ``v2drop_method``."""
    return _checked(json.dumps(getattr(config, METHOD_KEY, None), sort_keys=True))


def item_kept_count(method, grid: tuple[int, int, int]) -> int:
    """Tokens an item of merged ``grid`` (frames, rows, columns) keeps under ``method``, as the engine keeps them: the
    stage's count of its tokens (``kept_count``); for the pooling scorers (``POOLING_SCORERS``) the cells of the grids
    each frame is pooled to (``pool``: ``target_grid`` of the frame's proportional share; ``frame_pool``:
    ``pooled_grid`` of its equal share)."""
    from v2drop.scorers.controls import proportional_share, target_grid
    from v2drop.scorers.frame_controls import pooled_grid
    from v2drop.scorers.vispruner import share

    t, h, w = grid
    n = t * h * w
    if not method.drops or method.scorer_name not in POOLING_SCORERS:
        return kept_count(method, n)
    k = method.schedule.kept_count(0, n, n)
    if k >= n:
        return n
    if method.scorer_name == "pool":
        cells = [target_grid(h, w, k_frame) for k_frame in proportional_share(k, [h * w] * t)]
        return sum(min(r * c, h * w) for r, c in cells)
    cells = [pooled_grid(max(1, k_frame), h, w) for k_frame in share(max(t, min(k, n)), t)]
    return sum(r * c for r, c in cells)


def prune_item(
    method,
    features: torch.Tensor,
    grid: tuple[int, int, int],
    project=None,
    instruction: torch.Tensor | None = None,
    sample_key: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """The pre-LLM stage of ``method`` on one image's (or video's) merged features (N, D) alone: (k, D) and the trace.

    ``grid`` is (frames, rows, columns) of the merged tokens (``grid_thw`` over the spatial merge), in the
    raster order of the features; every token gets the grid coordinates the engine gives it, and the engine's
    ``drop`` runs the stage, so the kept rows (ascending) are the engine's for a sample with that one item.
    ``instruction`` (m, D), the LLM's input embeddings of the item's prompt instruction, follows the item's tokens
    as text (CDPruner reads it; required for ``INSTRUCTION_SCORERS``). ``sample_key`` is the engine's seed of the
    item's prompt (``expanded_sample_key``; ``random`` reads it, and requires it).
    The trace is the engine's ``{"layer": -1, "kept": [...]}`` with the item's token indices.
    """
    from v2drop.engine.sequence import Sequence
    from v2drop.engine.stages import StageContext, drop
    from v2drop.integrations.vllm import INSTRUCTION_SCORERS, _Projector, _Trace
    from v2drop.schedule import PRE_LLM

    t, h, w = grid
    n = features.shape[0]
    if n != t * h * w:
        raise ValueError(f"An item of grid {grid} has {t * h * w} merged tokens, got {n} feature rows")
    if instruction is None and method.scorer_name in INSTRUCTION_SCORERS:
        raise ValueError(
            f"Scorer {method.scorer_name!r} scores an item against its prompt's instruction, which the plugin hands "
            "to image items only (not to videos)"
        )
    if sample_key is None and method.scorer_name == "random":
        raise ValueError(
            "Scorer 'random' draws from its prompt's seed, which the plugin hands to image items only (not to videos)"
        )
    text = instruction.to(features.dtype) if instruction is not None else features.new_zeros(0, features.shape[1])
    device = features.device
    length = n + text.shape[0]
    idx = torch.arange(length, device=device)
    grid_idx = idx.clamp(max=n - 1)  # the text's coordinates are never read
    coords = torch.stack([grid_idx // (h * w), (grid_idx // w) % h, grid_idx % w], -1)
    seq = Sequence(
        hidden=torch.cat([features, text])[None],
        position_ids=idx[None],
        attention_mask=torch.ones(1, length, dtype=torch.long, device=device),
        orig_idx=idx[None],
        vision=(idx < n)[None],
        coords=coords[None],
        block=torch.full((1, length), -1, dtype=torch.long, device=device),
    )
    trace = _Trace()
    ctx = StageContext(
        method=method,
        adapter=_Projector(project),
        stage_at={PRE_LLM: 0},
        sample_keys=torch.tensor([sample_key or 0], dtype=torch.long),
        n_vision=[n],
        traces=[trace],
        requests={PRE_LLM: None},
        queries={},
        vision=None,
        pad=torch.zeros(1, dtype=torch.long, device=device),
    )
    kept = drop(seq, PRE_LLM, None, ctx).hidden[0]
    kept = kept[: kept.shape[0] - text.shape[0]]  # the item's kept tokens, before its instruction
    if kept.shape[0] != item_kept_count(method, grid):
        raise RuntimeError(
            f"Scorer {method.scorer_name!r} left {kept.shape[0]} of {n} tokens, but the prompt holds "
            f"{item_kept_count(method, grid)} placeholders for the item"
        )
    return kept, trace.stages[0]


def grid_kept(method, grid: tuple[int, int, int]) -> list[int]:
    """The kept token indices (ascending) of an item on ``grid`` under a method whose scorer reads only the grid."""
    if not method.drops:
        return list(range(grid[0] * grid[1] * grid[2]))
    if method.scorer_name not in GRID_SCORERS:
        raise ValueError(f"Scorer {method.scorer_name!r} reads the features: its kept set is not the grid's alone")
    _, trace = prune_item(method, torch.zeros(grid[0] * grid[1] * grid[2], 1), grid)
    return list(trace["kept"])


def mrope_positions(method, n_tokens: int, items: list[tuple[int, int, int, int, float]]) -> tuple[torch.Tensor, int]:
    """(3, n_tokens) M-RoPE positions of a pruned prompt and the decoding offset, as the engine positions ``method``.

    ``items`` are ``(offset, frames, rows, columns, t_factor)`` of each image or video in the pruned prompt
    (vLLM's ``iter_mm_grid_thw``: offsets of the kept placeholder runs, grids of the unpruned items). With
    ``renumber`` (and a drop) the positions are 0..n-1 on every row and the offset 0. Otherwise each item's
    unpruned positions are vLLM's (and transformers' ``get_rope_index``): text before it continues from the
    previous largest position + 1, the item's tokens at (t * t_factor, row, column) + that start; the kept
    tokens (``grid_kept``) keep theirs. The offset is the largest position + 1 minus ``n_tokens``.
    """
    if method.drops and method.position_policy == "renumber":
        return torch.arange(n_tokens).expand(3, -1).clone(), 0
    parts, st, next_start = [], 0, 0
    for offset, t, h, w, t_factor in sorted(items):
        text = offset - st
        parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_start)
        grid = np.indices((t, h, w))
        if t_factor != 1.0:
            grid[0] = (grid[0] * t_factor).astype(np.int64)
        full = grid.reshape(3, -1) + text + next_start
        kept = grid_kept(method, (t, h, w))
        parts.append(full[:, kept])
        next_start = int(full.max()) + 1
        st = offset + len(kept)
    if st < n_tokens:
        parts.append(np.broadcast_to(np.arange(n_tokens - st), (3, n_tokens - st)) + next_start)
    positions = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64)
    return torch.from_numpy(np.ascontiguousarray(positions)), int(positions.max()) + 1 - n_tokens


@functools.cache
def image_only_processor(processor_class, path: str, tokenizer):
    """``processor_class`` (``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor``) of checkpoint ``path`` without a video
    processor, its image processor the PIL one (for environments without torchvision: images only)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnly(processor_class):
        """The processor with ``video_processor`` None allowed."""

        def check_argument_for_proper_class(self, argument_name, argument):
            """transformers' class check, except for a missing video processor."""
            if argument_name == "video_processor" and argument is None:
                return type(None)
            return super().check_argument_for_proper_class(argument_name, argument)

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    return ImageOnly(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


_CLASSES: dict = {}


def __getattr__(name: str):
    """The model classes, built on first use (they subclass vLLM's Qwen models, imported only then)."""
    base = next((b for b, a in QWEN_ARCHITECTURES.items() if a == name), None)
    if base is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _CLASSES:
        _CLASSES[name] = _build_model_class(base)
    return _CLASSES[name]


def _without_instruction(kwargs):
    """Processor kwargs without the plugin's instruction ids and seed (Qwen's processor reads the rest)."""
    return {k: v for k, v in kwargs.items() if k not in (INSTRUCTION_KEY, SAMPLE_KEY)}


@functools.cache
def processing_classes(base_name: str):
    """(vLLM's model class ``base_name``, the plugin's processing info, multimodal processor and dummy-inputs builder
    for it): Qwen's processing, images only without torchvision, each item's placeholder run cut to its kept count
    under a pre-LLM method (every token kept under an in-LLM one)."""
    use_pil_qwen2vl_image_processor()
    from vllm.multimodal.processing.processor import PromptReplacement

    module = importlib.import_module(f"vllm.model_executor.models.{_MODULES[base_name]}")
    prefix = "Qwen2VL" if base_name.startswith("Qwen2VL") else "Qwen2_5_VL"
    base_model = getattr(module, base_name)
    base_info = getattr(module, f"{prefix}ProcessingInfo")
    base_processor = getattr(module, f"{prefix}MultiModalProcessor")
    dummy = getattr(module, f"{prefix}DummyInputsBuilder")

    hf_processor_class = getattr(module, f"{prefix}Processor")

    class ProcessingInfo(base_info):
        """Qwen's processing info with the engine's checked Method; images only where the video processor fails."""

        def method(self):
            """The engine's checked Method."""
            return _method_of(self.get_hf_config())

        def get_hf_processor(self, **kwargs):
            """Qwen's processor, or without torchvision (the video processor needs it) one without a video processor."""
            try:
                return super().get_hf_processor(**kwargs)
            except ImportError:
                return image_only_processor(hf_processor_class, self.ctx.model_config.model, self.get_tokenizer())

        def get_supported_mm_limits(self):
            """Qwen's limits; images only when the processor has no video processor."""
            limits = dict(super().get_supported_mm_limits())
            if self.get_hf_processor().video_processor is None:
                limits.pop("video", None)
            return limits

    class MultiModalProcessor(base_processor):
        """Qwen's processor with every item's placeholder run cut to the method's kept count; for CDPruner it also
        hands every image its prompt's instruction ids (a multimodal field, in the images' cache keys too)."""

        def _cached_apply_hf_processor(self, inputs, timing_ctx):
            """Put the prompt's instruction ids (``INSTRUCTION_SCORERS``) or seed (``random``) among the processor
            kwargs (so they also enter the images' cache keys: one image under two prompts is two items)."""
            scorer = self.info.method().scorer_name
            config = self.info.get_hf_config()
            extra = {}
            if scorer in INSTRUCTION_SCORERS:
                extra[INSTRUCTION_KEY] = instruction_ids(inputs.prompt, (config.image_token_id, config.video_token_id))
            if scorer == "random":
                extra[SAMPLE_KEY] = expanded_sample_key(
                    list(inputs.prompt), {config.image_token_id: self._image_token_counts(inputs)}
                )
            if extra:
                inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, **extra})
            return super()._cached_apply_hf_processor(inputs, timing_ctx)

        def _image_token_counts(self, inputs) -> list[int]:
            """Each image's merged token count before pruning (its resized grid, as Qwen's processor expands it)."""
            from vllm.multimodal.parse import ImageProcessorItems

            if "image" not in inputs.mm_data_items:
                return []
            items = inputs.mm_data_items.get_items("image", ImageProcessorItems)
            kwargs = _without_instruction(inputs.hf_processor_mm_kwargs)
            image_processor = self.info.get_image_processor(**kwargs)
            counts = []
            for i in range(len(items)):
                size = items.get_image_size(i)
                counts.append(
                    self.info.get_num_image_tokens(
                        image_width=size.width,
                        image_height=size.height,
                        image_processor=image_processor,
                        mm_kwargs=kwargs,
                    )
                )
            return counts

        def _call_hf_processor(self, hf_data, hf_kwargs):
            """Qwen's Hugging Face processor, without the instruction ids."""
            return super()._call_hf_processor(hf_data, _without_instruction(hf_kwargs))

        def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
            """The instruction ids or the seed as one entry per image."""
            processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
            if "image_grid_thw" in processed_data:
                n = len(processed_data["image_grid_thw"])
                if INSTRUCTION_KEY in hf_processor_mm_kwargs:
                    processed_data[INSTRUCTION_KEY] = instruction_field(hf_processor_mm_kwargs[INSTRUCTION_KEY], n)
                if SAMPLE_KEY in hf_processor_mm_kwargs:
                    processed_data[SAMPLE_KEY] = torch.full((n,), hf_processor_mm_kwargs[SAMPLE_KEY], dtype=torch.long)
            return processed_data

        def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
            """Qwen's fields, the per-image instruction ids and the per-image seed."""
            from vllm.multimodal.inputs import MultiModalFieldConfig

            fields = super()._get_mm_fields_config(hf_inputs, _without_instruction(hf_processor_mm_kwargs))
            return {
                **fields,
                INSTRUCTION_KEY: MultiModalFieldConfig.batched("image"),
                SAMPLE_KEY: MultiModalFieldConfig.batched("image"),
            }

        def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            """Qwen's replacements, each cut to ``item_kept_count`` of its grid's tokens."""
            hf_processor_mm_kwargs = _without_instruction(hf_processor_mm_kwargs)
            updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
            method = self.info.method()
            if not method.drops or runs_in_llm(method):
                return updates
            merge = self.info.get_hf_config().vision_config.spatial_merge_size

            def cut(replacement, modality):
                def kept(item_idx):
                    tokens = replacement(item_idx)
                    t, h, w = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data.tolist()
                    grid = (int(t), int(h) // merge, int(w) // merge)
                    if grid[0] * grid[1] * grid[2] != len(tokens):
                        raise RuntimeError(f"An item of grid {grid} has {len(tokens)} placeholders")
                    return tokens[: item_kept_count(method, grid)]

                return kept

            return [
                PromptReplacement(modality=u.modality, target=u.target, replacement=cut(u.replacement, u.modality))
                for u in updates
            ]

    name = QWEN_ARCHITECTURES[base_name]
    for cls, suffix in ((ProcessingInfo, "ProcessingInfo"), (MultiModalProcessor, "MultiModalProcessor")):
        cls.__name__ = cls.__qualname__ = name + suffix
    return base_model, ProcessingInfo, MultiModalProcessor, dummy


def _build_model_class(base_name: str):
    """vLLM's Qwen2-VL / Qwen2.5-VL model ``base_name`` with pre-LLM pruning and the engine's M-RoPE positions."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    base_model, ProcessingInfo, MultiModalProcessor, dummy = processing_classes(base_name)

    @MULTIMODAL_REGISTRY.register_processor(MultiModalProcessor, info=ProcessingInfo, dummy_inputs=dummy)
    class Model(base_model):
        """vLLM's Qwen model running a v2drop pre-LLM method (``v2drop_method`` in the hf config) on every item."""

        def __init__(self, *, vllm_config, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.v2drop_method = _method_of(self.config)
            if runs_in_llm(self.v2drop_method):
                raise ValueError(
                    f"Method {self.v2drop_method.scorer_name!r} drops inside the decoder: it runs in the in-LLM "
                    f"architecture {QWEN_INLLM_ARCHITECTURES[base_name]} (qwen_engine_args picks it)"
                )
            # time in the tower and merger, and in the drop stage, summed over items; each item's trace
            self.v2drop_seconds = {"tower": 0.0, "prune": 0.0, "images": 0}
            self.v2drop_traces = []

        def _grids(self, grid_thw) -> list[tuple[int, int, int]]:
            """(frames, rows, columns) of each item's merged tokens."""
            merge = self.config.vision_config.spatial_merge_size
            return [(int(t), int(h) // merge, int(w) // merge) for t, h, w in torch.as_tensor(grid_thw).tolist()]

        def embed_multimodal(self, **kwargs):
            """Qwen's item embeddings; the images' instruction ids (CDPruner) and seeds (``random``) are taken out
            first."""
            keys = kwargs.pop(SAMPLE_KEY, None)
            self._sample_keys = torch.as_tensor(keys).flatten().tolist() if keys is not None else None
            ids = kwargs.pop(INSTRUCTION_KEY, None)
            self._instruction_ids = instruction_rows(ids) if ids is not None else None
            return super().embed_multimodal(**kwargs)

        def _pruned(self, items, grid_thw, start: float, instructions=None, keys=None):
            """Each item's embeddings cut to the method's kept rows (the engine's drop stage, per item); CDPruner's
            items each with their instruction ids' input embeddings (``instructions``, images only), ``random``'s
            with their prompts' seeds (``keys``, images only)."""
            method = self.v2drop_method
            self.v2drop_seconds["images"] += len(items)
            tower_done = time.perf_counter()
            self.v2drop_seconds["tower"] += tower_done - start
            if not method.drops:
                return items
            if instructions is not None:
                embed = self.get_language_model().embed_input_ids
                instructions = [embed(row.to(items[0].device)) for row in instructions]
            out = []
            for i, (features, grid) in enumerate(zip(items, self._grids(grid_thw))):
                kept, trace = prune_item(
                    method,
                    features,
                    grid,
                    instruction=instructions[i] if instructions else None,
                    sample_key=keys[i] if keys else None,
                )
                out.append(kept)
                self.v2drop_traces.append(trace)
            self.v2drop_seconds["prune"] += time.perf_counter() - tower_done
            return tuple(out)

        def _process_image_input(self, image_input):
            """Qwen's per-image embeddings, each cut to the method's kept rows."""
            start = time.perf_counter()
            items = super()._process_image_input(image_input)
            ids = getattr(self, "_instruction_ids", None)  # set by embed_multimodal (CDPruner)
            if ids is not None and len(ids) != len(items):
                raise RuntimeError(f"{len(ids)} instructions for {len(items)} images: one per image")
            keys = getattr(self, "_sample_keys", None)  # set by embed_multimodal (random)
            if keys is not None and len(keys) != len(items):
                raise RuntimeError(f"{len(keys)} prompt seeds for {len(items)} images: one per image")
            return self._pruned(items, image_input["image_grid_thw"], start, ids, keys)

        def _process_video_input(self, video_input):
            """Qwen's per-video embeddings, each cut to the method's kept rows (all frames of a video together)."""
            start = time.perf_counter()
            return self._pruned(super()._process_video_input(video_input), video_input["video_grid_thw"], start)

        def get_mrope_input_positions(self, input_tokens, mm_features):
            """The engine's M-RoPE positions of the pruned prompt (``mrope_positions``) and the decoding offset."""
            method = self.v2drop_method
            if not method.drops:
                return super().get_mrope_input_positions(input_tokens, mm_features)
            return mrope_positions(method, len(input_tokens), list(self.iter_mm_grid_thw(mm_features)))

    Model.__name__ = Model.__qualname__ = QWEN_ARCHITECTURES[base_name]
    return Model
