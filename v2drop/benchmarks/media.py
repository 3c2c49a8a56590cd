"""Decoding images and videos, and picking frames, for the real benchmarks.

Images come as PIL images, ``datasets`` image dicts, bytes, paths or base64 (as MMBench's TSV
files hold them); videos as lists of frame images, folders of frames (natural order) or video
files (PyAV, imported only when a video file is read).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from v2drop.benchmarks.base import DataError
from v2drop.models.frames import Clip

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
    """``image`` resized (bicubic, aspect kept) so its longer side is at most ``max_side`` pixels; as is when None or
    smaller.
    """
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


def decode_video(path: Path, num_frames: int, bounds: tuple[float, float] | None = None) -> Clip:
    """``num_frames`` RGB frames picked uniformly from a video file (within ``bounds`` seconds), decoding only those,
    as a ``Clip`` whose metadata says where they come from.

    The metadata (``transformers.video_utils.VideoMetadata`` fields) holds the source's frame rate
    (``fps``), the frames of the window sampled from (``total_num_frames``: the whole video, or the
    frames within ``bounds``), the picked source frames (``frames_indices``, counted from the start
    of the video), ``duration`` in seconds, the frame size and ``video_backend``; so Qwen2.5-VL's
    ``second_per_grid_ts`` (from the sampled rate ``len(frames_indices) / total_num_frames * fps``)
    and Qwen3-VL's timestamps (``frames_indices / fps``) are the video's own, as qwen-vl-utils reads
    them. Needs PyAV (``pip install av``). Seeks to each picked frame instead of decoding the whole
    video, so hour-long Video-MME videos cost ``num_frames`` short decodes.
    """
    try:
        import av
    except ImportError:
        raise DataError(
            f"reading the video file {path} needs PyAV (pip install av); or give the video as frame images"
        ) from None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        base = float(stream.time_base)
        start_pts = stream.start_time or 0
        total = stream.frames or (
            int(float(stream.duration * stream.time_base) * rate) if stream.duration and rate else 0
        )
        if not rate or not total:  # length unknown: decode it all, then pick
            frames = [f.to_image().convert("RGB") for f in container.decode(stream)]
            total = len(frames)
            first, last = _clip(total, rate, bounds)
            indices = [first + i for i in frame_indices(last - first + 1, num_frames)]
            return video_clip([frames[i] for i in indices], indices, last - first + 1, total, rate or None)
        first, last = _clip(total, rate, bounds)
        indices = [first + i for i in frame_indices(last - first + 1, num_frames)]
        out = []
        for index in indices:
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
    return video_clip(out, indices, last - first + 1, total, rate)


def video_clip(frames: list, indices: list[int], window: int, total: int, fps: float | None) -> Clip:
    """A ``Clip`` of ``frames``, the source frames ``indices`` of a window of ``window`` frames in a video of ``total``
    frames at ``fps`` frames a second (None: unknown), with ``VideoMetadata``'s fields (``decode_video``)."""
    if len(frames) != len(indices):
        raise ValueError(f"video_clip got {len(frames)} frames for {len(indices)} indices; give one index per frame")
    width, height = frames[0].size if frames else (None, None)
    metadata = {
        "total_num_frames": window,
        "fps": fps,
        "frames_indices": list(indices),
        "duration": total / fps if fps else None,
        "width": width,
        "height": height,
        "video_backend": "pyav",
    }
    return Clip(tuple(frames), metadata)


def _clip(total: int, rate: float, bounds: tuple[float, float] | None) -> tuple[int, int]:
    """First and last frame index of a video of ``total`` frames within ``bounds`` seconds (all of it without)."""
    if not total:
        raise DataError("a video with no frames")
    if bounds is None or not rate:
        return 0, total - 1
    first = min(max(0, round(bounds[0] * rate)), total - 1)
    return first, max(first, min(total - 1, round(bounds[1] * rate)))


# -- lazy references and the bounded cache ------------------------------------------------------------------


