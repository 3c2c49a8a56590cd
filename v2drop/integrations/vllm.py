"""vLLM plugin: v2drop's pre-LLM methods inside vLLM's LLaVA-1.5 model (offline ``vllm.LLM`` or ``vllm serve``).

Install it in a separate environment (vLLM's CPU build pins an older transformers than v2drop's):
``bash scripts/vllm_env.sh`` (``docs/serving.md``). The package registers this module under vLLM's
``vllm.general_plugins`` entry point; vLLM calls ``register()`` in every process it starts. That
adds the model architecture ``V2DropLlavaForConditionalGeneration`` (and the Qwen2-VL / Qwen2.5-VL ones of
``v2drop.integrations.vllm_qwen``) and changes nothing else: an engine uses it only when asked, per engine,
through ``hf_overrides``::

    import vllm
    from v2drop.integrations.vllm import engine_args

    llm = vllm.LLM(model=path, **engine_args("divprune-llava15-64"), dtype="float32", enable_prefix_caching=False)
    # engine_args(m) == {"hf_overrides": {"architectures": ["V2DropLlavaForConditionalGeneration"],
    #                                     "v2drop_method": m}}

``v2drop_method`` is a preset name, a YAML file, method config data (``Method.to_dict()``) or
``"none"``. The architecture is vLLM's ``LlavaForConditionalGeneration`` plus:

- a weight-name rule for checkpoints that store the CLIP tower without its ``vision_model.``
  level (``vision_tower.embeddings.*``, as the bundled proxy does);
- for a method with one pre-LLM stage (``check_method``): every image's placeholder count is the
  stage's kept count for that image (the vLLM processor's and the Hugging Face processor's
  expansion both), and the model keeps the matching projected features, chosen by the method's own
  scorer through the engine's own drop stage (``v2drop.engine.stages.drop``) on the image's
  projected features, so the kept set is the v2drop engine's for a sample with that one image.
  Scorers that read the vision tower's [CLS] attention and keys (VisionZip, HoloV, VisPruner) get them
  recomputed from the tower's last layer input: one extra query/key projection of that layer per image;
  VisPruner also reads that layer's patch outputs (the tower's features). HiPrune's received
  attention (every query's, heads and queries averaged) is recomputed at each requested layer from
  that layer's input while the tower runs layer by layer: one more query/key projection and one
  full attention map per requested layer and image.
  ``random`` gets its prompt's seed (the engine's ``sample_keys``, from the prompt ids with every
  ``<image>`` expanded) as a per-image multimodal field that the processor computes; the seed also
  enters the images' cache keys, so one image under two prompts is two items.
  CDPruner (``INSTRUCTION_SCORERS``) gets its prompt's instruction the same way: the processor hands
  every image the prompt's token ids after its last ``<image>`` (``instruction_ids``, the engine's
  instruction) as a per-image field, which also enters the image's cache key; the model embeds them
  with the LLM's input embeddings and the drop stage runs on the image's tokens followed by them.

The budget is per image: the engine's budget is per sample (all of its images together), so the
two agree on one image per prompt. Positions are vLLM's, contiguous over the kept tokens: the
method must use ``position_policy: renumber`` (the presets of pre-LLM methods do). V²Drop's, FastV's,
PDrop's and SparseVLM's decoder stages run in a second architecture, ``V2DropInLLMLlavaForConditionalGeneration``
(``v2drop.integrations.vllm_inllm``), which ``engine_args`` picks for them; methods that score decoder
stages otherwise (DART, ...) and the pre-LLM scorers of ``REFUSED_SCORERS`` (HoliTom, FastVID,
frames) are refused with the reason (``check_method``).

Importing this module imports nothing from vLLM; ``register()`` also points transformers' pixtral
image-processor module at its PIL twin when torchvision cannot be imported (vLLM's LLaVA module
imports the former, which needs torchvision; v2drop's CPU environments have none).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import json
import sys
import time

import torch

ARCHITECTURE = "V2DropLlavaForConditionalGeneration"  # the architecture name the plugin registers
METHOD_KEY = "v2drop_method"  # the hf_overrides key (a config attribute) that names the method
# Scorers whose pre-LLM scores read only the image's own vision tokens and its tower's attention (and, for
# ``INSTRUCTION_SCORERS``, the prompt's instruction, which the processor hands every image), with a kept count fixed by
# the budget, so an image scored alone gets the engine's scores and kept count.
SUPPORTED_SCORERS = (
    "uniform",
    "random",
    "divprune",
    "visionzip",
    "position",
    "holov",
    "vispruner",
    "hiprune",
    "vidcom2",
    "frame_pool",
    "cdpruner",
)
# Supported scorers that also read the prompt's instruction (its text after the last image): the processor hands every
# image the instruction's token ids, which the model embeds with the LLM's input embeddings.
INSTRUCTION_SCORERS = ("cdpruner",)
# Why the other pre-LLM scorers are refused (a scorer not named here: it scores inside the decoder).
REFUSED_SCORERS = {
    "holitom": "its kept count follows the image's clusters (close to, not exactly, the budget), but vLLM fixes each "
    "image's placeholder count before the model runs",
    "fastvid": "its kept count follows the image's segments and merges (close to, not exactly, the budget), but vLLM "
    "fixes each image's placeholder count before the model runs",
    "frames": "it keeps whole frames, and one image is one frame: every token stays (no dropping), not the budget",
}
SAMPLE_KEY = "v2drop_sample_key"  # the per-image multimodal field carrying its prompt's seed (``random``)
# the per-image multimodal field carrying its prompt's instruction token ids (``INSTRUCTION_SCORERS``)
INSTRUCTION_KEY = "v2drop_instruction_ids"
_PIXTRAL = "transformers.models.pixtral.image_processing_pixtral"


def register() -> None:
    """vLLM's general-plugin hook: the torchvision workarounds, ``V2DropLlavaForConditionalGeneration`` and the Qwen
    models (``vllm_qwen.register``)."""
    use_pil_pixtral_processor()
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:{ARCHITECTURE}")
    from v2drop.integrations import vllm_inllm, vllm_qwen

    if vllm_inllm.ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(vllm_inllm.ARCHITECTURE, f"{vllm_inllm.__name__}:{vllm_inllm.ARCHITECTURE}")
    vllm_qwen.register()  # the Qwen2-VL / Qwen2.5-VL architectures (v2drop/integrations/vllm_qwen.py)


def use_pil_pixtral_processor() -> bool:
    """Make ``transformers.models.pixtral.image_processing_pixtral`` its PIL twin when torchvision is missing.

    Returns True when the module was redirected. With torchvision importable nothing changes.
    """
    return use_twin_module(
        _PIXTRAL, lambda: importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
    )


def use_twin_module(name: str, twin) -> bool:
    """Leave module ``name`` as it is when it imports; else (it needs torchvision, which the CPU environments lack)
    register ``twin()`` under its name. Returns True when redirected."""
    if name in sys.modules:
        return False
    try:
        importlib.import_module(name)
        return False
    except ImportError:
        sys.modules.pop(name, None)
    sys.modules[name] = twin()
    return True


def engine_args(method="none") -> dict:
    """``vllm.LLM`` keyword arguments running ``method`` (preset, YAML, config data or ``"none"``) in the plugin."""
    from v2drop.integrations import vllm_inllm

    resolved = resolve(method)
    check_method(resolved)  # fail here, with the reason, rather than inside vLLM's engine process
    architecture = vllm_inllm.ARCHITECTURE if vllm_inllm.runs_in_llm(resolved) else ARCHITECTURE
    return {"hf_overrides": {"architectures": [architecture], METHOD_KEY: method}}


def resolve(spec):
    """The ``Method`` a ``v2drop_method`` value names (preset, YAML path, config data, Method or None/``"none"``)."""
    from v2drop.method import Method

    if spec is not None and not isinstance(spec, str | dict | Method):
        raise TypeError(
            f"{METHOD_KEY} must be a preset name, a YAML path, method config data or 'none', got {type(spec).__name__}"
        )
    return Method.resolve(spec)


def check_method(method) -> None:
    """Raise ValueError, with the reason, unless the plugin can run ``method`` inside vLLM."""
    from v2drop.integrations import vllm_inllm
    from v2drop.schedule import PRE_LLM

    if not method.drops:
        return
    if vllm_inllm.runs_in_llm(method):  # every stage inside the decoder: the in-LLM architecture's checks
        vllm_inllm.check_method(method)
        return
    layers = [s.layer for s in method.schedule.stages]
    if layers != [PRE_LLM]:
        inside = [layer for layer in layers if layer != PRE_LLM]
        raise ValueError(
            f"Method {method.scorer_name!r} drops tokens inside the decoder (before layers {inside}) and outside it; "
            "the vLLM plugin runs either one pre-LLM stage or only decoder stages (V²Drop, FastV, PDrop, "
            "SparseVLM), not both in one method. Use a pre-LLM method (divprune, visionzip, or uniform, random or "
            "position on a pre_llm schedule), decoder stages alone, or v2drop's own engine"
        )
    if method.scorer_name not in SUPPORTED_SCORERS:
        reason = REFUSED_SCORERS.get(
            method.scorer_name, "it scores an image from more than its own vision tokens and tower (decoder attention)"
        )
        raise ValueError(
            f"Scorer {method.scorer_name!r} is not supported by the vLLM plugin: {reason}; supported: "
            f"{', '.join(SUPPORTED_SCORERS)}"
        )
    if method.scorer_name == "visionzip" and method.scorer.vision_request().features:
        raise ValueError(
            "VisionZip merging in the tower's space (merge_space='tower') is not supported by the vLLM plugin (it is "
            "untested there); use merge_space='projected'"
        )
    if method.position_policy != "renumber":
        raise ValueError(
            f"Method {method.scorer_name!r} keeps the original position ids (position_policy "
            f"{method.position_policy!r}), but vLLM numbers the kept tokens contiguously: use position_policy "
            "'renumber' (as the pre-LLM presets do)"
        )


def offline_llm(
    model: str,
    method,
    *,
    dtype: str = "float32",
    max_num_seqs: int = 16,
    kv_cache_gib: float = 1.0,
    max_model_len: int | None = None,
):
    """A ``vllm.LLM`` running ``method`` (a Method) in the plugin: eager, prefix caching off, seed 0, request
    metrics on; ``max_model_len`` None keeps the checkpoint's context length."""
    import vllm

    from v2drop.integrations import vllm_inllm

    return vllm.LLM(
        model=model,
        dtype=dtype,
        **({"enable_chunked_prefill": False} if vllm_inllm.runs_in_llm(method) else {}),  # whole prompts per step
        enforce_eager=True,
        enable_prefix_caching=False,
        max_num_seqs=max_num_seqs,
        kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
        **({"max_model_len": max_model_len} if max_model_len else {}),
        disable_log_stats=False,  # request metrics (TTFT)
        seed=0,
        **_engine_args_for(model, method),
    )


