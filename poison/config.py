"""Typed, validated configuration sections and their error messages.

Every section is a frozen pydantic model that rejects unknown keys; errors are
re-raised as :class:`ConfigError` naming the dotted key path and the bad value,
never as a traceback from inside a library.
"""
from __future__ import annotations

import re
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)
_KEYED = re.compile(r"^[a-z_][a-z0-9_]*: ")


class ConfigError(ValueError):
    """A configuration value that is wrong; the message starts with its key path."""


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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

