"""Decoding video files into frames (PyAV, optional)."""

from __future__ import annotations


def decode_frames(path: str) -> list:
    """Every frame of a video file as an RGB PIL image (needs PyAV: ``pip install av``)."""
    try:
        import av
    except ImportError as err:
        raise ImportError(f"Reading the video {path!r} needs PyAV: pip install av") from err
    with av.open(path) as container:
        frames = [f.to_image().convert("RGB") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"No frames could be decoded from {path!r}")
    return frames