class MediaCache:
    """A least-recently-used cache of decoded media, bounded in entries and in decoded bytes.

    Keys are a medium's identity (``MediaRef.key``), so questions about one image or video share
    one decode while it stays among the most recent; the newest entry is always kept, even alone
    over ``max_bytes``.
    """

    def __init__(self, max_entries: int = 32, max_bytes: int = 512 * 2**20):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(f"MediaCache needs max_entries >= 1 and max_bytes >= 1, got {max_entries} and {max_bytes}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Hashable, tuple] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.entries

    def get(self, ref: MediaRef) -> tuple:
        """The decoded images of ``ref``: from the cache when there, else decoded and remembered (evicting the
        oldest)."""
        key = ref.key
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        images = ref.decode()
        self.entries[key] = images
        self.nbytes += _nbytes(images)
        while len(self.entries) > 1 and (len(self.entries) > self.max_entries or self.nbytes > self.max_bytes):
            _, old = self.entries.popitem(last=False)
            self.nbytes -= _nbytes(old)
        return images

    def clear(self) -> None:
        """Forget every entry and reset the counters."""
        self.entries.clear()
        self.nbytes = self.hits = self.misses = 0


def _nbytes(images: tuple) -> int:
    """Decoded size of PIL images (width x height x bands bytes each)."""
    return sum(im.width * im.height * len(im.getbands()) for im in images)


MEDIA_CACHE = MediaCache()  # the per-process cache ``Sample.images`` decodes through (each loader worker has its own)


@dataclass(frozen=True, eq=False)
class MediaRef:
    """Where one sample's pixels are, decoded only on demand (``MEDIA_CACHE.get(ref)``): a light, picklable record.

    ``kind``: ``image`` (``source``: a file path, encoded bytes or base64 text), ``frames`` (a
    tuple of frame file paths, sampled to ``num_frames``), ``folder`` (a folder of frame images)
    or ``video`` (a video file; PyAV). Frames are shrunk to ``max_side`` when given.
    """

    kind: str  # image, frames, folder or video
    source: Any  # a path (str), bytes, base64 text, or a tuple of frame paths
    num_frames: int | None = None  # frames picked uniformly (frames, folder, video)
    bounds: tuple[float, float] | None = None  # seconds of a video file to pick frames within
    max_side: int | None = None  # shrink frames so their longer side is at most this

    def __post_init__(self):
        if self.kind not in ("image", "frames", "folder", "video"):
            raise ValueError(f"MediaRef kind must be image, frames, folder or video, got {self.kind!r}")

    @cached_property
    def key(self) -> Hashable:
        """The medium's identity: its path(s) and sampling, or a digest of inline bytes/base64."""
        source = self.source
        if isinstance(source, (bytes, bytearray)) or (isinstance(source, str) and existing_path(None, source) is None):
            data = bytes(source) if isinstance(source, (bytes, bytearray)) else source.encode()
            source = "sha1:" + hashlib.sha1(data).hexdigest()
        return (self.kind, source, self.num_frames, self.bounds, self.max_side)

    def decode(self) -> tuple | Clip:
        """The RGB image(s): one for an image, the picked frames for frames or a folder, and for a video file the
        ``Clip`` of its picked frames with the video's metadata (``decode_video``); a DataError when they cannot be
        decoded."""
        if self.kind == "image":
            return (open_image(self.source, None),)
        if self.kind == "frames":
            picks = sample_frames(list(self.source), self.num_frames or len(self.source))
            return tuple(shrink(open_image(p, None), self.max_side) for p in picks)
        path = Path(self.source)
        if self.kind == "folder":
            picked = [decode_image_file(p) for p in sample_frames(frame_files(path), self.num_frames or 1)]
            return tuple(shrink(im, self.max_side) for im in picked)
        clip = decode_video(path, self.num_frames or 1, self.bounds)
        return Clip(tuple(shrink(im, self.max_side) for im in clip), clip.metadata)

    def check(self) -> None:
        """A cheap check that the medium is there and readable: files exist, image headers parse; nothing is decoded."""
        if self.kind == "image":
            _check_header(self.source)
        elif self.kind == "frames":
            if not self.source:
                raise DataError("a video with no frames")
            for p in self.source:
                _check_header(p)
        elif self.kind == "folder":
            frame_files(Path(self.source))
        elif not Path(self.source).is_file():
            raise DataError(f"video file {self.source} does not exist")


def _check_header(source: Any) -> None:
    """Open an image's header (PIL reads pixels only on ``load``); a DataError naming it when that fails."""
    if isinstance(source, str) and existing_path(None, source) is not None:
        opener, what = source, f"image file {source}"
    else:
        data = source if isinstance(source, (bytes, bytearray)) else _base64(str(source))
        opener, what = (
            io.BytesIO(bytes(data)),
            "image bytes" if isinstance(source, (bytes, bytearray)) else "base64 image",
        )
    try:
        with Image.open(opener):
            pass
    except OSError as err:
        raise DataError(f"{what} cannot be read ({err})") from None


def _base64(value: str, root: Path | None = None) -> bytes:
    """The bytes of base64 text (a ``data:`` URL prefix allowed); a DataError when it is not base64 (nor a file under
    ``root``).
    """
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"image {value[:60]!r} is neither a file under {root} nor base64") from None


def image_ref(value: Any, root: Path | None) -> MediaRef | Image.Image:
    """A lazy reference to one image given as a ``datasets`` image dict, bytes, a path under ``root`` or base64.

    A PIL image (already decoded, e.g. by ``datasets``) is returned as it is: there is nothing to defer.
    """
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes"):
            return MediaRef("image", bytes(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return MediaRef("image", bytes(value))
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"no image in {str(value)[:60]!r}")
    path = existing_path(root, value)
    if path is not None:
        return MediaRef("image", str(path.absolute()))  # loader workers may not share a relative root's meaning
    _base64(value, root)  # fail at load time on text that is neither a file nor base64
    return MediaRef("image", value)