def _engine_args_for(model: str, method) -> dict:
    """The plugin's engine arguments for ``method`` on ``model``, its Qwen models' for Qwen checkpoints."""
    from v2drop.integrations.vllm_qwen import engine_args_for

    return engine_args_for(model, method)


def image_requests(prompts: list[str], samples: list, run: str) -> list[dict]:
    """The samples as ``vllm.LLM.generate`` requests, with one uuid per run, request and image: vLLM would otherwise
    encode a shared image once for all its questions (and for every later run), which the engine (one sample at a
    time) does not."""
    return [
        {
            "prompt": p,
            "multi_modal_data": {"image": list(s.images) if len(s.images) > 1 else s.images[0]},
            "multi_modal_uuids": {"image": [f"{run}/{s.id}/{i}" for i in range(len(s.images))]},
        }
        for p, s in zip(prompts, samples)
    ]


def offline_throughput(
    model: str, method, prompts: list[str], samples: list, *, max_new_tokens: int, warmup: int, **llm_kwargs
) -> dict:
    """Requests/s of ``method`` in an offline ``vllm.LLM`` (``offline_llm``): ``warmup`` requests untimed, then every
    sample submitted at once, greedy. Returns ``{"requests_per_s", "output_tokens_per_s", "answers"}``."""
    import vllm

    llm = offline_llm(model, method, **llm_kwargs)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    try:
        if warmup:
            llm.generate(image_requests(prompts, samples, "warmup")[:warmup], params, use_tqdm=False)
        batch = image_requests(prompts, samples, "timed")
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    finally:
        del llm
    return {
        "requests_per_s": len(samples) / elapsed,
        "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed,
        "answers": [o.outputs[0].text.strip() for o in outputs],
    }


