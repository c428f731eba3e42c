"""Typed, validated configuration sections and their error messages.

Every section is a frozen pydantic model that rejects unknown keys; errors are
re-raised as :class:`ConfigError` naming the dotted key path and the bad value,
never as a traceback from inside a library.

A field's part in cache keys is marked in the schema itself, as ``Annotated`` metadata:
:data:`SPEED_ONLY` (the value changes how fast or where a result is computed, never the
result) and :data:`KEYED_WHEN_SET` (the value enters keys only when it is not ``None``,
so the keys of caches made before the field existed stay valid). :func:`key_values` is
a section's values for a key with both applied.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)
_KEYED = re.compile(r"^[a-z_][a-z0-9_]*: ")


class ConfigError(ValueError):
    """A configuration value that is wrong; the message starts with its key path."""


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class KeyMarker:
    """A field's part in cache keys, given as ``Annotated[type, marker]`` (see the module's docstring)."""

    name: str


SPEED_ONLY = KeyMarker("speed_only")
KEYED_WHEN_SET = KeyMarker("keyed_when_set")
#: The value decides whether a run may go ahead (what it may read), never what it computes.
POLICY = KeyMarker("policy")
#: The markers of fields left out of keys whatever their value.
UNKEYED = (SPEED_ONLY, POLICY)


def key_values(section: BaseModel) -> dict[str, Any]:
    """``section``'s JSON values less its :data:`UNKEYED` fields and its unset
    :data:`KEYED_WHEN_SET` ones, in nested sections too: what a cache key of it hashes.

    Example:
        >>> from typing import Annotated
        >>> class Train(Section):
        ...     epochs: int = 1
        ...     threads: Annotated[int, SPEED_ONLY] = 1
        ...     columns: Annotated[str | None, KEYED_WHEN_SET] = None
        >>> key_values(Train(threads=4)), key_values(Train(columns="a"))
        ({'epochs': 1}, {'epochs': 1, 'columns': 'a'})
    """
    return _prune(section, section.model_dump(mode="json"))


def _prune(section: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if any(m in field.metadata for m in UNKEYED) or (value is None and KEYED_WHEN_SET in field.metadata):
            dumped.pop(name, None)
        elif isinstance(value, BaseModel) and isinstance(dumped.get(name), dict):
            _prune(value, dumped[name])
    return dumped


def validate_section(cls: type[M], data: Any, path: str) -> M:
    """Validates ``data`` into ``cls``; errors name ``path`` plus the inner key.

    Example:
        >>> class Train(Section):
        ...     epochs: int = 1
        >>> validate_section(Train, {"epochs": "x"}, "train")
        Traceback (most recent call last):
        ...
        poison.config.ConfigError: train.epochs: expected a valid integer, unable to parse string as an integer, got 'x'
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {data!r}")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, path)) from None


def _format(err: ValidationError, path: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join([path, *(str(p) for p in e["loc"])]) if path else ".".join(map(str, e["loc"]))
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            msg = e["msg"].replace("Input should be", "expected").replace("Value error, ", "")
            if e["type"] == "value_error" and not e["loc"] and _KEYED.match(msg):
                lines.append(f"{path}.{msg}" if path else msg)  # a cross-field check naming its key
            elif e["type"] == "value_error" and msg.startswith(f"{key}."):
                lines.append(msg)  # a nested ConfigError already names its full key path
            elif e["type"] == "value_error" and isinstance(e["input"], dict):
                lines.append(f"{key}: {msg}" if key else msg)  # a check across keys: the message names the values
            else:
                lines.append(f"{key}: {msg}, got {e['input']!r}")
    return "; ".join(lines)


def make_registered(registry: Any, data: Any, path: str, *, default: str | None = None) -> Any:
    """Validates a ``{kind: ..., ...}`` mapping into the class ``registry`` holds for its kind.

    ``default`` is the kind when the mapping (or its ``kind``) is absent; without
    one, ``kind`` is required. Errors name ``path`` and list the registered kinds.
    """
    if data is None and default is not None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {data!r}")
    kind = data.get("kind", default)
    valid = ", ".join(registry.names())
    if kind is None:
        raise ConfigError(f"{path}.kind: required; valid: {valid}")
    if kind not in registry:
        raise ConfigError(f"{path}.kind: unknown {registry.kind.replace('_', ' ')} {kind!r}; valid: {valid}")
    return validate_section(registry.get(kind), data, path)

