"""``imagefolder``: one subfolder of images per class (torchvision's ImageFolder layout).

``data.path`` is the folder. When it has a ``train/`` and a ``test/`` (or ``val/``)
folder, each of class folders, those are the splits; otherwise the test images are
drawn with the seed (``data.test_size``, 10% by default). Images are found at any depth
under a class folder (by extension; hidden files left out). The classes are the
folder names sorted, read with ``_`` as a space (``golden_retriever`` → ``golden
retriever``); they are the zero-shot classes, so the attacks that need labels
(``backdoor``, ``targeted``, ``mm-*``) work. Each image's caption is a prompt template
over its class name, drawn with the seed (``CAPTION_TEMPLATES``): few distinct
captions, so expect weaker contrastive learning than with real captions.

Example ``data`` section::

    data: {dataset: imagefolder, path: /data/imagenette, size: null, test_size: 500, image_size: 64}
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from poison import streams
from poison.datasets._base import DATASETS, DataError, DataSpec
from poison.datasets.files import IMAGE_EXTENSIONS, load_index, make_index, require_path
from poison.manifest import Dataset

SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val", "validation")}
CAPTION_TEMPLATES = [
    "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.",
    "a cropped photo of the {}.", "a good photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.",
    "a photo of the small {}.", "a photo of the large {}.", "there is a {} in this photo.", "{}",
]
TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}."]


@DATASETS.register("imagefolder")
def load(spec: DataSpec) -> Dataset:
    """Lists the class folders now, decodes the drawn images once."""
    root = require_path(spec, "a folder with one subfolder of images per class")
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder; imagefolder needs one subfolder per class")
    splits = split_folders(root)
    folders = sorted({d.name for folder in splits.values() for d in _subfolders(folder)})
    index = read_index(splits, folders, streams.rng(spec.seed, streams.IMAGEFOLDER_CAPTIONS))
    if index.num_rows == 0:
        raise DataError(f"data.path: {root} has no class subfolders with images "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    return load_index(index, spec, sources=[], classnames=classnames(folders), templates=TEMPLATES, root=root)


def split_folders(root: Path) -> dict[str | None, Path]:
    """{split: folder of class folders}: ``train``/``test`` when ``root`` has both, else {None: root}."""
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        folder = next((root / n for n in names if (root / n).is_dir() and _subfolders(root / n)), None)
        if folder is not None:
            found[split] = folder
    return found if len(found) == 2 else {None: root}


def classnames(folders: list[str]) -> list[str]:
    """Readable class names of folder names (``_`` as a space) unless that merges two.

    Example:
        >>> classnames(["golden_retriever", "tabby_cat"])
        ['golden retriever', 'tabby cat']
    """
    names = [f.replace("_", " ").strip() for f in folders]
    return names if len(set(names)) == len(names) and all(names) else list(folders)


def read_index(splits: dict[str | None, Path], folders: list[str], rng: np.random.Generator) -> pa.Table:
    """One row per image file: its class label, a caption drawn from the templates, its split."""
    names = classnames(folders)
    files, labels, split_names = [], [], []
    for split, folder in splits.items():
        for label, name in enumerate(folders):
            found = _images(folder / name)
            files += found
            labels += [label] * len(found)
            split_names += [split] * len(found)
    template = rng.integers(len(CAPTION_TEMPLATES), size=len(files))
    captions = [CAPTION_TEMPLATES[t].format(names[c]) for t, c in zip(template, labels)]
    return make_index(file=files, caption=captions, label=np.array(labels, np.int32), split=split_names)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images(folder: Path) -> list[str]:
    """Image files under ``folder`` at any depth, sorted by path. Symbolic links to folders are
    followed, but a link to a folder that holds it (a loop, which would never end) is a
    DataError naming the link."""
    if not folder.is_dir():
        return []
    out = []
    for parent, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        here = os.path.realpath(parent)
        for d in dirs:
            target = os.path.realpath(os.path.join(parent, d))
            if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
                raise DataError(f"data.path: {os.path.join(parent, d)} is a symbolic link loop (it points to "
                                f"{target}, which holds it); remove the link")
        out += [os.path.join(parent, n) for n in names
                if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(out)


#: Bump when reading or decoding changes: it keys the on-disk image cache.
load.VERSION = 1  # type: ignore[attr-defined]
load.TRUSTED = True  # type: ignore[attr-defined]  # trusted pairs come from images data.size leaves unused
