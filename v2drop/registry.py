"""One small generic registry, instantiated once per kind (scorers, benchmarks, model families)."""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
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
        An ``importlib.metadata`` entry-point group from which third-party packages add items.
    package : str, optional
        A package whose every module is imported (``import_modules``) so that their
        ``@register`` decorators run: a module added to it registers without being listed anywhere.

    The package's modules, then the entry points, are loaded once, on the first lookup.
    """

    def __init__(
        self, kind: str, base_cls: type | None = None, entry_point_group: str | None = None, package: str | None = None
    ):
        self.kind = kind
        self.base_cls = base_cls
        self.entry_point_group = entry_point_group
        self.package = package
        self._items: dict[str, T] = {}
        self._discovered = False

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
        self._discover()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none)"
            raise ValueError(f"Unknown {self.kind} {name!r}. Registered {self.kind}s: {known}") from None

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching an fnmatch ``pattern``."""
        self._discover()
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def snapshot(self) -> dict[str, T]:
        """A copy of the current name -> object table (entry points loaded), for ``restore``."""
        self._discover()
        return dict(self._items)

    def restore(self, snapshot: dict[str, T]) -> None:
        """Make the registered items exactly those of ``snapshot`` (tests undo their registrations)."""
        self._items = dict(snapshot)

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is registered."""
        self._discover()
        return name in self._items

    def _discover(self) -> None:
        """Import the package's modules and add the entry-point group's items, once."""
        if self._discovered:
            return
        self._discovered = True  # first, so that a module looking names up while it is imported does not recurse
        try:
            if self.package is not None:
                import_modules(self.package)
            for ep in metadata.entry_points(group=self.entry_point_group) if self.entry_point_group else ():
                # Loading the entry point's module runs its @register decorators; a bare class is added by name.
                obj: Any = ep.load()
                if ep.name not in self._items and isinstance(obj, type):
                    self.add(ep.name, obj)
        except BaseException:
            self._discovered = False  # a module that failed to import fails every lookup, not just the first
            raise


def import_modules(package: str) -> list[str]:
    """Import every module directly inside ``package``, in name order; returns their full names.

    Modules only (subpackages are not entered); importing one that is already imported costs nothing.
    """
    pkg = importlib.import_module(package)
    names = sorted(info.name for info in pkgutil.iter_modules(pkg.__path__, f"{package}.") if not info.ispkg)
    for name in names:
        importlib.import_module(name)
    return names
