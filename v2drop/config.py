"""Typed configs: one dataclass <-> YAML <-> ``key=value`` layer, shared by every entry point.

A config is a dataclass (nested dataclasses for YAML sections). ``load_config`` layers the
dataclass defaults, then a YAML file or a dict, then ``key.sub=value`` overrides, and returns an
instance of the dataclass. Values are checked against the field types (OmegaConf structured
configs), an unknown key is an error listing the valid ones, and a field typed as a plain
``dict`` or ``list`` is replaced by the new value, never merged into the default.

Each field's one-line doc is the comment after it (``limit: int | None = None  # first N samples``),
or the comment lines right above it when it has none; ``field_docs`` reads them once, for
``--help`` (``v2drop.cli.parse_config``) and the tests that every key is documented.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def load_config(
    schema: type[T], path: str | Path | None = None, overrides: Iterable[str] = (), data: dict | None = None
) -> T:
    """An instance of ``schema`` from its defaults, then ``path`` (YAML) or ``data``, then ``overrides``.

    Parameters
    ----------
    schema : dataclass type
        The config's type; nested dataclass fields are YAML sections.
    path : str or Path, optional
        A YAML file whose top level is a mapping of ``schema``'s fields.
    overrides : iterable of str
        ``key.sub=value`` items (values read as YAML: ``3``, ``[1, 2]``, ``null``, ``{a: 1}``).
    data : dict, optional
        Config data instead of (or, when both are given, on top of) the YAML file.
    """
    layers = []
    if path is not None:
        layers.append(read_yaml(path, what=f"{schema.__name__} config"))
    if data is not None:
        layers.append(data)
    layers.append(parse_overrides(overrides))
    return config_from_dict(schema, *layers)


def config_from_dict(schema: type[T], *layers: dict) -> T:
    """An instance of ``schema``: its defaults with each of ``layers`` (nested dicts) applied in turn."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.structured(schema)
    for layer in layers:
        if not isinstance(layer, dict):
            raise ValueError(
                f"{schema.__name__} config must be a mapping of keys to values, got {type(layer).__name__}: {layer!r}"
            )
        _apply(cfg, schema, layer, prefix="")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ValueError(f"{schema.__name__} config: {_first_line(err)}") from None


def config_to_dict(cfg: Any) -> dict:
    """Plain data (dicts, lists, scalars) of a config dataclass, for YAML, JSON and wandb."""
    return dataclasses.asdict(cfg)


def parse_overrides(items: Iterable[str]) -> dict:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a": {"b": 1}, "c": ["x", "y"]}`` (values read as YAML)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value (e.g. limit=20 or metric=l1), got {item!r}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"cannot read the value of override {item!r} as YAML: {_first_line(err)}") from None
        node = out
        *parents, last = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} sets a key inside {part!r}, which another override set to a value")
        node[last] = parsed
    return out


def read_yaml(path: str | Path, what: str = "config") -> dict:
    """The mapping in a YAML file; a missing, unreadable or non-mapping file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} file {str(path)!r} does not exist"
            + ("" if path.parent.is_dir() else f" (no directory {str(path.parent)!r})")
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{what} file {str(path)!r} is not valid YAML: {_first_line(err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {what} file {str(path)!r}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {str(path)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def field_names(schema: type) -> list[str]:
    """Sorted field names of a config dataclass."""
    return sorted(f.name for f in dataclasses.fields(schema))


def _apply(node, schema: type, data: dict, prefix: str) -> None:
    """Set ``data`` onto the structured config ``node`` of type ``schema``, recursing into dataclass sections."""
    from omegaconf.errors import OmegaConfBaseException

    fields = {f.name: f for f in dataclasses.fields(schema)}
    types = _field_types(schema)
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in fields:
            section = f"section {prefix[:-1]!r} of " if prefix else ""
            raise ValueError(
                f"unknown key {where!r} in {section}{schema.__name__}; valid keys: {', '.join(sorted(fields))}"
            )
        sub = types.get(key)
        if dataclasses.is_dataclass(sub) and isinstance(sub, type):
            if value is None:
                continue  # an empty YAML section keeps the defaults
            if not isinstance(value, dict):
                raise ValueError(f"{where} is a section with keys {', '.join(field_names(sub))}; got {value!r}")
            _apply(node[key], sub, value, prefix=f"{where}.")
            continue
        if isinstance(value, int) and not isinstance(value, bool) and sub in (float, float | None):
            value = float(value)  # OmegaConf warns when an int lands in a float field
        try:
            node[key] = value
        except OmegaConfBaseException as err:
            raise ValueError(f"{where}={value!r}: {_first_line(err)}") from None


def _field_types(schema: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (string annotations evaluated in its module)."""
    import typing

    try:
        return typing.get_type_hints(schema)
    except Exception:  # noqa: BLE001 - unresolvable annotations: treat every field as a plain value
        return {}


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def field_docs(schema: type) -> dict[str, str]:
    """Each field's one-line doc: the comment after its declaration (or, if none, the comment lines right above it).

    Fields a subclass declares again without a comment keep the doc of the class that documented them.
    """
    docs: dict[str, str] = {}
    for cls in reversed([c for c in schema.__mro__ if dataclasses.is_dataclass(c)]):
        docs.update({k: v for k, v in _class_comments(cls).items() if v})
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(schema)}


@functools.cache
def _class_comments(cls: type) -> dict[str, str]:
    """Comments of the annotated assignments in the body of ``cls`` (read once from its source)."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen or interactive class): no docs
        return {}
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    (node,) = ast.parse(source).body
    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        inside = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
        if not inside:  # the comment block right above the field
            line = stmt.lineno - 1
            while line in comments and line not in code_lines:
                inside.insert(0, comments[line])
                line -= 1
        out[stmt.target.id] = " ".join(inside)
    return out
