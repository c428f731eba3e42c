"""The base of ``poison.text_triggers``: what every plug-in imports (the package's ``__init__`` imports the plug-ins, which register themselves)."""
from __future__ import annotations

import numpy as np

from poison.config import Section, make_registered
from poison.registry import Registry

TEXT_TRIGGERS: Registry = Registry("text_trigger")


class TextTrigger(Section):
    """Base of text triggers: ``placement`` then ``apply``; both deterministic."""

    kind: str

    def placement(self, captions: list[str], rng: np.random.Generator) -> np.ndarray:
        """The word index at which the trigger goes into each caption."""
        raise NotImplementedError

    def apply(self, captions: list[str], positions: np.ndarray) -> list[str]:
        raise NotImplementedError


def make_text_trigger(data: object, path: str = "attack.text_trigger") -> TextTrigger:
    """Validates a text-trigger mapping into its registered class (default: ``phrase``)."""
    return make_registered(TEXT_TRIGGERS, data, path, default="phrase")
