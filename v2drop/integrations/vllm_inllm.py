"""In-LLM dropping inside vLLM: V²Drop's, FastV's and PDrop's decoder stages in vLLM's LLaVA-1.5, Qwen2-VL and
Qwen2.5-VL, SparseVLM's in LLaVA-1.5 (eager mode, CPU attention backend).

The plugin (``v2drop.integrations.vllm``) registers three more architectures,
``V2DropInLLMLlavaForConditionalGeneration`` and (``vllm_qwen.register``) the two of ``QWEN_ARCHITECTURES``;
``engine_args`` (LLaVA) and ``qwen_engine_args`` / ``engine_args_for`` (Qwen checkpoints) pick them for a method
whose stages all sit before decoder layers (``runs_in_llm``) and that this module can run (``check_method``):
the ``v2drop`` scorer (any metric), ``fastv`` and ``pdrop`` (their attention rows need layers whose RoPE or
M-RoPE ``check_layers`` reproduces: LLaVA-1.5's, Qwen2-VL's and Qwen2.5-VL's), composites of these, and
``sparsevlm`` alone on LLaVA-1.5 (``LLAVA_ONLY_SCORERS``: refused on Qwen by ``check_qwen``), positions
``preserve`` or ``renumber``. The engine must run eagerly with chunked prefill and prefix caching off
(``ENGINE_KWARGS``; ``offline_llm`` sets them).

Each model is vLLM's, every image token kept (Qwen: vLLM's M-RoPE positions of the whole prompt), with one
decoder loop for all three (``forward``): the language model's layers are called as
``layer(positions, hidden, residual)``, positions (N,) or M-RoPE's (3, N). Each step's batch is a set of
requests, each either a whole prompt (prefill: no cached context) or one new token (decode). At a stage layer
``l`` the loop

- scores every prefilling request's vision tokens (image and video placeholders) with the method's scorer
  through the engine's own drop stage (``v2drop.engine.stages.drop``) on that request's residual stream (the
  input of layer ``l`` and of layer ``l-1``), so the kept set is the engine's for that prompt. A scorer that
  reads attention rows (FastV: layer ``l-1``'s, PDrop: layer ``l``'s, of the last prompt token) gets them as
  the engine computes them, from that layer's input and its own norm, fused q/k projection (biases included) and
  RoPE cache (Qwen: M-RoPE at the request's current three position rows) over the request's current tokens,
  causal (``v2drop.integrations.vllm_attention``: ``StageAdapter`` is the adapter the drop stage reads); vLLM's
  fused attention returns none. SparseVLM reads its raters' rows (layer ``l-1``, one row per rater); the raters
  are chosen once, as the engine does at layer 0, from the request's layer-0 embeddings (the loop keeps a copy of
  the first layer's input for the first stage's ``StageContext.start``);
- goes on with the rows the engine's drop returns, in its order: the kept rows of the hidden states, the residual
  and the positions, and the rows the stage added (SparseVLM's recycled tokens: their value, the engine's residual
  stream, in the hidden states with a zero residual, so the next layer's fused add gives it exactly), at the
  engine's positions (``preserve``: each kept token's original position, all three M-RoPE rows, an added token
  its source's; ``renumber``: 0..k-1 over all rows). A request's row count (kept plus added) never exceeds its
  prompt's, so its first KV slots hold them;
- gives layers ``l`` and later their own attention metadata and slot mapping (vLLM v1 keys both by
  layer name in its ``ForwardContext``): a request's kept tokens are its first KV slots of those
  layers, its query and sequence lengths are the kept counts, and a decode token goes to the slot
  after them (original length minus the tokens dropped so far), at the engine's decode position (one
  past the largest kept position, plus the step: vLLM's position minus a per-request shift). Every
  later layer therefore attends only to the kept tokens' keys and values of that layer, in prefill
  and in every decode step; the KV slots past them stay allocated (vLLM's block manager sizes a
  request by its prompt) and are never read.

After the last layer the rows go back to their places in the step's token order (dropped rows are
zeros; added rows go nowhere), so vLLM's logits indices (the last token of each prompt, always text, and every decode
token) stay valid. Per-request drop state (tokens dropped before each segment of layers, decode-position
shifts) lives in the model, keyed by the request's first KV block, from its prefill to its last decode
step. A preempted request is recomputed: vLLM prefills its prompt and the tokens it had generated in one step, and
the loop gets its state again from that prefill. Each request's prompt length comes from vLLM's model runner
(``hand_prompt_lengths`` wraps ``GPUModelRunner._model_forward``, which the CPU runner inherits, to read
``input_batch.num_prompt_tokens``; nothing of vLLM's changes), so a recomputed prefill scores only the prompt's
vision tokens and takes its attention queries from the prompt's last token, as the first prefill and the engine did.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from v2drop.integrations.vllm_attention import StageAdapter, check_layers

ARCHITECTURE = "V2DropInLLMLlavaForConditionalGeneration"  # the in-LLM LLaVA architecture the plugin registers
# scorers whose decoder stages the loop runs: V²Drop reads hidden states; FastV and PDrop read the last prompt token's
# attention rows, SparseVLM its raters' (chosen from the layer-0 embeddings), recomputed from the scoring layer's
# weights (``v2drop.integrations.vllm_attention``); SparseVLM also adds recycled tokens
SUPPORTED_SCORERS = ("v2drop", "fastv", "pdrop", "sparsevlm")
# in-LLM scorers tested on LLaVA-1.5 only: refused on the Qwen models (``check_qwen``) and in composites
LLAVA_ONLY_SCORERS = ("sparsevlm",)
# vllm.LLM settings the architecture needs: whole prompts in one step, no shared prefixes, no graph capture
ENGINE_KWARGS = {"enforce_eager": True, "enable_prefix_caching": False, "enable_chunked_prefill": False}


def runs_in_llm(method) -> bool:
    """Whether every stage of ``method`` drops before a decoder layer (none before the LLM or in the tower)."""
    return method.drops and all(s.layer >= 0 for s in method.schedule.stages)


def scorer_names(method) -> list[str]:
    """The scorers ``method`` scores with: a composite's parts, or the method's one scorer."""
    parts = getattr(method.scorer, "parts", None) if method.scorer_name == "composite" else None
    return [part["name"] for part in parts] if parts else [method.scorer_name]


def check_method(method) -> None:
    """Raise ValueError, with the reason, unless the in-LLM architecture can run ``method`` (``runs_in_llm``)."""
    if not runs_in_llm(method):
        raise ValueError(f"Method {method.scorer_name!r} has stages outside the decoder; the in-LLM route runs none")
    names = scorer_names(method)
    if not set(names) <= set(SUPPORTED_SCORERS):
        raise ValueError(
            f"Method {method.scorer_name!r} drops tokens inside the decoder by a score the vLLM plugin does not serve "
            "between decoder layers: it merges tokens into weighted groups, or reads tower features, cached keys, grid "
            "coordinates, per-prompt seeds or attention rows other than the last prompt token's and SparseVLM's "
            "raters' (vLLM's fused attention returns no attention weights; the plugin recomputes only those rows); "
            f"supported in-LLM scorers: {', '.join(SUPPORTED_SCORERS)} and composites of "
            f"{', '.join(s for s in SUPPORTED_SCORERS if s not in LLAVA_ONLY_SCORERS)} (or use a pre-LLM method, or "
            "v2drop's own engine)"
        )
    if len(names) > 1 and set(names) & set(LLAVA_ONLY_SCORERS):
        raise ValueError(
            f"A composite with {', '.join(sorted(set(names) & set(LLAVA_ONLY_SCORERS)))} is not served in-LLM by the "
            "vLLM plugin (untested there: it runs alone); use v2drop's own engine"
        )
    if method.position_policy not in ("preserve", "renumber"):
        raise ValueError(f"Unknown position policy {method.position_policy!r}")


def check_qwen(method) -> None:
    """Raise ValueError unless the in-LLM loop may run ``method`` on the Qwen models (no ``LLAVA_ONLY_SCORERS``)."""
    only = sorted(set(scorer_names(method)) & set(LLAVA_ONLY_SCORERS)) if method.drops else []
    if only:
        raise ValueError(
            f"Scorer {only[0]!r} runs in-LLM in vLLM on LLaVA-1.5 only: its raters and recycled tokens are untested on "
            "the plugin's Qwen2-VL / Qwen2.5-VL models (M-RoPE positions of recycled tokens); use v2drop's own engine"
        )


def slots(block_row: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """KV-cache slots of a request's sequence ``positions``, from its block-table row (vLLM's slot layout)."""
    return block_row[positions // block_size].long() * block_size + positions % block_size


def compact_metadata(meta, q_lens: list[int], seq_lens: list[int], slot_mapping: torch.Tensor, attn):
    """A copy of the CPU backend's metadata ``meta`` for a batch whose requests have ``q_lens`` new tokens and
    ``seq_lens`` tokens in the KV cache (new ones included), written to ``slot_mapping``; ``attn`` is one of the
    layers it serves (its heads, ISA and KV dtype size the kernel's scheduler metadata)."""
    from vllm import _custom_ops as ops
    from vllm import envs

    qsl = torch.zeros(len(q_lens) + 1, dtype=meta.query_start_loc.dtype)
    qsl[1:] = torch.tensor(q_lens, dtype=qsl.dtype).cumsum(0)
    lens = torch.tensor(seq_lens, dtype=meta.seq_lens.dtype)
    impl = attn.impl
    scheduler = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(q_lens),
        num_heads=impl.num_heads,
        num_kv_heads=impl.num_kv_heads,
        head_dim=impl.head_size,
        seq_lens=lens,
        dtype=attn._v2drop_dtype,
        query_start_loc=qsl,
        causal=meta.causal,
        sliding_window_size=impl.sliding_window,
        isa=attn.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        dynamic_causal=None,
        kv_cache_dtype=impl.kv_cache_dtype,
    )
    return dataclasses.replace(
        meta,
        num_actual_tokens=int(qsl[-1]),
        max_query_len=max(q_lens),
        query_start_loc=qsl,
        max_seq_len=max(seq_lens),
        seq_lens=lens,
        slot_mapping=slot_mapping,
        scheduler_metadata=scheduler,
    )


