"""The one runner every command uses: user errors as one line and exit status 2, interrupts with a resume hint.

    def main(argv=None):
        return run(_main, argv)

A ``ValueError``, ``FileNotFoundError`` or ``PermissionError`` (what the checks and the library
raise for bad input) prints ``error: <message>`` on stderr and exits with status 2, with no
traceback; ``--debug`` anywhere on the command line or ``V2DROP_DEBUG=1`` re-raises it instead.
Ctrl-C (or SIGTERM) prints ``interrupted`` and any notes the work attached (where the finished
records are, how to resume) and exits with status 130. Any other exception is a bug and keeps
its traceback (with those notes).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def debug_enabled(argv: Sequence[str] | None = None) -> bool:
    """True with ``--debug`` in ``argv`` or ``V2DROP_DEBUG`` set to something other than 0/empty."""
    return "--debug" in (argv or ()) or os.environ.get("V2DROP_DEBUG", "") not in ("", "0")


def one_line(err: BaseException) -> str:
    """The exception's message on one line (an empty message becomes the exception's type)."""
    text = " ".join(part.strip() for part in str(err).strip().splitlines() if part.strip())
    if isinstance(err, KeyError) and text.startswith("'"):
        text = text.strip("'\"")
    return text or type(err).__name__


def _terminate(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt(f"signal {signum}")


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> Any:
    """Call ``main(argv)`` (``--debug`` removed) and turn user errors and interrupts into exit statuses."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != "--debug"]
    previous = None
    try:  # SIGTERM (a scheduler ending the job) unwinds like Ctrl-C, so context managers release resources
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        return main(argv)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        for note in getattr(err, "__notes__", ()):
            print(note, file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt as err:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        for note in getattr(err, "__notes__", ()):
            print(note, file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
