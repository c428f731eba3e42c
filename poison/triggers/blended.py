"""``blended``: a whole-image pattern mixed in (Chen et al. 2017)."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from poison import streams
from poison.triggers._base import TRIGGERS, Trigger


@TRIGGERS.register("blended")
class BlendedTrigger(Trigger):
    """A whole-image pattern mixed in with opacity ``alpha`` (Chen et al. 2017):
    ``out = (1 - alpha) * image + alpha * pattern``. The pattern (uniform noise or a
    checkerboard of ``cell``-pixel squares) is fixed by ``pattern_seed``."""

    kind: Literal["blended"] = "blended"
    pattern: Literal["noise", "checkerboard"] = "noise"
    alpha: float = Field(0.2, gt=0, le=1)
    cell: int = Field(2, ge=1)
    pattern_seed: int = 0

    def overlay(self, side: int) -> np.ndarray:
        if self.pattern == "noise":
            return streams.rng(self.pattern_seed, streams.BLENDED_NOISE).integers(0, 256, (side, side, 3)).astype(np.float32)
        cells = (np.add.outer(np.arange(side) // self.cell, np.arange(side) // self.cell) % 2) * 255.0
        return np.repeat(cells[..., None], 3, axis=2).astype(np.float32)

    def apply(self, images: np.ndarray, placement: dict[str, np.ndarray]) -> np.ndarray:
        mixed = (1 - self.alpha) * images.astype(np.float32) + self.alpha * self.overlay(images.shape[1])
        return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