def needs_prev_hidden(method, layer_idx: int) -> bool:
    """Whether the stage before ``layer_idx`` reads the input of layer ``layer_idx - 1`` (V²Drop; FastV's rows)."""
    scorer = method.scorer.at(layer_idx)
    request = scorer.attention_request()
    return scorer.needs_prev_hidden or (request is not None and request.layer_offset < 0)


_StageAdapter = StageAdapter  # the part of an ``Adapter`` a decoder drop stage reads, over vLLM's layers


def hand_prompt_lengths() -> None:
    """Wrap vLLM's ``GPUModelRunner._model_forward`` (once) so an in-LLM model learns, before each forward pass, the
    prompt length of every request of the step (``v2drop_prompt_lengths``, in the batch's order); read-only."""
    import functools

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._model_forward
    if getattr(original, "_v2drop", False):
        return

    @functools.wraps(original)
    def _model_forward(self, *args, **kwargs):
        model = self.get_model()
        if hasattr(model, "v2drop_prompt_lengths"):
            batch = self.input_batch
            model.v2drop_prompt_lengths = batch.num_prompt_tokens[: batch.num_reqs].tolist()
        return original(self, *args, **kwargs)

    _model_forward._v2drop = True
    GPUModelRunner._model_forward = _model_forward


class _Request:
    """One request of a step: its place in the step's tokens and what the loop keeps of it."""

    def __init__(self, start: int, length: int, seq_len: int, key: int, prefill: bool, prompt: int | None = None):
        self.start, self.length, self.seq_len, self.key, self.prefill = start, length, seq_len, key, prefill
        # prompt tokens of a prefill: fewer than ``length`` when a preempted request prefills its generated tokens again
        self.prompt = length if prompt is None else min(prompt, length)
        self.orig = torch.arange(length)  # prompt positions of the rows still present (prefill)
        self.dropped: list[int] = []  # tokens dropped before each segment (layers from each stage on)
        self.shift: list[int] = []  # each segment's decode positions: vLLM's minus this (the engine's)
        self.ctx = None  # the engine's StageContext (prefill with vision tokens)
        self.pos = None  # positions of the rows present, as the engine's last drop returned them (prefill)


