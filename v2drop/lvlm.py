"""``v2drop.load``: a Hugging Face LVLM with its processor, ready for ``generate(..., method=...)``."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from v2drop import engine
from v2drop.bundled import ASSETS, LOCAL_MODELS  # noqa: F401  (re-exported: where bundled models live)
from v2drop.method import Method
from v2drop.models import adapter_for

_PAD_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class GenerationResult(engine.EngineOutput):
    """``EngineOutput`` plus the decoded answers (``texts``)."""

    texts: list[str] = None  # type: ignore[assignment]


class InputBuilder:
    """Prompts and images -> model inputs with the processor alone (no model): picklable, so loader workers can run
    it."""

    def __init__(self, processor):
        self.processor = processor

    @property
    def tokenizer(self):
        """The processor's tokenizer (the processor itself for a bare tokenizer)."""
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def image_token(self) -> str:
        """The placeholder string a prompt uses for one image."""
        return getattr(self.processor, "image_token", "<image>")

    def format_prompt(self, question: str, n_images: int = 1) -> str:
        """The family's chat prompt for one user turn with ``n_images`` images before the question."""
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return "USER: " + self.image_token * n_images + "\n" + question + " ASSISTANT:"

    def prepare(
        self,
        prompts: Sequence[str],
        images: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        processor_kwargs: dict | None = None,
    ) -> dict:
        """Model inputs for a batch on ``device`` (pixel values in ``dtype``): each sample processed alone, then
        left-padded together.

        ``images[i]`` is None, one PIL image or a list of them for prompt ``i``; ``videos[i]``
        likewise a list of frames (families with native video inputs only). ``processor_kwargs``: options of the
        family's image processor passed on every call (e.g. Gemma 3's ``{"do_pan_and_scan": True}``); see
        ``check_processor_kwargs``.
        """
        options = check_processor_kwargs(self.processor, processor_kwargs)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = _per_sample(images, len(prompts), "images")
        videos = _per_sample(videos, len(prompts), "videos")
        samples = []
        for i, (prompt, imgs, vids) in enumerate(zip(prompts, images, videos)):
            n_placeholders = prompt.count(self.image_token)
            if len(imgs) != n_placeholders:
                raise ValueError(
                    f"Prompt {i} has {n_placeholders} image placeholder(s) ({self.image_token!r}) but "
                    f"{len(imgs)} image(s) were given; put one placeholder per image in the prompt "
                    f"(LVLM.format_prompt does this)"
                )
            kwargs: dict[str, Any] = {"text": prompt, "return_tensors": "pt"}
            if imgs:
                kwargs.update(options, images=imgs)
            if vids:
                kwargs["videos"] = vids
            samples.append(dict(self.processor(**kwargs)))
        return _collate(samples, pad_id=self.tokenizer.pad_token_id or 0, device=device, dtype=dtype)


