"""``fashion-mnist``: Zalando's Fashion-MNIST read from its standard IDX files.

Default location is where Debian's ``dataset-fashion-mnist`` package puts the
files; ``data.path`` points elsewhere. Captions come from varied templates over
class synonyms plus words read off the image itself (brightness, width), so a
class has many distinct captions.

``data.size`` draws a seeded subset of the 60,000 training images; a trusted split
(``DataSpec.trusted``, the clean data of defenses) is drawn from the other
60,000 − ``data.size`` training images, so it never shares an image with the trial's pairs.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from poison import streams
from poison.datasets._base import DATASETS, DataError, DataSpec
from poison.manifest import Dataset, make_manifest

DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat",
              "sandal", "shirt", "sneaker", "bag", "ankle boot"]
SYNONYMS = [
    ["t-shirt", "tee", "top"], ["trouser", "pair of pants", "pair of trousers"],
    ["pullover", "sweater", "jumper"], ["dress", "gown", "frock"], ["coat", "jacket", "overcoat"],
    ["sandal", "open shoe", "summer sandal"], ["shirt", "button shirt", "blouse"],
    ["sneaker", "trainer", "running shoe"], ["bag", "handbag", "purse"],
    ["ankle boot", "boot", "short boot"],
]
PHRASINGS = [
    "a photo of a {tone} {name}", "a {width} {name}, {tone}", "a grayscale picture of a {name}",
    "product shot: {tone} {name}", "a {name} on a black background", "a {width}, {tone} {name}",
    "catalogue image of a {name}", "a small black and white photo of a {name}",
]
TEMPLATES = ["a photo of a {}.", "a grayscale picture of a {}.", "a {}.", "product shot of a {}."]
INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` or set data.path"


@DATASETS.register("fashion-mnist")
def load(spec: DataSpec) -> Dataset:
    """Reads labels now, decodes and resizes images on first use."""
    root = Path(spec.path or DEFAULT_PATH)
    files = {split: [_find(root, stem) for stem in stems] for split, stems in FILES.items()}
    rng = streams.rng(spec.seed, streams.FASHION_SUBSET)
    labels = {split: read_idx(files[split][1]) for split in FILES}
    pick = {
        "train": _subset(len(labels["train"]), spec.size, rng, "data.size"),
        "test": _subset(len(labels["test"]), spec.test_size, rng, "data.test_size"),
    }
    capacity = len(labels["train"]) - len(pick["train"])
    if spec.trusted is not None:
        pick["train"] = _trusted(len(labels["train"]), pick["train"], spec.trusted,
                                 streams.rng(spec.seed, streams.FASHION_TRUSTED))

    def render() -> np.ndarray:
        raw = [read_idx(files[s][0])[pick[s]] for s in FILES]
        return _to_rgb(np.concatenate(raw), spec.image_size)

    label = np.concatenate([labels[s][pick[s]] for s in FILES]).astype(np.int32)
    split = ["train"] * len(pick["train"]) + ["test"] * len(pick["test"])
    stats = _stats(files, pick)
    captions = _captions(label, stats, streams.rng(spec.seed, streams.FASHION_CAPTIONS))
    manifest = make_manifest(image=np.arange(len(label)), caption=captions, label=label, split=split)
    return Dataset(
        name="fashion-mnist", manifest=manifest, classnames=CLASSNAMES, templates=TEMPLATES,
        image_size=spec.image_size, _render=render, _cache_file=spec.cache_file(), trusted_capacity=capacity,
    )


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file ({body.size} of {int(np.prod(shape))} bytes)")
    return body.reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"data.path: {root / stem}[.gz] not found; {INSTALL_HINT}")


def _subset(total: int, size: int | None, rng: np.random.Generator, key: str) -> np.ndarray:
    if size is None:
        return np.arange(total)
    if not 1 <= size <= total:
        raise DataError(f"{key}: {size} is not between 1 and the {total:,} pairs fashion-mnist has")
    return np.sort(rng.choice(total, size=size, replace=False))


def _trusted(total: int, used: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` training images outside the ``used`` ones, drawn with ``rng`` (a seeded
    permutation of the rest, so a smaller trusted split is part of a larger one)."""
    rest = np.setdiff1d(np.arange(total), used)
    if not 1 <= count <= len(rest):
        raise DataError(f"trusted split: {count:,} pairs do not fit in the {len(rest):,} fashion-mnist "
                        f"training images outside the {len(used):,} of data.size")
    return np.sort(rng.permutation(rest)[:count])


def _stats(files: dict[str, list[Path]], pick: dict[str, np.ndarray]) -> np.ndarray:
    """Per image: mean brightness of the garment and its width, both in [0, 1]."""
    out = []
    for split in FILES:
        img = read_idx(files[split][0])[pick[split]].astype(np.float32) / 255.0
        on = img > 0.1
        tone = (img * on).sum((1, 2)) / np.maximum(on.sum((1, 2)), 1)
        width = on.any(1).sum(1) / img.shape[2]
        out.append(np.stack([tone, width], 1))
    return np.concatenate(out)


def _captions(label: np.ndarray, stats: np.ndarray, rng: np.random.Generator) -> list[str]:
    phrasing = rng.integers(len(PHRASINGS), size=len(label))
    synonym = rng.integers(3, size=len(label))
    tones = np.where(stats[:, 0] > 0.45, "light", "dark")
    widths = np.where(stats[:, 1] > 0.75, "wide", "narrow")
    return [
        PHRASINGS[p].format(name=SYNONYMS[c][s], tone=t, width=w)
        for p, c, s, t, w in zip(phrasing, label, synonym, tones, widths)
    ]


def _to_rgb(gray: np.ndarray, side: int) -> np.ndarray:
    """Bilinear resize of (N, 28, 28) grey images to (N, side, side, 3)."""
    if gray.shape[1] != side:
        gray = _resize(gray.astype(np.float32), side)
    return np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=3)


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    src = img.shape[1]
    coords = (np.arange(side) + 0.5) * src / side - 0.5
    lo = np.clip(np.floor(coords).astype(int), 0, src - 1)
    hi = np.clip(lo + 1, 0, src - 1)
    frac = np.clip(coords - lo, 0, 1).astype(np.float32)
    rows = img[:, lo] * (1 - frac)[None, :, None] + img[:, hi] * frac[None, :, None]
    return rows[:, :, lo] * (1 - frac) + rows[:, :, hi] * frac


#: Bump when generation or decoding changes: it keys the on-disk image cache.
load.VERSION = 1  # type: ignore[attr-defined]
load.TRUSTED = True  # type: ignore[attr-defined]  # it honours DataSpec.trusted