def sample_key(prompt_ids: list[int], image_token_id: int, n_tokens: int) -> int:
    """The engine's per-sample seed (``v2drop.engine.loop.sample_keys``) of a prompt whose ``<image>`` tokens stand
    for ``n_tokens`` placeholders each (as the Hugging Face processor expands them)."""
    return expanded_sample_key(prompt_ids, {image_token_id: [n_tokens] * prompt_ids.count(image_token_id)})


def expanded_sample_key(prompt_ids: list[int], counts: dict[int, list[int]]) -> int:
    """The engine's per-sample seed (``v2drop.engine.loop.sample_keys``) of a prompt whose vision placeholders are
    expanded: ``counts`` maps a placeholder id (``<|image_pad|>``) to the token count of each of its occurrences, in
    order (Qwen's images have a token count each); other ids stay as they are."""
    from v2drop.engine.loop import sample_keys

    left = {token: list(c) for token, c in counts.items()}
    ids = []
    for token in prompt_ids:
        if token in left:
            if not left[token]:
                raise ValueError(f"The prompt has more placeholders {token} than the {len(counts[token])} counts given")
            ids.extend([token] * left[token].pop(0))
        else:
            ids.append(token)
    tensor = torch.tensor([ids])
    return int(sample_keys(tensor, torch.ones_like(tensor))[0])


