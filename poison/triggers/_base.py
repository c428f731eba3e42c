"""The base of ``poison.triggers``: what every plug-in imports (the package's ``__init__`` imports the plug-ins, which register themselves)."""
from __future__ import annotations

import numpy as np

from poison.config import Section, make_registered
from poison.registry import Registry

TRIGGERS: Registry = Registry("trigger")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")


class Trigger(Section):
    """Base of triggers: ``placement`` then ``apply``; both deterministic."""

    kind: str

    def check(self, image_size: int, path: str = "attack.trigger") -> None:
        """Raises ConfigError when the trigger cannot go on images of this size."""

    def placement(self, n: int, image_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {}

    def apply(self, images: np.ndarray, placement: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


def make_trigger(data: object, path: str = "attack.trigger") -> Trigger:
    """Validates a trigger mapping into its registered class (``kind`` required)."""
    return make_registered(TRIGGERS, data, path)
