"""Video frames with PIL and numpy only: what the processor stand-ins use where transformers' video
processors need torchvision."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.video_utils import VideoMetadata, make_batched_metadata


def is_frame(item: Any) -> bool:
    """Whether ``item`` is one frame (a PIL image or an (H, W, C) array) rather than a whole video."""
    return isinstance(item, Image.Image) or (isinstance(item, np.ndarray) and item.ndim == 3)


@dataclass(frozen=True)
class Clip:
    """One video's frames with its metadata, as transformers' video processors take them.

    ``metadata`` has ``transformers.video_utils.VideoMetadata``'s fields (a dict or that object):
    ``fps`` (the source's frame rate), ``total_num_frames`` and ``frames_indices`` (which source
    frames ``frames`` are). Qwen2.5-VL's temporal positions use the sampled frame rate
    ``len(frames_indices) / total_num_frames * fps`` and Qwen3-VL's timestamps ``frames_indices / fps``;
    without metadata transformers assumes 24 frames a second. A clip is a sequence of its frames.
    """

    frames: Sequence[Any]
    metadata: Any = None

    def __len__(self) -> int:
        """The number of frames."""
        return len(self.frames)

    def __iter__(self):
        """The frames in order."""
        return iter(self.frames)

    def __getitem__(self, index):
        """One frame (or a slice of the frames)."""
        return self.frames[index]


def presampled(metadata, n_frames: int) -> bool:
    """Whether a clip of ``n_frames`` frames was sampled from its source already (``decode_video``'s clips): its
    metadata names ``n_frames`` source frames (``frames_indices``) out of more (``total_num_frames``).

    Such a clip is used as it is: sampling it again would index source frames it does not hold (transformers'
    video processors fail on it; pass it with ``do_sample_frames=False``, which the stand-ins need not).
    """
    if metadata is None:
        return False
    meta = dict(metadata)
    indices, total = meta.get("frames_indices"), meta.get("total_num_frames")
    return indices is not None and len(indices) == n_frames and total is not None and total > n_frames


def _clips(videos: Sequence[Any] | None) -> list[Any]:
    """``videos`` as a list with one entry per video (a ``Clip``, a list of frames or a (T, H, W, 3) array)."""
    if videos is None:
        return []
    if isinstance(videos, (np.ndarray, Clip)):
        videos = [videos]
    videos = list(videos)
    if videos and is_frame(videos[0]):
        videos = [videos]
    return videos


def split_videos(videos: Sequence[Any] | None) -> list[list[np.ndarray]]:
    """One list of (H, W, 3) uint8 frames per video.

    ``videos`` is one video (a ``Clip``, a list of frames, or a (T, H, W, 3) array) or a list of
    videos (each a ``Clip``, a list of PIL images / (H, W, 3) arrays, or a (T, H, W, 3) array).
    """
    out = []
    for i, video in enumerate(_clips(videos)):
        if isinstance(video, Clip):
            video = video.frames
        frames = (
            list(video)
            if isinstance(video, (list, tuple)) or (isinstance(video, np.ndarray) and video.ndim == 4)
            else []
        )
        if not frames or not all(is_frame(f) for f in frames):
            raise ValueError(
                f"Video {i} is not a list of frames: give each video as a list of PIL images or (H, W, 3) arrays, "
                f"or as one (frames, H, W, 3) uint8 array"
            )
        out.append([np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f) for f in frames])
    return out


def clip_metadata(videos: Sequence[Any] | None) -> list[Any] | None:
    """Each video's ``Clip.metadata`` (None for plain frames), or None when no video carries any."""
    metadata = [v.metadata if isinstance(v, Clip) else None for v in _clips(videos)]
    return metadata if any(m is not None for m in metadata) else None


def metadata_per_clip(clips: list[list[np.ndarray]], video_metadata=None) -> list[VideoMetadata]:
    """One ``VideoMetadata`` per clip, as transformers' ``make_batched_metadata`` builds it.

    ``video_metadata`` is None, one dict / ``VideoMetadata`` or one per clip (None entries: the
    clip's own frame count, no frame rate, every frame).
    """
    if video_metadata is None:
        video_metadata = [None] * len(clips)
    elif isinstance(video_metadata, (dict, VideoMetadata)):
        video_metadata = [video_metadata]
    video_metadata = list(video_metadata)
    if len(video_metadata) != len(clips):
        raise ValueError(
            f"Received {len(clips)} videos but {len(video_metadata)} video_metadata entries; pass one entry per "
            f"video (None where a video has none)"
        )
    out = []
    for i, (clip, meta) in enumerate(zip(clips, video_metadata)):
        if meta is not None and dict(meta).get("total_num_frames") is None:
            raise ValueError(
                f"The metadata of video {i} has no total_num_frames: give the source video's frame count with its "
                f"fps (VideoMetadata fields), or no metadata"
            )
        out.append(make_batched_metadata([np.stack(clip)], None if meta is None else [dict(meta)])[0])
    return out


def resize_normalize(frame: np.ndarray, height: int, width: int, mean, std, rescale: float = 1 / 255) -> np.ndarray:
    """(C, H, W) float32: ``frame`` resized with PIL bicubic to height x width (if it is not that size), rescaled
    and normalised with the video processors' arithmetic.

    transformers' video processors fuse the two steps (``TorchvisionBackend.rescale_and_normalize``):
    ``(pixel - mean / rescale) / (std / rescale)`` in float32, the mean and std scaled as float32
    tensors; the same operations here give the same bits.
    """
    image = Image.fromarray(frame.astype(np.uint8))
    if image.size != (width, height):
        image = image.resize((width, height), Image.BICUBIC)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).to(torch.float32)
    mean = (torch.tensor(tuple(mean)) * (1.0 / rescale)).view(-1, 1, 1)
    std = (torch.tensor(tuple(std)) * (1.0 / rescale)).view(-1, 1, 1)
    return pixels.sub(mean).div_(std).numpy()


def read_optional_json(path: str | Path, name: str) -> dict:
    """``path/name`` parsed, or {} when the file does not exist."""
    file = Path(path) / name
    return json.loads(file.read_text()) if file.is_file() else {}


def read_chat_template(path: str | Path) -> str | None:
    """The processor's chat template saved beside a checkpoint (``chat_template.jinja`` or ``.json``), if any."""
    jinja = Path(path) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    return read_optional_json(path, "chat_template.json").get("chat_template")


def save_image_and_text_parts(path: str | Path, image_processor, tokenizer) -> Path:
    """Create ``path`` and save a stand-in processor's image processor and tokenizer into it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    image_processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