def instruction_ids(prompt_ids: list[int], vision_token_ids) -> list[int]:
    """The instruction CDPruner scores against, as the engine takes it (``CDPrunerScorer.instruction``): the prompt's
    token ids after its last vision token (``vision_token_ids``: one id, e.g. ``<image>``, or several; all of the
    prompt without one)."""
    vision = {vision_token_ids} if isinstance(vision_token_ids, int) else set(vision_token_ids)
    ids = list(prompt_ids)
    last = max((i for i, token in enumerate(ids) if token in vision), default=-1)
    return ids[last + 1 :]


def instruction_field(ids: list[int], n: int) -> torch.Tensor:
    """The per-item multimodal field ``INSTRUCTION_KEY`` of a prompt with ``n`` images: (n, len(ids)) long, every row
    the instruction's ids."""
    return torch.tensor(ids, dtype=torch.long).expand(n, -1).clone()


def instruction_rows(field) -> list[torch.Tensor]:
    """Each item's instruction ids (1-D long) from the collated ``INSTRUCTION_KEY`` field (a (N, m) tensor when all
    have one length, else a list)."""
    return [torch.as_tensor(row).flatten() for row in field]


def kept_per_image(method, n_tokens: int) -> int:
    """Vision tokens an image of ``n_tokens`` (a square grid) keeps under ``method`` (all of them without a drop):
    the stage's count; for ``frame_pool`` the cells of the largest pooled grid of at most that count."""
    if not method.drops:
        return n_tokens
    count = method.schedule.kept_count(0, n_tokens, n_tokens)
    if method.scorer_name == "frame_pool" and count < n_tokens:
        from v2drop.scorers.frame_controls import pooled_grid

        side = int(round(n_tokens**0.5))
        rows, cols = pooled_grid(count, side, side) if side * side == n_tokens else (1, count)
        return rows * cols
    return count


def _method_of(config):
    """The checked Method named by an hf config's ``v2drop_method``."""
    return _checked(json.dumps(getattr(config, METHOD_KEY, None), sort_keys=True))


