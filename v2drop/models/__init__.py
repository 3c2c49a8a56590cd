"""Model-family adapters; importing this package registers the built-in families."""

from v2drop.models import gemma3, internvl, llava, qwen2vl, qwen3vl  # noqa: F401  (registration on import)
from v2drop.models.base import FAMILIES, Adapter, adapter_for, register_family

__all__ = ["FAMILIES", "Adapter", "adapter_for", "register_family"]
