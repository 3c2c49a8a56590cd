"""Deprecated shim: the tiny models moved to ``v2drop.testing`` (import from there)."""

from v2drop.testing import *  # noqa: F401,F403
from v2drop.testing import _clip, _llama  # noqa: F401  (private builders some tests may use)