@functools.cache
def _checked(spec: str):
    """The checked Method of a JSON-encoded ``v2drop_method`` value (cached: the processor asks per image)."""
    method = resolve(json.loads(spec))
    check_method(method)
    return method


def tower_state(vision_model, pixel_values: torch.Tensor, request, depth: int, feature_layer: int):
    """Run vLLM's CLIP tower on ``pixel_values`` (N, C, H, W) and recompute the attention ``request`` asks for.

    vLLM builds the tower up to the feature-selection layer (``vision_feature_layer`` of a tower ``depth`` layers
    deep), so its last layer is that layer. Returns the last layer's output (N, 1 + P, C) (what the projector
    reads, the [CLS] first) and the ``StageContext.vision`` entries ``request`` asks for, as
    ``LlavaAdapter.vision_tower_state`` gives them (each from a layer's own query/key projection of its normed input,
    float32): ``cls_attention`` (N, P) the selection layer's [CLS] row, heads summed; ``keys`` (N, P, hd) its keys,
    heads averaged; ``features`` (N, P, C) float32 the selection layer's patch outputs; ``received`` per entry of
    ``request.received_layers`` (numbered as ``vision_feature_layer``, floats a share of ``depth``), the attention
    each patch receives in that layer, heads then queries averaged. A requested layer after the selection layer,
    which vLLM does not build, raises a ValueError.
    """
    from v2drop.models.llava import _tower_layer

    layers = vision_model.encoder.layers
    received_at = {name: _tower_layer(range(depth), feature_layer, name) for name in request.received_layers}
    beyond = {name: index for name, index in received_at.items() if index > len(layers)}
    if beyond:
        raise ValueError(
            f"Received attention of tower layers {beyond} (requested as named: index) is asked for, but vLLM builds "
            f"the tower only up to its feature-selection layer ({len(layers)} of {depth} layers)"
        )
    hidden = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values))
    received = {}
    for index, layer in enumerate(layers, start=1):
        for name in [name for name, at in received_at.items() if at == index]:
            probs = _attention(layer, hidden, slice(None))  # (N, H, T, T)
            received[name] = probs.mean(1).mean(1)[:, 1:]  # heads, then queries averaged; patch columns
        if index == len(layers):
            probs = _attention(layer, hidden, slice(0, 1), keys=request.keys)
            probs, k = probs if request.keys else (probs, None)
        hidden = layer(hidden)
    probs = probs[:, :, 0]  # (N, H, T): the [CLS] row
    vision = {
        "cls_attention": probs[:, :, 1:].sum(1),
        "keys": k.mean(1)[:, 1:] if request.keys else None,
        "cls_embeds": None,
        "crops": None,
        "features": hidden[:, 1:].float() if request.features else None,
        "received": received,
    }
    return hidden, vision