class LVLM:
    """A loaded vision-language model: the ``transformers`` model, its processor and family adapter.

    Parameters
    ----------
    model : PreTrainedModel
        A ``*ForConditionalGeneration`` model of a supported family.
    processor : ProcessorMixin, QwenProcessorLite or OnevisionProcessorLite
        Turns prompts and images into model inputs.
    name : str
        Where the model came from (hub id or path), for records.
    """

    def __init__(self, model, processor, name: str = ""):
        self.model = model.eval()
        self.processor = processor
        self.adapter = adapter_for(model)
        self.name = name
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.vision_cache = (
            None  # an attached v2drop.vision_cache.VisionCache (``cache.attached(lvlm)``); None = compute everything
        )

    @property
    def depth(self) -> int:
        """Number of decoder layers."""
        return self.adapter.depth

    @functools.cached_property
    def weights_fingerprint(self) -> str:
        """A short hash of the weights (names, shapes, dtypes and each tensor's first and last values), for caches keyed
        by model.

        A model name alone is not enough: a bundled or local model retrained under the same name
        must not be served another model's cached results. Sampling the ends of every tensor keeps
        this cheap for 7B checkpoints while any retraining changes it.
        """
        import hashlib

        digest = hashlib.blake2b(digest_size=8)
        for name, tensor in self.model.state_dict().items():
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            if tensor.numel() and tensor.device.type != "meta":
                flat = tensor.detach().reshape(-1)
                digest.update(torch.cat([flat[:16], flat[-16:]]).to("cpu", torch.float64).numpy().tobytes())
        return digest.hexdigest()

    @property
    def inputs(self) -> InputBuilder:
        """Prompt formatting and input preparation with the processor alone (what loader workers run)."""
        return InputBuilder(self.processor)

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def image_token(self) -> str:
        """The placeholder string a prompt uses for one image."""
        return self.inputs.image_token

    def format_prompt(self, question: str, n_images: int = 1) -> str:
        """The family's chat prompt for one user turn with ``n_images`` images before the question."""
        return self.inputs.format_prompt(question, n_images)

    # -- inputs -----------------------------------------------------------------------------------
    def prepare(
        self,
        prompts: Sequence[str],
        images: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
        processor_kwargs: dict | None = None,
    ) -> dict:
        """Model inputs for a batch on the model's device: each sample processed alone, then left-padded together.

        ``images[i]`` is None, one PIL image or a list of them for prompt ``i``; ``videos[i]``
        likewise a list of frames (families with native video inputs only). ``processor_kwargs``: image processor
        options asked for at call time (e.g. ``{"do_pan_and_scan": True}`` on Gemma 3; ``check_processor_kwargs``).
        """
        where = {"device": self.device, "dtype": self.model.dtype, "processor_kwargs": processor_kwargs}
        if self.vision_cache is not None:  # a sweep's trials: the same batch's inputs once, reused by every trial
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            images = _per_sample(images, len(prompts), "images")
            videos = _per_sample(videos, len(prompts), "videos")
            return self.vision_cache.prepare(
                prompts,
                images,
                videos,
                lambda: self.inputs.prepare(prompts, images, videos, **where),
                options=check_processor_kwargs(self.processor, processor_kwargs),
            )
        return self.inputs.prepare(prompts, images, videos, **where)

    # -- generation -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str] | str,
        images: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
        method: Method | str | None = None,
        max_new_tokens: int = 16,
        stop_at_eos: bool = True,
        processor_kwargs: dict | None = None,
    ) -> GenerationResult:
        """Greedy answers for a batch of prompts under ``method`` (a Method, preset name or None).

        Returns texts, the prompt ids as fed to the model, the generated ids, per-sample traces
        (kept vision tokens per stage, vision tokens per layer) and timings. ``processor_kwargs``: image processor
        options asked for at call time, as in ``prepare`` (e.g. ``{"do_pan_and_scan": True}`` on Gemma 3).
        """
        inputs = self.prepare(prompts, images, videos, processor_kwargs=processor_kwargs)
        return self.generate_from_inputs(inputs, method, max_new_tokens, stop_at_eos)

    def generate_from_inputs(
        self,
        inputs: dict,
        method=None,
        max_new_tokens: int = 16,
        stop_at_eos: bool = True,
        measure_memory: bool = False,
    ) -> GenerationResult:
        """``generate`` for inputs already built by ``prepare`` (or by a processor, left-padded)."""
        method = (
            Method.resolve(method, depth=self.depth) if not isinstance(method, Method) else method.rescaled(self.depth)
        )
        eos = self.model.generation_config.eos_token_id if stop_at_eos else None
        out = engine.generate(
            self.adapter,
            inputs,
            method,
            max_new_tokens,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_token_id or 0,
            measure_memory=measure_memory,
            vision_cache=self.vision_cache,
        )
        texts = self.tokenizer.batch_decode(out.generated_ids, skip_special_tokens=True)
        return GenerationResult(**vars(out), texts=[t.strip() for t in texts])


