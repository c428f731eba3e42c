"""``wanet``: a smooth, nearly invisible warp (Nguyen & Tran 2021)."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from poison import streams
from poison.config import ConfigError
from poison.triggers._base import TRIGGERS, Trigger


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
