"""Image triggers, registered by name (``attack.trigger.kind``).

A trigger has a frozen config, a seeded ``placement`` (where it goes on each of
n images: stored in the poison plan) and a pure ``apply`` that stamps it on a
batch of uint8 (N, H, W, 3) images when the batch is loaded.
"""
from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field, field_validator

from poison import streams
from poison.config import ConfigError, Section, make_registered
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


def make_trigger(data: object, path: str = "attack.trigger") -> Trigger:
    """Validates a trigger mapping into its registered class (``kind`` required)."""
    return make_registered(TRIGGERS, data, path)

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


@TRIGGERS.register("wanet")
class WaNetTrigger(Trigger):
    """A smooth, nearly invisible warp (Nguyen & Tran 2021): random offsets on a
    ``grid_size`` x ``grid_size`` grid, upsampled bilinearly to the image, scaled so the
    largest shift is ``strength`` pixels; pixels are resampled bilinearly along it.
    The field is fixed by ``pattern_seed`` so train and test warps match."""

    kind: Literal["wanet"] = "wanet"
    grid_size: int = Field(4, ge=2)
    strength: float = Field(1.0, gt=0)  # largest displacement, in pixels
    pattern_seed: int = 0

    def check(self, image_size: int, path: str = "attack.trigger") -> None:
        if self.grid_size > image_size:
            raise ConfigError(f"{path}.grid_size: {self.grid_size} exceeds the {image_size}px image side")

    def field(self, side: int) -> np.ndarray:
        """(side, side, 2) displacements (dy, dx) in pixels, max |d| = strength."""
        coarse = streams.rng(self.pattern_seed, streams.WARP_FIELD).uniform(-1, 1, (self.grid_size, self.grid_size, 2))
        fine = _resize_bilinear(coarse, side)
        return fine / np.abs(fine).max() * self.strength

    def apply(self, images: np.ndarray, placement: dict[str, np.ndarray]) -> np.ndarray:
        side = images.shape[1]
        flow = self.field(side)
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
        sy, sx = np.clip(yy + flow[..., 0], 0, side - 1), np.clip(xx + flow[..., 1], 0, side - 1)
        y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
        y1, x1 = np.minimum(y0 + 1, side - 1), np.minimum(x0 + 1, side - 1)
        wy, wx = (sy - y0)[..., None], (sx - x0)[..., None]
        img = images.astype(np.float64)
        top = img[:, y0, x0] * (1 - wx) + img[:, y0, x1] * wx
        bottom = img[:, y1, x0] * (1 - wx) + img[:, y1, x1] * wx
        return np.clip(np.rint(top * (1 - wy) + bottom * wy), 0, 255).astype(np.uint8)


def _resize_bilinear(grid: np.ndarray, side: int) -> np.ndarray:
    """(k, k, c) → (side, side, c), corners aligned."""
    k = grid.shape[0]
    pos = np.linspace(0, k - 1, side)
    lo = np.minimum(np.floor(pos).astype(int), k - 2)
    frac = (pos - lo)[:, None]
    rows = grid[lo] * (1 - frac)[:, :, None] + grid[lo + 1] * frac[:, :, None]
    return rows[:, lo] * (1 - frac)[None] + rows[:, lo + 1] * frac[None]
