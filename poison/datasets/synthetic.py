"""``synthetic``: procedurally generated coloured shapes with compositional captions.

Every image shows one object (a colour × shape class) of a size, at a position,
on a textured background; its caption names all of these in one of several
phrasings, so captions are diverse and contrastive learning is not degenerate.
Class labels are the 24 colour–shape pairs, for zero-shot evaluation.
"""
from __future__ import annotations

import numpy as np

from poison import streams
from poison.datasets._base import DATASETS, DataError, DataSpec
from poison.manifest import Dataset, make_manifest

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 220, 40),
    "purple": (150, 50, 200),
    "cyan": (40, 210, 220),
}
SHAPES = ["circle", "square", "triangle", "cross"]
SIZES = {"small": 0.28, "large": 0.38}  # object radius as a fraction of the image side
POSITIONS = {  # centre as a fraction of the image side (x, y)
    "top left": (0.34, 0.34), "top right": (0.66, 0.34), "center": (0.5, 0.5),
    "bottom left": (0.34, 0.66), "bottom right": (0.66, 0.66),
}
BACKGROUNDS = {"black": (20, 20, 20), "gray": (120, 120, 120), "white": (235, 235, 235)}
PHRASINGS = [
    "a {size} {colour} {shape} in the {pos} on a {bg} background",
    "a photo of a {colour} {shape}, {size}, {pos}",
    "there is a {size} {colour} {shape} on {bg}",
    "{bg} background with a {colour} {shape} at the {pos}",
    "a {colour} {shape} in the {pos}",
    "an image of a {size} {shape} coloured {colour}",
    "{pos}: one {colour} {shape} over {bg}",
]
TEMPLATES = ["a photo of a {}.", "a {}.", "an image of a {}.", "a picture of a {}."]
CLASSNAMES = [f"{c} {s}" for c in COLOURS for s in SHAPES]
DEFAULT_TEST_FRACTION = 0.1


@DATASETS.register("synthetic")
def load(spec: DataSpec) -> Dataset:
    """Generates the manifest now and the images on first use (seeded by ``spec.seed``).

    A trusted split (``spec.trusted``) is generated like the main set from other streams
    of the seed, so its pairs are fresh draws, never the main set's pairs.
    """
    if spec.size is None or spec.size < 1:
        raise DataError("data.size: the synthetic dataset needs a positive size")
    n_test = spec.test_size if spec.test_size is not None else max(1, round(spec.size * DEFAULT_TEST_FRACTION))
    trusted = spec.trusted is not None
    n_train = spec.trusted if trusted else spec.size
    attrs = _attributes(n_train + n_test, streams.rng(
        spec.seed, streams.SYNTHETIC_TRUSTED_ATTRIBUTES if trusted else streams.SYNTHETIC_ATTRIBUTES))
    noise = streams.SYNTHETIC_TRUSTED_RENDER if trusted else streams.SYNTHETIC_RENDER
    captions = [_caption(attrs, i) for i in range(n_train + n_test)]
    manifest = make_manifest(
        image=np.arange(n_train + n_test),
        caption=captions,
        label=attrs["colour"] * len(SHAPES) + attrs["shape"],
        split=["train"] * n_train + ["test"] * n_test,
    )
    return Dataset(
        name="synthetic", manifest=manifest, classnames=CLASSNAMES, templates=TEMPLATES,
        image_size=spec.image_size,
        _render=lambda: render(attrs, spec.image_size, streams.rng(spec.seed, noise)),
        _cache_file=spec.cache_file(), trusted_capacity=None,
    )


def _attributes(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "colour": rng.integers(len(COLOURS), size=n),
        "shape": rng.integers(len(SHAPES), size=n),
        "size": rng.integers(len(SIZES), size=n),
        "pos": rng.integers(len(POSITIONS), size=n),
        "bg": rng.integers(len(BACKGROUNDS), size=n),
        "phrasing": rng.integers(len(PHRASINGS), size=n),
    }


def _caption(attrs: dict[str, np.ndarray], i: int) -> str:
    return PHRASINGS[attrs["phrasing"][i]].format(
        colour=list(COLOURS)[attrs["colour"][i]],
        shape=SHAPES[attrs["shape"][i]],
        size=list(SIZES)[attrs["size"][i]],
        pos=list(POSITIONS)[attrs["pos"][i]],
        bg=list(BACKGROUNDS)[attrs["bg"][i]],
    )


def render(attrs: dict[str, np.ndarray], side: int, rng: np.random.Generator) -> np.ndarray:
    """Draws every image: background with noise, then the object with a jittered colour."""
    n = len(attrs["colour"])
    bg = np.array(list(BACKGROUNDS.values()), dtype=np.float32)[attrs["bg"]]
    images = bg[:, None, None, :] + rng.normal(0, 12, size=(n, side, side, 1)).astype(np.float32)
    centre = np.array(list(POSITIONS.values()), dtype=np.float32)[attrs["pos"]]
    centre = (centre + rng.uniform(-0.06, 0.06, size=(n, 2))) * side
    radius = np.array(list(SIZES.values()), dtype=np.float32)[attrs["size"]] * side
    radius = radius * rng.uniform(0.85, 1.15, size=n)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    dx = (xx[None] - centre[:, 0, None, None]) / radius[:, None, None]
    dy = (yy[None] - centre[:, 1, None, None]) / radius[:, None, None]
    masks = np.stack([_shape_mask(k, dx, dy) for k in range(len(SHAPES))])  # (shape, n, h, w)
    mask = masks[attrs["shape"], np.arange(n)]
    colour = np.array(list(COLOURS.values()), dtype=np.float32)[attrs["colour"]]
    colour = colour + rng.normal(0, 10, size=(n, 3))
    images = np.where(mask[..., None], colour[:, None, None, :], images)
    return np.clip(images, 0, 255).astype(np.uint8)


def _shape_mask(shape: int, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    name = SHAPES[shape]
    if name == "circle":
        return dx**2 + dy**2 <= 1.0
    if name == "square":
        return (np.abs(dx) <= 0.8) & (np.abs(dy) <= 0.8)
    if name == "triangle":  # apex up
        return (dy <= 0.8) & (dy >= -1.0) & (np.abs(dx) <= (dy + 1.0) / 1.8)
    return ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 1.0)) | ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 1.0))


#: Bump when generation or decoding changes: it keys the on-disk image cache.
load.VERSION = 2  # type: ignore[attr-defined]
load.TRUSTED = True  # type: ignore[attr-defined]  # it honours DataSpec.trusted
