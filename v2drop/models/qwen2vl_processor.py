"""A Qwen2-VL processor stand-in for machines without torchvision (images only)."""

from __future__ import annotations

import torch


class QwenProcessorLite:
    """Tokenizer + ``Qwen2VLImageProcessorPil``, expanding each ``<|image_pad|>`` to its grid's tokens.

    ``Qwen2VLProcessor`` needs torchvision for its video processor; this does the image half of
    its job identically (placeholder expansion = ``grid_thw.prod() // merge_size**2``) and returns
    ``mm_token_type_ids``. Video inputs need the real processor.
    """

    image_token = "<|image_pad|>"
    video_token = "<|video_pad|>"

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """The tokenizer's chat template applied to ``messages``."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)

    def __call__(self, text: str, images=None, videos=None, return_tensors: str = "pt") -> dict:
        """``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and pixel inputs for one prompt."""
        if videos:
            raise ValueError("QwenProcessorLite handles images only; install torchvision to use Qwen2-VL video inputs")
        out: dict = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            out.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
            merge = self.image_processor.merge_size**2
            pieces = text.split(self.image_token)
            counts = [int(g.prod()) // merge for g in vision["image_grid_thw"]]
            text = pieces[0] + "".join(self.image_token * c + p for c, p in zip(counts, pieces[1:]))
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        out["input_ids"] = ids
        out["attention_mask"] = torch.ones_like(ids)
        out["mm_token_type_ids"] = (ids == image_id).int()
        return out

    def save_pretrained(self, path) -> None:
        """Save the image processor and tokenizer side by side."""
        self.image_processor.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
