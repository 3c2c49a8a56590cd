"""An InternVL3 processor stand-in for machines without torchvision (images)."""

from __future__ import annotations

import json

import torch
from transformers import AutoTokenizer
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from v2drop.models.frames import read_chat_template, read_optional_json, save_image_and_text_parts
from v2drop.models.onevision_processor import _expand


class InternVLProcessorLite:
    """Tokenizer + ``GotOcr2ImageProcessorPil``, as ``InternVLProcessor`` lays image prompts out.

    ``InternVLProcessor`` cannot be loaded without torchvision (its video processor needs it). This
    does its image job for one prompt: every image is cut into tiles (``crop_to_patches``: up to
    ``max_patches`` tiles of the tile size, plus a thumbnail last when there are several) by the real
    PIL image processor, and each ``<IMG_CONTEXT>`` of the prompt becomes ``<img>``, then
    ``image_seq_length`` ``<IMG_CONTEXT>`` per tile, then ``</img>`` (``InternVLProcessor.replace_image_token``).
    The outputs (``input_ids``, ``attention_mask``, ``pixel_values``) equal the real processor's.
    Videos are not served.
    """

    def __init__(self, image_processor, tokenizer, image_seq_length: int = 256, chat_template: str | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_seq_length = image_seq_length
        self.image_token = getattr(tokenizer, "context_image_token", None) or "<IMG_CONTEXT>"
        self.start_image_token = getattr(tokenizer, "start_image_token", None) or "<img>"
        self.end_image_token = getattr(tokenizer, "end_image_token", None) or "</img>"
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)

    @classmethod
    def from_pretrained(cls, path: str) -> InternVLProcessorLite:
        """The stand-in for a saved InternVL checkpoint (image processor, tokenizer, ``processor_config.json``)."""
        config = read_optional_json(path, "processor_config.json")
        return cls(
            GotOcr2ImageProcessorPil.from_pretrained(path),
            AutoTokenizer.from_pretrained(path),
            image_seq_length=config.get("image_seq_length", 256),
            chat_template=read_chat_template(path),
        )

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """The chat template applied to ``messages``."""
        if self.chat_template is None:
            raise ValueError("This processor has no chat template; build prompts with the family's format instead")
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def __call__(self, text: str, images=None, videos=None, return_tensors: str = "pt", **kwargs) -> dict:
        """``input_ids``, ``attention_mask`` and ``pixel_values`` (tiles, 3, H, W) for one prompt, as
        ``InternVLProcessor`` returns them."""
        if not isinstance(text, str):
            raise ValueError(f"{type(self).__name__} processes one prompt at a time (got {type(text).__name__})")
        if videos is not None and len(videos):
            raise ValueError(
                "InternVLProcessorLite serves images only; give the video's frames as images, or install torchvision "
                "for transformers' InternVLProcessor"
            )
        out: dict = {}
        if images:
            images = list(images) if isinstance(images, (list, tuple)) else [images]
            vision = self.image_processor(images=images, crop_to_patches=True, return_tensors="pt")
            out["pixel_values"] = vision["pixel_values"]
            tiles = (
                vision["num_patches"].tolist() if hasattr(vision["num_patches"], "tolist") else vision["num_patches"]
            )
            text = _expand(
                text,
                self.image_token,
                [
                    self.start_image_token + self.image_token * self.image_seq_length * n + self.end_image_token
                    for n in tiles
                ],
            )
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        out["input_ids"] = ids
        out["attention_mask"] = torch.ones_like(ids)
        return out

    def save_pretrained(self, path) -> None:
        """Save in the real processor's layout (a machine with torchvision loads it as ``InternVLProcessor``)."""
        path = save_image_and_text_parts(path, self.image_processor, self.tokenizer)
        config = {"processor_class": "InternVLProcessor", "image_seq_length": self.image_seq_length}
        (path / "processor_config.json").write_text(json.dumps(config, indent=2))
        if self.chat_template:
            (path / "chat_template.jinja").write_text(self.chat_template)
