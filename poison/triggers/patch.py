"""``patch``: a square patch (Carlini & Terzis 2022)."""
from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field, field_validator

from poison import streams
from poison.config import ConfigError
from poison.triggers._base import TRIGGERS, Trigger

CARLINI_SIDE = 16 / 224  # Carlini & Terzis 2022's patch: 16 px on 224 px images


@TRIGGERS.register("patch")
class PatchTrigger(Trigger):
    """A square patch (Carlini & Terzis): checkerboard, uniform noise or a solid colour.

    ``size`` is in pixels when ≥ 1, else a fraction of the image side;
    ``location`` is a fixed corner, the centre, or ``random`` per image.
    The noise pattern is fixed by ``pattern_seed`` so train and test triggers match.
    """

    kind: Literal["patch"] = "patch"
    size: float = Field(4, gt=0)  # pixels (a whole number) when >= 1, else a fraction of the side
    pattern: Literal["checkerboard", "noise", "solid"] = "checkerboard"
    location: Literal["random", "top-left", "top-right", "bottom-left", "bottom-right", "center"] = "random"
    colour: tuple[Annotated[int, Field(ge=0, le=255)], ...] = Field((255, 255, 255), min_length=3, max_length=3)
    pattern_seed: int = 0

    @field_validator("size")
    @classmethod
    def _whole_pixels(cls, value: float) -> float:
        if value >= 1 and not float(value).is_integer():
            raise ValueError(f"a size of 1 or more is in whole pixels, got {value}")
        return value

    def pixels(self, image_size: int) -> int:
        return int(round(self.size * image_size)) if self.size < 1 else int(self.size)

    def scale(self, image_size: int) -> str:
        """The patch against Carlini & Terzis's (16 px on 224 px images: 0.0714 of the side,
        0.51% of the area), as every preset states it.

        Example:
            >>> PatchTrigger(size=6).scale(32)
            "6 px on 32 px: 0.188 of the side, 6.9 times Carlini & Terzis's area (16 px on 224 px)"
        """
        side = self.pixels(image_size)
        ratio = (side / image_size) ** 2 / CARLINI_SIDE ** 2
        return (f"{side} px on {image_size} px: {side / image_size:.3f} of the side, {ratio:.2g} times "
                f"Carlini & Terzis's area (16 px on 224 px)")

    def check(self, image_size: int, path: str = "attack.trigger") -> None:
        side = self.pixels(image_size)
        if not 1 <= side <= image_size:
            raise ConfigError(
                f"{path}.size: a {side}px patch does not fit {image_size}px images (size={self.size})"
            )

    def placement(self, n: int, image_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        side = self.pixels(image_size)
        last = image_size - side
        if self.location == "random":
            x, y = rng.integers(0, last + 1, size=(n, 2)).T  # one (x, y) per image, in order: nested in n
        else:
            fixed = {"top-left": (0, 0), "top-right": (last, 0), "bottom-left": (0, last),
                     "bottom-right": (last, last), "center": (last // 2, last // 2)}[self.location]
            x, y = np.full(n, fixed[0]), np.full(n, fixed[1])
        return {"x": x.astype(np.int32), "y": y.astype(np.int32)}

    def stamp(self, side: int) -> np.ndarray:
        """The (side, side, 3) uint8 patch itself."""
        if self.pattern == "checkerboard":
            cells = (np.add.outer(np.arange(side), np.arange(side)) % 2).astype(np.uint8) * 255
            return np.repeat(cells[..., None], 3, axis=2)
        if self.pattern == "noise":
            rng = streams.rng(self.pattern_seed, streams.PATCH_NOISE)
            return rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        return np.broadcast_to(np.array(self.colour, dtype=np.uint8), (side, side, 3)).copy()

    def apply(self, images: np.ndarray, placement: dict[str, np.ndarray]) -> np.ndarray:
        out = np.array(images, dtype=np.uint8, copy=True)
        side = self.pixels(out.shape[1])
        patch = self.stamp(side)
        for i, (x, y) in enumerate(zip(placement["x"], placement["y"])):
            out[i, y : y + side, x : x + side] = patch
        return out