# vLLM's Qwen architecture -> the plugin's architecture running V²Drop's, FastV's and PDrop's decoder stages in it
QWEN_ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "V2DropInLLMQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "V2DropInLLMQwen2_5_VLForConditionalGeneration",
}

_CLASSES: dict = {}


def model_class(name: str = ARCHITECTURE):
    """The in-LLM model class ``name`` (``ARCHITECTURE`` or a value of ``QWEN_ARCHITECTURES``), built on first use:
    it subclasses vLLM's model."""
    if name not in _CLASSES:
        if name == ARCHITECTURE:
            _CLASSES[name] = _build_llava_class()
        else:
            base = next((b for b, a in QWEN_ARCHITECTURES.items() if a == name), None)
            if base is None:
                raise ValueError(f"No in-LLM architecture {name!r}")
            _CLASSES[name] = _build_qwen_class(base)
    return _CLASSES[name]


def __getattr__(name: str):
    """The model classes by their architecture names (vLLM's registry imports them as ``module:name``)."""
    if name != ARCHITECTURE and name not in QWEN_ARCHITECTURES.values():
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return model_class(name)


def _build_llava_class():
    """vLLM's LLaVA (the plugin's weight-name rule, every image token kept) with the in-LLM decoder loop."""
    from v2drop.integrations import vllm as plugin

    plugin.use_pil_pixtral_processor()
    from vllm.model_executor.models.llava import (
        LlavaDummyInputsBuilder,
        LlavaForConditionalGeneration,
        LlavaMultiModalProcessor,
        LlavaProcessingInfo,
    )
    from vllm.multimodal import MULTIMODAL_REGISTRY

    pre_llm_class = getattr(plugin, plugin.ARCHITECTURE)

    @MULTIMODAL_REGISTRY.register_processor(
        LlavaMultiModalProcessor, info=LlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
    )
    class Model(_decoder_loop(), LlavaForConditionalGeneration):
        """vLLM's LLaVA running a v2drop in-LLM method (``v2drop_method`` in the hf config) in its decoder loop."""

        hf_to_vllm_mapper = pre_llm_class.hf_to_vllm_mapper

    Model.__name__ = Model.__qualname__ = ARCHITECTURE
    return Model


