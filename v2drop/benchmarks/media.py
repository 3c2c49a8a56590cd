"""Decoding images and videos, and picking frames, for the real benchmarks.

Images come as PIL images, ``datasets`` image dicts, bytes, paths or base64 (as MMBench's TSV
files hold them); videos as lists of frame images, folders of frames (natural order) or video
files (PyAV, imported only when a video file is read).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from v2drop.benchmarks.base import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")  # what a folder of frames may hold

# -- images -------------------------------------------------------------------------------------------------


def existing_path(root: Path | None, value: str) -> Path | None:
    """The existing file or folder ``value`` names (relative to ``root`` when given), if any."""
    if len(value) > 4096 or "\n" in value:  # base64 payloads: not worth a stat (and too long for one)
        return None
    path = root / value if root is not None else Path(value)
    try:
        return path if path.exists() else None
    except OSError:  # a name too long for the file system
        return None


def decode_image_file(path: Path) -> Image.Image:
    """The RGB image in file ``path``; a DataError naming it when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as err:
        raise DataError(f"image file {path} cannot be decoded ({err})") from None


def decode_image_bytes(data: bytes, what: str) -> Image.Image:
    """The RGB image encoded in ``data``; a DataError naming ``what`` when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except OSError as err:
        raise DataError(f"{what} cannot be decoded ({err})") from None


def open_image(value: Any, root: Path | None, files: dict[str, Image.Image] | None = None) -> Image.Image:
    """An RGB image from a PIL image, a ``datasets`` image dict, bytes, a path under ``root`` or base64.

    With ``files`` (a dict kept by the caller), an image read from a file is decoded once per path
    and shared by every later call naming it.
    """
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            return decode_image_bytes(value["bytes"], "image bytes")
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return decode_image_bytes(bytes(value), "image bytes")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"no image in {str(value)[:60]!r}")
    path = existing_path(root, value)
    if path is not None:
        if files is None:
            return decode_image_file(path)
        if str(path) not in files:
            files[str(path)] = decode_image_file(path)
        return files[str(path)]
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"image {value[:60]!r} is neither a file under {root} nor base64") from None
    return decode_image_bytes(data, f"base64 image {value[:20]!r}...")


def shrink(image: Image.Image, max_side: int | None) -> Image.Image:
    """``image`` resized (bicubic, aspect kept) so its longer side is at most ``max_side`` pixels; as is when None or smaller."""
    if max_side is None or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)


# -- video frames -------------------------------------------------------------------------------------------


def frame_indices(n_frames: int, num_frames: int) -> list[int]:
    """Uniform picks ``np.linspace(0, n-1, k)`` rounded, as the official video evals; all frames when fewer than k."""
    if n_frames < 1:
        raise DataError("a video with no frames")
    k = min(num_frames, n_frames)  # repeating frames would only add duplicate vision tokens
    return np.linspace(0, n_frames - 1, k).round().astype(int).tolist()


def sample_frames(frames: list, n: int) -> list:
    """``n`` of ``frames`` picked uniformly (``frame_indices``)."""
    return [frames[i] for i in frame_indices(len(frames), n)]


def natural_key(name: str) -> list:
    """Sort key putting ``frame_2`` before ``frame_10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[Path]:
    """The image files of a folder of frames, in natural order."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"the frame folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(files, key=lambda p: natural_key(p.name))


def decode_video(path: Path, num_frames: int, bounds: tuple[float, float] | None = None) -> list[Image.Image]:
    """``num_frames`` RGB frames picked uniformly from a video file (within ``bounds`` seconds), decoding only those.

    Needs PyAV (``pip install av``). Seeks to each picked frame instead of decoding the whole
    video, so hour-long Video-MME videos cost ``num_frames`` short decodes.
    """
    try:
        import av
    except ImportError:
        raise DataError(f"reading the video file {path} needs PyAV (pip install av); or give the video as frame images") from None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        base = float(stream.time_base)
        start_pts = stream.start_time or 0
        total = stream.frames or (int(float(stream.duration * stream.time_base) * rate) if stream.duration and rate else 0)
        if not rate or not total:  # length unknown: decode it all, then pick
            frames = [f.to_image().convert("RGB") for f in container.decode(stream)]
            first, last = _clip(len(frames), rate, bounds)
            return sample_frames(frames[first : last + 1], num_frames)
        first, last = _clip(total, rate, bounds)
        out = []
        for index in (first + i for i in frame_indices(last - first + 1, num_frames)):
            target = start_pts + int(round(index / rate / base))
            container.seek(target, stream=stream, backward=True, any_frame=False)  # to the key frame before it
            chosen = None
            for frame in container.decode(stream):
                chosen = frame
                if frame.pts is not None and frame.pts >= target - int(0.5 / rate / base):
                    break
            if chosen is None:
                raise DataError(f"frame {index} of {path} cannot be decoded")
            out.append(chosen.to_image().convert("RGB"))
    return out


def _clip(total: int, rate: float, bounds: tuple[float, float] | None) -> tuple[int, int]:
    """First and last frame index of a video of ``total`` frames within ``bounds`` seconds (all of it without)."""
    if not total:
        raise DataError("a video with no frames")
    if bounds is None or not rate:
        return 0, total - 1
    first = min(max(0, round(bounds[0] * rate)), total - 1)
    return first, max(first, min(total - 1, round(bounds[1] * rate)))
