"""v2drop: training-free visual-token dropping (V²Drop and baselines) inside Hugging Face LVLMs."""

from v2drop.engine import EngineOutput, SampleTrace, select_keep
from v2drop.lvlm import LVLM, GenerationResult, load
from v2drop.method import Method
from v2drop.presets import Preset, find_presets, get_preset, list_presets
from v2drop.schedule import Schedule, Stage, solve_keep
from v2drop.scorers import (
    AttentionRequest,
    LayerState,
    Merge,
    Scorer,
    Selection,
    build_scorer,
    list_scorers,
    register_scorer,
)

__all__ = [
    "LVLM",
    "AttentionRequest",
    "EngineOutput",
    "GenerationResult",
    "LayerState",
    "Merge",
    "Method",
    "Preset",
    "SampleTrace",
    "Schedule",
    "Scorer",
    "Selection",
    "Stage",
    "build_scorer",
    "find_presets",
    "get_preset",
    "list_presets",
    "list_scorers",
    "load",
    "register_scorer",
    "select_keep",
    "solve_keep",
]
__version__ = "0.2.0"