def _attention(layer, x: torch.Tensor, queries: slice, keys: bool = False):
    """A vLLM CLIP encoder layer's attention probabilities (N, H, Q, T) float32 of the queries ``x[:, queries]`` on
    its input ``x`` (N, T, C), from its own fused query/key projection of its normed input; with ``keys`` also its
    keys (N, H, T, hd) float32."""
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(layer.layer_norm1(x))
    q, k, _ = qkv.float().chunk(3, dim=-1)
    n, t, _ = k.shape
    q = q[:, queries]
    q = q.reshape(n, q.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)
    k = k.view(n, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    probs = torch.softmax((q * attn.scale) @ k.transpose(-1, -2), dim=-1)
    return (probs, k) if keys else probs


def prune_images(
    method,
    projected: torch.Tensor,
    vision: dict | None,
    project,
    sample_keys: torch.Tensor | None = None,
    instructions: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list]:
    """The pre-LLM stage of ``method`` on each image's projected features (N, P, D) alone: (N, k, D) and the traces.

    Every image is one sample of a ``Sequence`` on a square grid: its vision tokens, then, when ``instructions``
    is given (N tensors (m_i, D): the LLM's input embeddings of each image's prompt instruction, ``instruction_ids``),
    that instruction as text tokens (left-padded to a common length, as the engine pads). The engine's own
    ``drop`` runs the stage, so the kept tokens and any tokens the scorer adds (VisionZip's [CLS] and
    contextual tokens, after the last kept one) are the engine's, in its order. The traces are the
    engine's per image: ``{"layer": -1, "kept": [...], "merged": [...]}`` with the image's token indices.
    ``sample_keys`` (N,) are the engine's per-sample seeds of the images' prompts (``sample_key``; zeros if None).
    """
    from v2drop.engine.sequence import Sequence
    from v2drop.engine.stages import StageContext, drop
    from v2drop.schedule import PRE_LLM

    n, p, d = projected.shape
    side = int(round(p**0.5))
    if side * side != p:
        raise ValueError(f"The plugin lays an image's {p} vision tokens on a square grid; {p} is not a square")
    if instructions is not None and len(instructions) != n:
        raise ValueError(f"{len(instructions)} instructions for {n} images: one instruction per image")
    device = projected.device
    texts = [t.shape[0] for t in instructions] if instructions is not None else [0] * n
    length = p + max(texts)
    pad = torch.tensor([length - p - m for m in texts], device=device)
    hidden = projected.new_zeros(n, length, d)
    for b, m in enumerate(texts):  # [padding, the image's tokens, its instruction]
        hidden[b, length - m - p : length - m] = projected[b]
        if m:
            hidden[b, length - m :] = instructions[b].to(projected.dtype)
    cols = torch.arange(length, device=device)
    orig = cols[None] - pad[:, None]  # the index in the image's unpadded sequence, -1 for padding
    valid = orig >= 0
    idx = orig.clamp(0, p - 1)
    coords = torch.stack([torch.zeros_like(idx), idx // side, idx % side], -1)
    seq = Sequence(
        hidden=hidden,
        position_ids=orig.clamp(min=0).masked_fill(~valid, 1),
        attention_mask=valid.long(),
        orig_idx=orig.masked_fill(~valid, -1),
        vision=valid & (orig < p),
        coords=coords,
        block=torch.full((n, length), -1, dtype=torch.long, device=device),  # no attention blocks (LLaVA-1.5)
    )
    traces = [_Trace() for _ in range(n)]
    ctx = StageContext(
        method=method,
        adapter=_Projector(project),
        stage_at={PRE_LLM: 0},
        sample_keys=torch.zeros(n, dtype=torch.long) if sample_keys is None else sample_keys.long().cpu(),
        n_vision=[p] * n,
        traces=traces,
        requests={PRE_LLM: None},
        queries={},
        vision=vision,
        pad=pad,
    )
    out = drop(seq, PRE_LLM, None, ctx)
    expected = kept_per_image(method, p)
    left = out.attention_mask.sum(1) - torch.tensor(texts, device=device)  # kept (and added) tokens of each image
    if bool((left != expected).any()):
        raise RuntimeError(
            f"Scorer {method.scorer_name!r} left {left.tolist()} tokens per image, but the prompt holds {expected} "
            "placeholders for each"
        )
    end = out.hidden.shape[1]  # each image's tokens end right before its instruction (left-padded rows)
    kept = torch.stack([out.hidden[b, end - m - expected : end - m] for b, m in enumerate(texts)])
    return kept, [trace.stages[0] for trace in traces]


class _Trace:
    """The part of ``SampleTrace`` a drop stage writes (its kept positions)."""

    def __init__(self):
        self.stages = []


class _Projector:
    """The part of an ``Adapter`` a pre-LLM drop stage reads: ``project_vision`` (for tower-space merging)."""

    norm = None
    layers = ()

    def __init__(self, project):
        self.project_vision = project


_CLASSES: dict = {}


def __getattr__(name: str):
    """The model class, built on first use (it subclasses vLLM's LLaVA, imported only then)."""
    if name != ARCHITECTURE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _CLASSES:
        _CLASSES[name] = _build_model_class()
    return _CLASSES[name]


def _build_model_class():
    """``V2DropLlavaForConditionalGeneration``: vLLM's LLaVA with the weight-name rule and pre-LLM pruning."""
    use_pil_pixtral_processor()
    from vllm.model_executor.models.llava import (
        LlavaDummyInputsBuilder,
        LlavaForConditionalGeneration,
        LlavaMultiModalProcessor,
        LlavaProcessingInfo,
    )
    from vllm.model_executor.models.utils import WeightsMapper
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.inputs import MultiModalFieldConfig

    from v2drop.schedule import PRE_LLM

    class V2DropLlavaProcessingInfo(LlavaProcessingInfo):
        """LLaVA's processing info with each image's placeholder count cut to the method's kept count."""

        def method(self):
            """The engine's checked Method."""
            return _method_of(self.get_hf_config())

        def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
            """The kept count of an image's vision tokens."""
            n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
            return kept_per_image(self.method(), n)

        def get_hf_processor(self, **kwargs):
            """The Hugging Face processor expanding ``<image>`` to the kept count too (a copy: the cached one stays)."""
            processor = super().get_hf_processor(**kwargs)
            method = self.method()
            if not method.drops:
                return processor
            size = self.get_vision_encoder_info().get_image_size()
            full = super().get_num_image_tokens(image_width=size, image_height=size)
            processor = copy.copy(processor)
            processor.num_additional_image_tokens += kept_per_image(method, full) - full
            return processor

    class V2DropLlavaMultiModalProcessor(LlavaMultiModalProcessor):
        """LLaVA's processor; it also hands every image its prompt's seed (``random``) or its prompt's instruction
        token ids (``INSTRUCTION_SCORERS``) as a multimodal field."""

        def _cached_apply_hf_processor(self, inputs, timing_ctx):
            """Put the prompt's seed or instruction ids among the processor kwargs (so they also enter the images'
            cache keys: one image under two prompts is two items)."""
            scorer = self.info.method().scorer_name
            config = self.info.get_hf_config()
            extra = {}
            if scorer == "random":
                size = self.info.get_vision_encoder_info().get_image_size()
                n = LlavaProcessingInfo.get_num_image_tokens(self.info, image_width=size, image_height=size)
                extra[SAMPLE_KEY] = sample_key(list(inputs.prompt), config.image_token_index, n)
            if scorer in INSTRUCTION_SCORERS:
                extra[INSTRUCTION_KEY] = instruction_ids(inputs.prompt, config.image_token_index)
            if extra:
                inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, **extra})
            return super()._cached_apply_hf_processor(inputs, timing_ctx)

        def _call_hf_processor(self, hf_data, hf_kwargs):
            """The Hugging Face processor, without the seed or the instruction ids."""
            mine = (SAMPLE_KEY, INSTRUCTION_KEY)
            return super()._call_hf_processor(hf_data, {k: v for k, v in hf_kwargs.items() if k not in mine})

        def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
            """The seed or the instruction ids as one entry per image."""
            processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
            if "pixel_values" in processed_data:
                n = len(processed_data["pixel_values"])
                if SAMPLE_KEY in hf_processor_mm_kwargs:
                    processed_data[SAMPLE_KEY] = torch.full((n,), hf_processor_mm_kwargs[SAMPLE_KEY], dtype=torch.long)
                if INSTRUCTION_KEY in hf_processor_mm_kwargs:
                    processed_data[INSTRUCTION_KEY] = instruction_field(hf_processor_mm_kwargs[INSTRUCTION_KEY], n)
            return processed_data

        def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
            """LLaVA's fields, the per-image seed and the per-image instruction ids."""
            return {
                **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
                SAMPLE_KEY: MultiModalFieldConfig.batched("image"),
                INSTRUCTION_KEY: MultiModalFieldConfig.batched("image"),
            }

    @MULTIMODAL_REGISTRY.register_processor(
        V2DropLlavaMultiModalProcessor, info=V2DropLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
    )
    class V2DropLlavaForConditionalGeneration(LlavaForConditionalGeneration):
        """vLLM's LLaVA running a v2drop pre-LLM method (``v2drop_method`` in the hf config) on every image."""

        hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(
            orig_to_new_prefix={
                f"vision_tower.{part}.": f"vision_tower.vision_model.{part}."
                for part in ("embeddings", "encoder", "pre_layrnorm", "post_layernorm")
            }
        )

        def __init__(self, *, vllm_config, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.v2drop_method = _method_of(self.config)
            # time in the tower and projector, and in the drop stage, summed over images; each image's trace
            self.v2drop_seconds = {"tower": 0.0, "prune": 0.0, "images": 0}
            self.v2drop_traces = []

        def embed_multimodal(self, **kwargs):
            """LLaVA's image embeddings; the images' prompt seeds (``random``) and instruction ids are taken out."""
            keys = kwargs.pop(SAMPLE_KEY, None)
            self._sample_keys = torch.as_tensor(keys).flatten() if keys is not None else None
            ids = kwargs.pop(INSTRUCTION_KEY, None)  # (N, m) when every image's instruction has one length, else a list
            self._instruction_ids = instruction_rows(ids) if ids is not None else None
            return super().embed_multimodal(**kwargs)

        def _instructions(self, n: int) -> list[torch.Tensor] | None:
            """The LLM's input embeddings of each of the ``n`` images' instruction ids (None unless the scorer reads
            the instruction)."""
            if self.v2drop_method.scorer_name not in INSTRUCTION_SCORERS:
                return None
            ids = getattr(self, "_instruction_ids", None)
            if ids is None or len(ids) != n:
                raise RuntimeError(
                    f"Scorer {self.v2drop_method.scorer_name!r} needs each image's instruction ids (the multimodal "
                    f"field {INSTRUCTION_KEY!r} the plugin's processor adds), got "
                    f"{'none' if ids is None else len(ids)} for {n} images"
                )
            embed = self.language_model.embed_input_ids
            device = next(self.multi_modal_projector.parameters()).device
            return [embed(row.to(device)) for row in ids]

        def _process_image_input(self, image_input):
            """Projected features of every image, each cut to the method's kept tokens."""
            method = self.v2drop_method
            if image_input["type"] != "pixel_values":
                return super()._process_image_input(image_input)
            pixels = image_input["pixel_values"]
            start = time.perf_counter()
            self.v2drop_seconds["images"] += len(pixels)
            if not method.drops:
                out = super()._process_image_input(image_input)
                self.v2drop_seconds["tower"] += time.perf_counter() - start
                return out
            request = method.scorer.at(PRE_LLM).vision_request()
            if request is None:
                features, vision = self._process_image_pixels(image_input), None
            else:
                if self.config.vision_feature_select_strategy != "default":
                    raise ValueError("The [CLS] attention needs vision_feature_select_strategy 'default'")
                out, vision = tower_state(
                    self.vision_tower.vision_model,
                    pixels,
                    request,
                    self.config.vision_config.num_hidden_layers,
                    self.config.vision_feature_layer,
                )
                features = out[:, 1:]
                if request.cls_embeds:
                    vision["cls_embeds"] = list(self.multi_modal_projector(out[:, :1]).float())
            projected = self.multi_modal_projector(features)
            tower_done = time.perf_counter()
            keys = getattr(self, "_sample_keys", None)
            kept, traces = prune_images(method, projected, vision, self._project, keys, self._instructions(len(pixels)))
            self.v2drop_traces.extend(traces)
            self.v2drop_seconds["tower"] += tower_done - start
            self.v2drop_seconds["prune"] += time.perf_counter() - tower_done
            return kept

        def _project(self, features: torch.Tensor) -> torch.Tensor:
            """The projector on tower features, float32 (``Adapter.project_vision``)."""
            return self.multi_modal_projector(features.to(next(self.multi_modal_projector.parameters()).dtype)).float()

    V2DropLlavaForConditionalGeneration.__name__ = V2DropLlavaForConditionalGeneration.__qualname__ = ARCHITECTURE
    return V2DropLlavaForConditionalGeneration
