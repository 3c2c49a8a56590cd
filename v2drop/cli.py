"""The one runner every command uses: user errors as one line and exit status 2, interrupts with a resume hint.

    def main(argv=None):
        return run(_main, argv)

A ``ValueError``, ``FileNotFoundError`` or ``PermissionError`` (what the checks and the library
raise for bad input) prints ``error: <message>`` on stderr and exits with status 2, with no
traceback; ``--debug`` anywhere on the command line or ``V2DROP_DEBUG=1`` re-raises it instead.
Ctrl-C (or SIGTERM) prints ``interrupted`` and any notes the work attached (where the finished
records are, how to resume) and exits with status 130. Any other exception is a bug and keeps
its traceback (with those notes).

``parse_config`` is the one way a command reads its command line: given the command's config
dataclass it builds the parser (``--config file.yaml``, repeated ``--set key.sub=value``, one
flag per top-level field, ``--help`` listing every key with its one-line doc) and returns an
instance of the dataclass, layered defaults <- ``--config`` <- ``--set`` <- flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from v2drop.config import _field_types, config_from_dict, field_docs, parse_overrides, read_yaml

T = TypeVar("T")

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


def parse_config(
    schema: type[T],
    argv: Sequence[str] | None,
    doc: str | None = None,
    config: str | None = None,
    positional: str | None = None,
) -> T:
    """An instance of the config dataclass ``schema`` from ``argv``: defaults, ``--config``, ``--set``, then flags.

    Parameters
    ----------
    schema : dataclass type
        The command's config; nested dataclass fields are sections, set with ``--set section.key=value``.
    argv : list of str
        The command line (without the program name).
    doc : str, optional
        The ``--help`` description (the command module's docstring).
    config : str, optional
        The YAML file read when ``--config`` is not given.
    positional : str, optional
        A field that may also be given as the one positional argument.
    """
    parser = config_parser(schema, doc, config, positional)
    args = vars(parser.parse_args(list(argv or ())))
    flags = {}
    for name in _flag_fields(schema):
        if name in args:
            value = args[name]
            flags[name] = parse_overrides(value) if isinstance(value, list) and _is_dict(schema, name) else value
    if positional and args.get("_" + positional) is not None:
        flags.setdefault(positional, args["_" + positional])
    layers = [read_yaml(args["config"], what=f"{schema.__name__} config")] if args["config"] else []
    return config_from_dict(schema, *layers, parse_overrides(args["set"]), flags)


def config_parser(
    schema: type, doc: str | None = None, config: str | None = None, positional: str | None = None
) -> argparse.ArgumentParser:
    """The argument parser of ``schema``: ``--config``, ``--set`` and one flag per top-level field, documented."""
    docs = field_docs(schema)
    hints = _field_types(schema)
    sections = _section_lines(schema, prefix="")
    epilog = None
    if sections:
        epilog = "keys of the sections (--set section.key=value, or in the --config file):\n" + "\n".join(sections)
    parser = _Parser(description=doc, epilog=epilog, formatter_class=_Formatter)
    parser.add_argument(
        "--config",
        default=config,
        metavar="FILE",
        help=f"YAML file of config keys, applied over the defaults (default: {config or 'none'})",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any config key, e.g. limit=20 or section.key=[1, 2] (value read as YAML; repeatable; "
        "applied after --config, before the flags)",
    )
    if positional:
        parser.add_argument("_" + positional, nargs="?", default=None, metavar=positional, help=docs[positional])
    defaults = {f.name: _default(f) for f in dataclasses.fields(schema)}
    for name in _flag_fields(schema):
        kind = _strip_optional(hints.get(name, Any))
        flag = "--" + name.replace("_", "-")
        text = _escape(f"{docs[name]} (default: {_show(defaults[name])})")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif _is_dict(schema, name):
            parser.add_argument(
                flag, action="append", default=argparse.SUPPRESS, metavar="KEY=VALUE", help=text + " (repeatable)"
            )
        elif typing.get_origin(kind) is list or kind is list:
            (item,) = typing.get_args(kind) or (Any,)
            parser.add_argument(
                flag,
                nargs="*",
                action="extend",
                type=_converter(item),
                default=argparse.SUPPRESS,
                metavar=_metavar(item),
                help=text + " (one or more values; repeatable)",
            )
        else:
            parser.add_argument(
                flag, type=_converter(kind), default=argparse.SUPPRESS, metavar=_metavar(kind), help=text
            )
    return parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The description and epilog as written; option help wrapped at spaces only (never inside a-hyphenated-word)."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors (unknown flag, bad number) are user errors: one line, exit status 2."""

    def error(self, message: str):
        import difflib

        flags = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        words = message.partition("unrecognized arguments:")[2].split() if "unrecognized" in message else []
        close = [m for w in words if w.startswith("--") for m in difflib.get_close_matches(w.split("=")[0], flags, 1)]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"{message} ({hint}--help lists the options)")


def config_keys(schema: type, prefix: str = "") -> dict[str, str]:
    """Every key of ``schema`` (nested ones as ``section.key``) -> its one-line doc."""
    docs = field_docs(schema)
    hints = _field_types(schema)
    out = {}
    for f in dataclasses.fields(schema):
        out[prefix + f.name] = docs[f.name]
        if _is_section(hints.get(f.name)):
            out.update(config_keys(hints[f.name], prefix=f"{prefix}{f.name}."))
    return out


def _flag_fields(schema: type) -> list[str]:
    hints = _field_types(schema)
    return [f.name for f in dataclasses.fields(schema) if not _is_section(hints.get(f.name))]


def _section_lines(schema: type, prefix: str) -> list[str]:
    """``  section.key  doc (default: value)`` for every key inside a section of ``schema``."""
    hints = _field_types(schema)
    lines = []
    for f in dataclasses.fields(schema):
        if not _is_section(hints.get(f.name)):
            continue
        section = hints[f.name]
        docs = field_docs(section)
        default = _default(f)
        lines.append(f"  {prefix}{f.name}: {field_docs(schema)[f.name]}")
        for sub in dataclasses.fields(section):
            if _is_section(_field_types(section).get(sub.name)):
                continue
            value = getattr(default, sub.name, None) if default is not None else None
            lines.append(f"    {prefix}{f.name}.{sub.name}  {docs[sub.name]} (default: {_show(value)})")
        lines += _section_lines(section, prefix=f"{prefix}{f.name}.")
    return lines


def _is_section(kind) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _is_dict(schema: type, name: str) -> bool:
    kind = _strip_optional(_field_types(schema).get(name, Any))
    return kind is dict or typing.get_origin(kind) is dict


def _strip_optional(kind):
    """``X | None`` -> ``X``; any other type unchanged."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return kind


def _converter(kind) -> Callable[[str], Any]:
    """A flag's text as the field's value: text for ``str`` fields, else read as YAML (``3``, ``null``, ``auto``)."""
    kind = _strip_optional(kind)
    if kind is str or kind is Path:
        return str

    def convert(text: str):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return text

    convert.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in its error messages
    return convert


def _metavar(kind) -> str:
    kind = _strip_optional(kind)
    return {int: "N", float: "X", str: "TEXT"}.get(kind, "VALUE")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(value) -> str:
    """A default as it would be written in YAML, on one line."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _escape(text: str) -> str:
    return text.replace("%", "%%")
