"""Prompt pieces the real benchmarks share (LLaVA-1.5's suffixes, option lines); ``docs/benchmarks.md`` gives each full
prompt.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's GQA/TextVQA/POPE suffix
OPTION_ANSWER = (
    "\nAnswer with the option's letter from the given choices directly."  # LLaVA-1.5's multiple-choice suffix
)
LETTERS = string.ascii_uppercase  # option letters, in order


def options_text(options: Sequence[str], letters: str = LETTERS) -> str:
    """Options as lines ``A. ...``."""
    return "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
