"""A tiny name → factory registry shared by datasets, triggers and attacks.

Adding a unit is a new module plus one ``@REGISTRY.register("name")`` line;
unknown names fail with the list of valid ones, duplicate names fail at import. A unit
whose module is heavy to import (torch) is named ahead with ``register_module``: its module
is imported when the name is first looked up.

Every registry is also known by its ``kind`` (``Registry.find("trigger")``), which
is the config key it switches: the ``kind`` of the mapping at ``attack.trigger``
names a class of the registry ``"trigger"``. The sweep code uses this to search
over kinds (``attack.trigger.kind: {choices: [patch, sig]}``) without a list of
paths of its own.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to objects (classes or functions) of one kind.

    ``kind`` is the config key whose ``kind`` value the registry resolves (the last
    component of its path: ``"attack"``, ``"trigger"`` for ``attack.trigger``,
    ``"text_trigger"``, ``"defense"``); one registry per kind.

    Example:
        >>> SHAPES = Registry("example_shape")
        >>> @SHAPES.register("square")
        ... class Square: ...
        >>> SHAPES.get("square") is Square
        True
        >>> Registry.find("example_shape") is SHAPES
        True
    """

    _by_kind: ClassVar[dict[str, Registry[Any]]] = {}

    def __init__(self, kind: str) -> None:
        if kind in Registry._by_kind:
            raise ValueError(f"a registry of kind {kind!r} exists already")
        self.kind = kind
        self._items: dict[str, T] = {}
        self._modules: dict[str, str] = {}  # names whose module is imported on first lookup
        Registry._by_kind[kind] = self

    @classmethod
    def find(cls, kind: str) -> Registry[Any] | None:
        """The registry of ``kind`` (e.g. ``"trigger"``), or None when there is none."""
        return cls._by_kind.get(kind)

    @classmethod
    def kinds(cls) -> list[str]:
        """The kinds of every registry created so far."""
        return sorted(cls._by_kind)

    def register(self, name: str) -> Callable[[T], T]:
        def _add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            self._modules.pop(name, None)
            return obj

        return _add

    def register_module(self, name: str, module: str) -> None:
        """Names ``name`` as registered by ``module`` (with :meth:`register`), which is imported
        when ``name`` is first looked up: listing the names costs no import."""
        if name in self._items or name in self._modules:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._modules[name] = module

    def get(self, name: str) -> T:
        if name not in self._items and name in self._modules:
            module = self._modules[name]
            importlib.import_module(module)
            if name not in self._items:
                raise ValueError(f"{self.kind} {name!r}: module {module} does not register it")
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted({*self._items, *self._modules})

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
