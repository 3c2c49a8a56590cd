"""One small generic registry, instantiated once per kind (scorers, benchmarks, model families)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from importlib import metadata
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps short lowercase names to objects of one kind, with helpful errors.

    Parameters
    ----------
    kind : str
        What is registered ("scorer", "benchmark", ...); used in error messages.
    base_cls : type, optional
        When given, every registered object must be a subclass of it.
    entry_point_group : str, optional
        An ``importlib.metadata`` entry-point group from which third-party packages add items;
        loaded lazily on the first lookup.
    """

    def __init__(self, kind: str, base_cls: type | None = None, entry_point_group: str | None = None):
        self.kind = kind
        self.base_cls = base_cls
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering its target under ``name``; returns the target unchanged."""

        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name``; a name already taken by another object is an error."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"A {self.kind} name must be a non-empty string, got {name!r}")
        if self.base_cls is not None and not (isinstance(obj, type) and issubclass(obj, self.base_cls)):
            raise TypeError(f"{self.kind} {name!r} must be a subclass of {self.base_cls.__name__}, got {obj!r}")
        existing = self._items.get(name)
        if existing is not None and existing is not obj:
            raise ValueError(
                f"{self.kind} name {name!r} is already registered to {existing!r}; cannot also register {obj!r}"
            )
        self._items[name] = obj

    def get(self, name: str) -> T:
        """The object registered under ``name``; an unknown name is an error listing the known ones."""
        self._load_entry_points()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none)"
            raise ValueError(f"Unknown {self.kind} {name!r}. Registered {self.kind}s: {known}") from None

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching an fnmatch ``pattern``."""
        self._load_entry_points()
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def snapshot(self) -> dict[str, T]:
        """A copy of the current name -> object table (entry points loaded), for ``restore``."""
        self._load_entry_points()
        return dict(self._items)

    def restore(self, snapshot: dict[str, T]) -> None:
        """Make the registered items exactly those of ``snapshot`` (tests undo their registrations)."""
        self._items = dict(snapshot)

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is registered."""
        self._load_entry_points()
        return name in self._items

    def _load_entry_points(self) -> None:
        """Add the entry-point group's items, once."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            # Loading the entry point's module runs its @register decorators; a bare class is added by name.
            obj: Any = ep.load()
            if ep.name not in self._items and isinstance(obj, type):
                self.add(ep.name, obj)
