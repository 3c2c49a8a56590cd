"""Deprecated: the old ``v2drop.realbench.common`` names, now in ``v2drop.benchmarks`` (base, hub, media, metrics,
prompts).
"""

from v2drop.benchmarks.base import DataError
from v2drop.benchmarks.hub import HFBenchmark, VideoBenchmark, hub_dataset, hub_offline, present, read_table
from v2drop.benchmarks.media import IMAGE_SUFFIXES, decode_video, frame_files, frame_indices, natural_key, sample_frames
from v2drop.benchmarks.metrics import mean, normalize_vqa, parse_option, per_family_accuracy, vqa_accuracy
from v2drop.benchmarks.prompts import LETTERS, OPTION_ANSWER, SHORT_ANSWER, options_text

__all__ = [
    "IMAGE_SUFFIXES",
    "LETTERS",
    "OPTION_ANSWER",
    "SHORT_ANSWER",
    "DataError",
    "HFBenchmark",
    "VideoBenchmark",
    "decode_video",
    "frame_files",
    "frame_indices",
    "hub_dataset",
    "hub_offline",
    "mean",
    "natural_key",
    "normalize_vqa",
    "options_text",
    "parse_option",
    "per_family_accuracy",
    "present",
    "read_table",
    "sample_frames",
    "vqa_accuracy",
]