def load(
    name_or_path: str,
    attn_implementation: str = "sdpa",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
) -> LVLM:
    """Load a supported LVLM and its processor from a hub id, a local ``save_pretrained`` directory or ``"proxy"``.

    Parameters
    ----------
    name_or_path : str
        Hub id (e.g. ``llava-hf/llava-1.5-7b-hf``), local directory, or a bundled name (``proxy``).
    attn_implementation : {"sdpa", "eager", "flash_attention_2"}
    dtype : str or torch.dtype
        ``float32``, ``bfloat16``, ``float16`` or ``auto``.
    device : str or torch.device
        Where to put the model (ignored when ``device_map`` is given).
    device_map : str or dict, optional
        Passed to ``from_pretrained`` (e.g. ``"auto"`` for one GPU).
    """
    from v2drop import checks  # issue 20: dtype, attention and device checked before anything loads

    checks.check_dtype(dtype)
    checks.check_attn(attn_implementation)
    if device_map is None:
        checks.check_device(device)
    path = str(LOCAL_MODELS.get(name_or_path, name_or_path))
    if name_or_path in LOCAL_MODELS and not Path(path).is_dir():
        raise ValueError(
            f"The bundled model {name_or_path!r} is missing at {path}; train it with `python -m "
            "experiments.train_proxy`"
        )
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise ValueError(
            f"Cannot load model {name_or_path!r}: not a local directory with a config.json, and the hub is unreachable "
            f"or has no such repo ({err})"
        ) from None
    torch_dtype = dtype if isinstance(dtype, torch.dtype) or dtype == "auto" else getattr(torch, dtype)
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation, "dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForImageTextToText.from_pretrained(path, config=config, **kwargs)
    if device_map is None:
        model = model.to(device)
    return LVLM(model, load_processor(path, config), name=name_or_path)


def load_processor(path: str, config=None):
    """The checkpoint's processor; where it needs torchvision (video processors), a PIL/numpy stand-in.

    Qwen2-VL / Qwen2.5-VL fall back to ``QwenProcessorLite`` and LLaVA-OneVision to
    ``OnevisionProcessorLite`` (images and videos, same token counts as the real processors),
    Qwen3-VL and Qwen3-VL-MoE to ``Qwen3ProcessorLite`` (images), InternVL3 to ``InternVLProcessorLite`` (images); any
    other family whose processor cannot load raises the original error.
    """
    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, OSError, ValueError, TypeError, AttributeError) as err:
        config = config or AutoConfig.from_pretrained(path)
        if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
            from v2drop.models.qwen2vl_processor import QwenProcessorLite

            return QwenProcessorLite.from_pretrained(path, second_per_grid=config.model_type == "qwen2_5_vl")
        if config.model_type in ("qwen3_vl", "qwen3_vl_moe"):
            from v2drop.models.qwen3vl_processor import Qwen3ProcessorLite

            return Qwen3ProcessorLite.from_pretrained(path)
        if config.model_type == "internvl":
            from v2drop.models.internvl_processor import InternVLProcessorLite

            return InternVLProcessorLite.from_pretrained(path)
        if config.model_type == "llava_onevision":
            from v2drop.models.onevision_processor import OnevisionProcessorLite

            return OnevisionProcessorLite.from_pretrained(path)
        if isinstance(err, (ImportError, AttributeError)):
            raise ImportError(
                f"Cannot build the processor of {path!r} ({config.model_type}): {err}. Its processor needs a package "
                f"that is not installed (usually torchvision: `pip install torchvision` matching your torch build)"
            ) from err
        raise


def processor_options(processor) -> list[str]:
    """The call-time options ``processor`` takes beyond those every image processor has (sorted; e.g. Gemma 3's
    ``do_pan_and_scan`` and ``pan_and_scan_*``); none for processors that are not transformers' own."""
    from transformers.processing_utils import ImagesKwargs, ProcessorMixin

    image_processor = getattr(processor, "image_processor", None)
    kwargs = getattr(image_processor, "valid_kwargs", None)
    if not isinstance(processor, ProcessorMixin) or kwargs is None:
        return []
    names = set(getattr(kwargs, "__annotations__", {}))
    return sorted(names - set(ImagesKwargs.__annotations__))