def _build_qwen_class(base_name: str):
    """vLLM's Qwen2-VL / Qwen2.5-VL ``base_name`` (every image token kept, vLLM's own M-RoPE positions of the whole
    prompt) with the in-LLM decoder loop; the plugin's Qwen processing (images only without torchvision)."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    from v2drop.integrations import vllm_qwen

    base_model, info, processor, dummy = vllm_qwen.processing_classes(base_name)

    @MULTIMODAL_REGISTRY.register_processor(processor, info=info, dummy_inputs=dummy)
    class Model(_decoder_loop(), base_model):
        """vLLM's Qwen model running a v2drop in-LLM method (``v2drop_method`` in the hf config) in its decoder loop."""

    Model.__name__ = Model.__qualname__ = QWEN_ARCHITECTURES[base_name]
    return Model


def _decoder_loop():
    """The mixin running the decoder loop with the method's drop stages, for vLLM models whose language model is
    ``self.language_model.model`` (``layers`` called as ``layer(positions, hidden, residual)``, ``norm``) and whose
    positions are (N,) or M-RoPE's (3, N)."""
    if "loop" not in _CLASSES:
        _CLASSES["loop"] = _build_decoder_loop()
    return _CLASSES["loop"]


def _build_decoder_loop():
    """``InLLMDecoderLoop`` (imports vLLM)."""
    from vllm.forward_context import get_forward_context

    from v2drop.engine.sequence import Sequence
    from v2drop.engine.stages import StageContext, drop
    from v2drop.integrations import vllm as plugin

    hand_prompt_lengths()

    class InLLMDecoderLoop:
        """The in-LLM decoder loop, state and timings, mixed into a vLLM multimodal model class."""

        def __init__(self, *, vllm_config, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            method = plugin._method_of(self.config)
            check_method(method)
            if type(self).__name__ != ARCHITECTURE:
                check_qwen(method)
            decoder = self.language_model.model
            method.schedule.check_depth(len(decoder.layers))
            # a stage reads attention rows: they are recomputed from the layers' weights, and the queries are chosen
            # from the layer-0 input (``attention_queries``)
            self.v2drop_reads_attention = any(
                method.scorer.at(s.layer).attention_request() is not None for s in method.schedule.stages
            )
            if self.v2drop_reads_attention:
                check_layers(decoder.layers)
            self.v2drop_method = method
            self.v2drop_stage_at = {s.layer: i for i, s in enumerate(method.schedule.stages)}
            # first KV block -> (prompt length, tokens dropped before each segment, decode-position shift of each)
            self.v2drop_state: dict[int, tuple[int, list[int], list[int]]] = {}
            self.v2drop_seconds = {"tower": 0.0, "prune": 0.0, "images": 0}
            self.v2drop_traces = []  # per prefilled request with vision tokens: {"prompt_length", "stages"}
            self.v2drop_steps = {"prefill": 0, "decode": 0, "mixed": 0}  # steps run, by the kinds of their requests
            self._v2drop_ids = None
            self.v2drop_prompt_lengths = None  # the step's requests' prompt lengths (``hand_prompt_lengths``)
            names = ("image_token_index", "image_token_id", "video_token_id")  # LLaVA's; Qwen's image and video
            self.v2drop_vision_ids = sorted(
                {getattr(self.config, n) for n in names if getattr(self.config, n, None) is not None}
            )
            for layer in decoder.layers:
                layer.self_attn.attn._v2drop_dtype = vllm_config.model_config.dtype

        def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
            """The model's embeddings; the step's token ids are kept (their vision placeholders mark vision)."""
            self._v2drop_ids = input_ids
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

        def _process_image_input(self, image_input):
            """The model's image features, timed as the pre-LLM plugin times its tower."""
            start = time.perf_counter()
            out = super()._process_image_input(image_input)
            self.v2drop_seconds["tower"] += time.perf_counter() - start
            grids = image_input.get("image_grid_thw")  # Qwen: one row per image (pixel_values are its patches)
            self.v2drop_seconds["images"] += len(grids if grids is not None else image_input.get("pixel_values", ()))
            return out

        def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
            """The decoder loop with the method's drop stages (``docs/serving.md``); vLLM's own without metadata."""
            context = get_forward_context()
            lengths, self.v2drop_prompt_lengths = self.v2drop_prompt_lengths, None  # this step's, never a later one's
            if not isinstance(context.attn_metadata, dict) or not context.attn_metadata:
                return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
            if intermediate_tensors is not None:
                raise NotImplementedError("The in-LLM plugin runs without pipeline parallelism")
            decoder = self.language_model.model
            ids = input_ids if input_ids is not None else self._v2drop_ids
            hidden = inputs_embeds if inputs_embeds is not None else decoder.embed_input_ids(input_ids)
            saved = context.attn_metadata, context.slot_mapping
            context.attn_metadata, context.slot_mapping = dict(saved[0]), dict(saved[1])
            try:
                return self._v2drop_loop(context, decoder, ids, positions, hidden, lengths)
            finally:
                context.attn_metadata, context.slot_mapping = saved

        def _v2drop_requests(self, meta, prompt_lengths: list[int] | None) -> list[_Request]:
            """The step's requests from the first layer's metadata (prefill or decode; others refused), with their
            prompt lengths from vLLM's runner (None: each prefill's whole length)."""
            qsl, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
            if prompt_lengths is not None and len(prompt_lengths) != len(lens):
                raise RuntimeError(
                    f"vLLM's model runner has {len(prompt_lengths)} requests in its batch and the attention metadata "
                    f"{len(lens)}: the in-LLM plugin cannot tell each request's prompt"
                )
            firsts = meta.block_table[:, 0].tolist()
            requests = []
            for r, seq_len in enumerate(lens):
                length = qsl[r + 1] - qsl[r]
                if length == seq_len:
                    prompt = prompt_lengths[r] if prompt_lengths is not None else None
                    requests.append(_Request(qsl[r], length, seq_len, firsts[r], True, prompt))
                elif length == 1:
                    request = _Request(qsl[r], 1, seq_len, firsts[r], False)
                    state = self.v2drop_state.get(request.key)
                    if state is None or seq_len <= state[0]:
                        raise RuntimeError(
                            "The in-LLM plugin has no drop state for a decoding request (its prefill ran elsewhere)"
                        )
                    request.dropped, request.shift = state[1], state[2]
                    requests.append(request)
                else:
                    raise NotImplementedError(
                        f"A request of this step prefills {length} of {seq_len} tokens: the in-LLM plugin needs "
                        "whole prompts in one step (enable_chunked_prefill=False, enable_prefix_caching=False, no "
                        "speculative decoding)"
                    )
            return requests

        def _v2drop_loop(self, context, decoder, ids, positions, hidden, prompt_lengths=None):
            """Run the decoder over the step's tokens, dropping at the stage layers; the final hidden states."""
            method, stage_at = self.v2drop_method, self.v2drop_stage_at
            layers = decoder.layers
            names = [layer.self_attn.attn.layer_name for layer in layers]
            meta = context.attn_metadata[names[0]]
            requests = self._v2drop_requests(meta, prompt_lengths)
            kinds = {request.prefill for request in requests}
            self.v2drop_steps["mixed" if len(kinds) == 2 else "prefill" if True in kinds else "decode"] += 1
            n_tokens = int(meta.query_start_loc[-1])
            total = hidden.shape[0]
            vision = torch.zeros(n_tokens, dtype=torch.bool)
            if ids is not None:
                vision = torch.isin(ids[:n_tokens].cpu(), torch.tensor(self.v2drop_vision_ids, dtype=ids.dtype))
            rows = torch.arange(n_tokens)  # step-token index of every row present (-1: a token a stage added)
            # positions are (N,) or M-RoPE's (3, N): rows are always indexed on the last dimension
            original_pos = positions[..., :n_tokens]
            hidden, pos, residual, prev = hidden[:n_tokens], original_pos, None, None
            # the layer-0 input, for the attention queries chosen from the embeddings (SparseVLM's raters); a copy:
            # the first layer's fused residual add updates it in place. Only scorers reading attention rows ask.
            prefill = any(r.prefill for r in requests)
            embeds = hidden.clone() if prefill and self.v2drop_reads_attention else None
            segment = -1
            for layer_idx, layer in enumerate(layers):
                if layer_idx in stage_at:
                    segment += 1
                    x = hidden if residual is None else hidden + residual
                    index, added, new_pos = self._v2drop_stage(
                        layer_idx, requests, x, prev, rows, vision, original_pos, embeds
                    )
                    take, new = index.clamp(min=0), index < 0
                    rows, pos = torch.where(new, -1, rows[take]), new_pos
                    hidden = hidden[take]
                    residual = residual[take] if residual is not None else None
                    if added is not None:
                        # an added row's residual stream is its engine value: in ``hidden`` with a zero residual, so
                        # the next layer's fused add gives it exactly (before layer 0: ``hidden`` is the stream)
                        hidden[new] = added.to(hidden.dtype)
                        if residual is not None:
                            residual[new] = 0
                    self._v2drop_metadata(context, names[layer_idx:], requests, segment, meta)
                if layer_idx + 1 in stage_at and needs_prev_hidden(method, layer_idx + 1):
                    # a copy: a fused residual add may update its inputs in place
                    prev = hidden.clone() if residual is None else hidden + residual
                hidden, residual = layer(pos, hidden, residual)
            hidden, _ = decoder.norm(hidden, residual)
            for request in requests:
                if request.prefill:
                    self.v2drop_state[request.key] = (request.length, request.dropped, request.shift)
            out = hidden.new_zeros(total, hidden.shape[-1])
            present = rows >= 0  # added rows map to no step token
            out[rows[present]] = hidden[present]
            return out

        def _v2drop_stage(self, layer_idx, requests, x, prev, rows, vision, original_pos, embeds=None):
            """The drop stage before ``layer_idx`` on every prefilling request: the rows for the next layers as the
            engine's drop returns them, in its order: the index of each into the current rows (-1: a token the stage
            added, e.g. SparseVLM's recycled ones), the added rows' values (the residual stream; None if none) and
            the rows' positions.

            Positions are the engine's: ``preserve`` keeps each kept token's original (M-RoPE) position (an added
            token its source's), ``renumber`` numbers the rows 0..k-1 (on every M-RoPE row). A decode token's
            position is vLLM's (the unpruned prompt's largest position + 1 + step) minus the request's shift of
            this segment, so it is the engine's: one past the largest position present, plus the step. ``embeds``
            (the layer-0 input) give the first stage's context its embeddings (``attention_queries``).
            """
            start_time = time.perf_counter()
            method, stage_at = self.v2drop_method, self.v2drop_stage_at
            keep, new_pos, added, offset = [], [], [], 0
            for request in requests:
                n = request.orig.numel() if request.prefill else 1
                local = torch.arange(offset, offset + n)
                if request.prefill:
                    flat = request.start + request.orig
                    is_vision = vision[flat] & (request.orig < request.prompt)  # a generated token is never vision
                    if bool(is_vision.any()):
                        # the positions the layers use: the prompt's (M-RoPE rows included) before the first stage,
                        # then those the engine's last drop returned
                        current = original_pos[..., flat] if request.pos is None else request.pos
                        seq = Sequence(
                            hidden=x[offset : offset + n][None],
                            position_ids=current.unsqueeze(-2),
                            attention_mask=torch.ones(1, n, dtype=torch.long),
                            orig_idx=request.orig[None],
                            vision=is_vision[None],
                            coords=torch.zeros(1, n, 3, dtype=torch.long),
                            block=torch.full((1, n), -1, dtype=torch.long),
                        )
                        if request.ctx is None:  # at the first stage: every prompt token is present
                            # attention queries (the last prompt token; SparseVLM's raters) chosen here, as the engine
                            # at layer 0, from the prompt alone (a recomputed request's generated tokens follow it)
                            # and its layer-0 embeddings
                            first = seq
                            if embeds is not None:
                                first = dataclasses.replace(seq, hidden=embeds[flat][None].to(seq.hidden.device))
                            prompt = first if request.prompt == n else first.select([torch.arange(request.prompt)])
                            request.ctx = StageContext.start(
                                method,
                                _StageAdapter(self.language_model.model.layers, self.language_model.model.norm),
                                prompt,
                                sample_keys=torch.zeros(1, dtype=torch.long),
                                traces=[plugin._Trace()],
                            )
                        previous = prev[offset : offset + n][None] if prev is not None else None
                        result = drop(seq, layer_idx, previous, request.ctx)
                        # the rows as the engine returns them: kept rows, and added ones (their prompt positions,
                        # their sources', are the stage's trace's "merged" and no other row's)
                        kept_orig = result.orig_idx[0].cpu()
                        merged = request.ctx.traces[0].stages[-1].get("merged", [])
                        is_added = torch.isin(kept_orig, torch.tensor(merged, dtype=kept_orig.dtype))
                        match = request.orig[None] == kept_orig[:, None]  # (new rows, current rows)
                        local = torch.where(is_added, -1, offset + match.to(torch.uint8).argmax(-1))
                        added.append(result.hidden[0][is_added.to(result.hidden.device)])
                        request.orig = kept_orig
                        request.pos = result.position_ids[..., 0, :].to(original_pos.dtype).cpu()
                    request.dropped = [*request.dropped, request.length - request.orig.numel()]
                    prompt_pos = original_pos[..., request.start : request.start + request.length]
                    if request.pos is not None:
                        kept_pos = request.pos.to(original_pos.device)
                    elif method.position_policy == "renumber":
                        kept_pos = torch.arange(request.orig.numel(), dtype=original_pos.dtype)
                        kept_pos = kept_pos.expand(*original_pos.shape[:-1], -1)
                    else:
                        kept_pos = original_pos[..., request.start + request.orig]
                    request.shift = [*request.shift, int(prompt_pos.max()) - int(kept_pos.max())]
                    new_pos.append(kept_pos)
                else:
                    new_pos.append(original_pos[..., rows[offset : offset + 1]] - request.shift[stage_at[layer_idx]])
                keep.append(local)
                offset += n
            self.v2drop_seconds["prune"] += time.perf_counter() - start_time
            for request in requests:
                if request.prefill and request.ctx is not None and layer_idx == max(stage_at):
                    self.v2drop_traces.append(
                        {
                            "prompt_length": request.prompt,
                            "generated": request.length - request.prompt,  # > 0: a preempted request recomputed
                            "stages": list(request.ctx.traces[0].stages),
                        }
                    )
            added = torch.cat(added) if any(len(a) for a in added) else None
            return torch.cat(keep), added, torch.cat(new_pos, dim=-1)

        def _v2drop_metadata(self, context, names, requests, segment, meta):
            """Give the layers ``names`` the attention metadata and slot mapping of the kept tokens of every request
            (segment ``segment``: the layers from its stage on)."""
            attn = self.language_model.model.layers[0].self_attn.attn
            block_size = attn.kv_cache.shape[2]
            q_lens, seq_lens, slot_rows = [], [], []
            for r, request in enumerate(requests):
                row = meta.block_table[r]
                d = request.dropped[segment]
                if request.prefill:
                    if segment == 0 and not torch.equal(
                        slots(row, torch.arange(request.length), block_size),
                        meta.slot_mapping[request.start : request.start + request.length].long(),
                    ):
                        raise RuntimeError(
                            "vLLM's slot mapping is not the block-table layout the in-LLM plugin assumes"
                        )
                    kept = request.length - d
                    q_lens.append(kept)
                    seq_lens.append(kept)
                    slot_rows.append(slots(row, torch.arange(kept), block_size))
                else:
                    q_lens.append(1)
                    seq_lens.append(request.seq_len - d)
                    slot_rows.append(slots(row, torch.tensor([request.seq_len - 1 - d]), block_size))
            slot_mapping = torch.cat(slot_rows).to(meta.slot_mapping.dtype)
            new = compact_metadata(meta, q_lens, seq_lens, slot_mapping, attn)
            for name in names:
                context.attn_metadata[name] = new
                context.slot_mapping[name] = slot_mapping

    return InLLMDecoderLoop
