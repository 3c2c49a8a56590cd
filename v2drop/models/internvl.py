"""InternVL3 (``InternVLForConditionalGeneration``): dynamic 448-pixel tiles, pixel shuffle, a Qwen2/Llama decoder."""

from __future__ import annotations

from v2drop.models.base import Adapter, register_family


@register_family("internvl")
class InternVLAdapter(Adapter):
    """InternVL3: every image is a few tiles plus a thumbnail (last), each a square grid of tokens.

    The processor cuts an image into up to ``max_patches`` tiles of the tower's input size and
    appends a thumbnail of the whole image when there is more than one tile; each tile's patches
    (the tower's [CLS] dropped) are pixel-shuffled (``downsample_ratio`` 0.5 merges 2x2 patches)
    into ``image_seq_length`` tokens, written as ``<img>`` + that many ``<IMG_CONTEXT>`` per tile
    + ``</img>``. ``pixel_values`` is (tiles, C, H, W) over the whole batch, so samples with
    different tile counts batch by concatenation. Positions are 1-D (the base ``position_ids``).
    Layout-aware scorers see every tile as its own grid (``image_grids``: one frame per tile).
    """

    image_inputs = ("pixel_values",)

    def tile_side(self) -> int:
        """Tokens along each side of one tile: (image size / patch size) x ``downsample_ratio``."""
        cfg = self.model.config
        size, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        return int(size // patch * cfg.downsample_ratio)

    def image_grids(self, inputs: dict) -> list[tuple[int, int, int]]:
        """One (1, side, side) grid per tile (thumbnails included), in prompt order."""
        side = self.tile_side()
        n_tokens = int(((inputs["input_ids"] == self.image_token_id) & inputs["attention_mask"].bool()).sum())
        if n_tokens % (side * side):
            raise ValueError(
                f"The prompts hold {n_tokens} <IMG_CONTEXT> tokens, not a whole number of {side}x{side}-token tiles: "
                "build them with the model's processor"
            )
        return [(1, side, side)] * (n_tokens // (side * side))

    def vision_tower_state(self, inputs: dict, request) -> dict:
        """Refused: the tokens InternVL feeds its decoder carry no [CLS] token (see the message)."""
        raise ValueError(
            "Model family 'internvl': the tokens InternVL feeds its decoder have no [CLS] token (the tower's [CLS] is "
            "dropped before the pixel shuffle merges 2x2 patches into one token), and serving its [CLS] attention per "
            "merged token is not implemented; a scorer with a vision_request() (VisionZip, VisPruner, HiPrune) runs on "
            "llava and llava_next, or use a scorer that reads the projected features (divprune, cdpruner)"
        )