def check_processor_kwargs(processor, processor_kwargs: dict | None) -> dict:
    """``processor_kwargs`` as a plain dict once every key is one of ``processor_options(processor)``; else a
    ValueError naming what the processor accepts."""
    if processor_kwargs is None:
        return {}
    if not isinstance(processor_kwargs, dict):
        raise TypeError(
            f"processor_kwargs must be a dict of image processor options, e.g. {{'do_pan_and_scan': True}}; got "
            f"{type(processor_kwargs).__name__}"
        )
    accepted = processor_options(processor)
    unknown = sorted(set(map(str, processor_kwargs)) - set(accepted))
    if unknown:
        raise ValueError(
            f"processor option(s) {unknown} not supported by {type(processor).__name__}; it accepts "
            f"{accepted or 'no call-time options'}"
        )
    return dict(processor_kwargs)


def _per_sample(items, n: int, what: str) -> list[list]:
    """Normalise ``images``/``videos`` to one list per prompt."""
    if items is None:
        return [[] for _ in range(n)]
    items = list(items)
    if len(items) != n:
        raise ValueError(
            f"Got {n} prompts but {len(items)} entries in {what}; give one entry (None, an item or a list) per prompt"
        )
    return [[] if x is None else list(x) if isinstance(x, (list, tuple)) else [x] for x in items]


def _collate(samples: list[dict], pad_id: int, device, dtype) -> dict:
    """Left-pad token inputs and batch the vision inputs of separately processed samples.

    What each family's own processor pads is padded the same way, so any mix of image sizes batches:
    anyres ``pixel_values`` (LLaVA-NeXT / OneVision, (images, crops, C, H, W)) are zero-padded on
    the crop axis to the most crops in the batch (the model keeps each image's first crops, counted
    from ``image_sizes``); flat Qwen patches, grids, ``image_sizes`` and ``batch_num_images`` are
    concatenated. OneVision videos ((videos, frames, C, H, W)) of different frame counts are
    zero-padded in frames, with ``video_frames`` holding each clip's count: the adapter runs such
    clips through the tower one by one (the model pools every frame it gets).
    """
    length = max(s["input_ids"].shape[1] for s in samples)
    keys = dict.fromkeys(k for s in samples for k in s)  # ordered union: text-only samples lack vision keys
    out: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples if isinstance(s.get(key), torch.Tensor)]
        if not values:
            continue
        if key in _PAD_INPUTS:
            fill = pad_id if key == "input_ids" else 0
            values = [torch.cat([torch.full((1, length - v.shape[1]), fill, dtype=v.dtype), v], dim=1) for v in values]
        elif key == "pixel_values" and values[0].dim() == 5:
            crops = max(v.shape[1] for v in values)
            values = [torch.cat([v, v.new_zeros(v.shape[0], crops - v.shape[1], *v.shape[2:])], dim=1) for v in values]
        elif key == "pixel_values_videos" and values[0].dim() == 5 and len({v.shape[1] for v in values}) > 1:
            if (
                len({v.shape[2:] for v in values}) > 1
            ):  # the processors resize every frame to one size; a caller's own tensors may not
                shapes = ", ".join(str(tuple(v.shape[1:])) for v in values)
                raise ValueError(
                    f"Cannot batch video frames of different sizes ((frames, C, H, W) per sample: {shapes})"
                )
            frames = max(v.shape[1] for v in values)
            out["video_frames"] = torch.tensor([v.shape[1] for v in values for _ in range(v.shape[0])]).to(device)
            values = [torch.cat([v, v.new_zeros(v.shape[0], frames - v.shape[1], *v.shape[2:])], dim=1) for v in values]
        value = torch.cat(values).to(device)
        out[key] = value.to(dtype) if value.is_floating_point() and key.startswith("pixel_values") else value
    return out
