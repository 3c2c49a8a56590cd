"""A Qwen3-VL processor stand-in for machines without torchvision (images)."""

from __future__ import annotations

from v2drop.models.qwen2vl_processor import QwenProcessorLite


class Qwen3ProcessorLite(QwenProcessorLite):
    """Tokenizer + ``Qwen2VLImageProcessorPil``, as ``Qwen3VLProcessor`` does images.

    ``Qwen3VLProcessor`` needs torchvision for its video processor. Its images are Qwen2-VL's
    (the checkpoint's image processor: patch 16, merge 2, mean and std 0.5), each
    ``<|image_pad|>`` expanded to ``grid_thw.prod() // merge_size**2`` tokens, with
    ``mm_token_type_ids``. Videos, which Qwen3-VL lays out one frame at a time after a
    ``<t seconds>`` timestamp, are refused with a clear error.
    """

    def __call__(self, text: str, images=None, videos=None, **kwargs) -> dict:
        """``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and the image inputs for one prompt."""
        if videos is not None and len(videos):
            raise ValueError(
                "The Qwen3-VL stand-in processor takes images only: Qwen3-VL videos (one grid per frame after a "
                "'<t seconds>' timestamp) need transformers' Qwen3VLProcessor, which needs torchvision "
                "(`pip install torchvision` matching your torch build)"
            )
        return super().__call__(text, images=images, **kwargs)
