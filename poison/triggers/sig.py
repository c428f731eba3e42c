"""``sig``: a horizontal sinusoidal signal (Barni et al. 2019)."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from poison.config import ConfigError
from poison.triggers._base import TRIGGERS, Trigger


@TRIGGERS.register("sig")
class SigTrigger(Trigger):
    """A horizontal sinusoidal signal added to every row (Barni et al. 2019):
    ``out = clip(image + amplitude * sin(2 pi frequency x / width))``."""

    kind: Literal["sig"] = "sig"
    amplitude: float = Field(20, gt=0, le=255)  # in pixel values
    frequency: float = Field(6, gt=0)           # periods across the image width

    def check(self, image_size: int, path: str = "attack.trigger") -> None:
        if self.frequency > image_size / 2:
            raise ConfigError(f"{path}.frequency: {self.frequency} periods alias on {image_size}px images "
                              f"(at most {image_size / 2})")

    def signal(self, side: int) -> np.ndarray:
        return self.amplitude * np.sin(2 * np.pi * self.frequency * np.arange(side) / side)

    def apply(self, images: np.ndarray, placement: dict[str, np.ndarray]) -> np.ndarray:
        wave = self.signal(images.shape[2]).astype(np.float32)[None, None, :, None]
        return np.clip(np.rint(images.astype(np.float32) + wave), 0, 255).astype(np.uint8)
