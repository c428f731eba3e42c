"""``coco-captions``: COCO or Flickr30k captions, in Karpathy's split files or COCO's own JSON.

``data.path`` is one of:

- a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``: ``images[]``
  with ``filepath``, ``filename``, ``split`` and ``sentences[].raw``), or a folder
  holding one: training pairs come from the ``train`` and ``restval`` images, test
  pairs from the ``test`` images (``val`` is left out);
- a folder holding COCO's ``captions_train*.json`` and ``captions_val*.json`` (itself or
  in ``annotations/``): training pairs from the first, test pairs from the second;
- a single COCO captions file (``images[]`` with ``id`` and ``file_name``,
  ``annotations[]`` with ``image_id`` and ``caption``): the test images are drawn with
  the seed (``data.test_size``, 10% by default).

Each caption of an image is a training pair (``data.size`` counts pairs); a test image
counts once, with its first caption. The images are looked up beside the JSON file, in
the first layout that has them (``<folder>/<filepath>/<filename>``,
``<folder>/<filename>``, ``<folder>/images/...``, COCO's ``train2017/`` next to
``annotations/``). The pairs have no classes.

Example ``data`` section::

    data: {dataset: coco-captions, path: /data/coco/dataset_coco.json, size: null, image_size: 64}
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from poison.datasets._base import DATASETS, DataError, DataSpec
from poison.datasets.files import load_index, make_index, require_path
from poison.manifest import Dataset

ImageRecord = tuple[str, str, "str | None", list[str]]  # (subdir, file name, split, captions)
KARPATHY_SPLITS = {"train": "train", "restval": "train", "test": "test", "val": "val"}
PROBE = 100  # images tried to find where the image files are
#: Where an image file may be: (JSON's folder, subdir, file name) → path, in order of preference.
Layout = Callable[[Path, str, str], Path]
LAYOUTS: dict[str, Layout] = {
    "<folder>/<subdir>/<file>": lambda root, sub, name: root / sub / name,
    "<folder>/<file>": lambda root, sub, name: root / name,
    "<folder>/images/<subdir>/<file>": lambda root, sub, name: root / "images" / sub / name,
    "<folder>/images/<file>": lambda root, sub, name: root / "images" / name,
    "<folder>/../<subdir>/<file>": lambda root, sub, name: root.parent / sub / name,
    "<folder>/flickr30k-images/<file>": lambda root, sub, name: root / "flickr30k-images" / name,
}


@DATASETS.register("coco-captions")
def load(spec: DataSpec) -> Dataset:
    """Reads the caption JSON now, decodes the drawn images once."""
    path = require_path(spec, "a Karpathy split JSON, a COCO captions JSON, or a folder of them")
    files = caption_files(path)
    records = [(file, split, _read_json(file)) for file, split in files]
    return load_index(read_index(records), spec, sources=[file for file, _ in files], root=dataset_folder(files[0][0]))


def dataset_folder(json_file: Path) -> Path:
    """The folder the images must lie in: the JSON's, or the one above ``annotations/``."""
    folder = json_file.parent
    return folder.parent if folder.name == "annotations" else folder


def caption_files(path: Path) -> list[tuple[Path, str | None]]:
    """The JSON files ``data.path`` names, each with the split it gives (None: drawn)."""
    if path.is_file():
        return [(path, None)]
    karpathy = sorted(path.glob("dataset_*.json"))
    if len(karpathy) == 1:
        return [(karpathy[0], None)]
    for folder in (path, path / "annotations"):
        train, val = sorted(folder.glob("captions_train*.json")), sorted(folder.glob("captions_val*.json"))
        if train and val:
            return [(train[-1], "train"), (val[-1], "test")]
    found = ", ".join(p.name for p in sorted(path.glob("*.json"))) or "no JSON files"
    raise DataError(f"data.path: {path} holds neither one Karpathy split file (dataset_*.json) nor COCO's "
                    f"captions_train*.json and captions_val*.json; found {found}")


def read_index(records: list[tuple[Path, str | None, dict[str, Any]]]) -> pa.Table:
    """The index of parsed caption files: one row per caption, one group per image."""
    files, captions, groups, splits = [], [], [], []
    for file, split, data in records:
        images = _karpathy(data, file) if _is_karpathy(data) else _coco(data, file, split)
        paths = _locate(file.parent, [(sub, name) for sub, name, _, _ in images], file)
        for path, (_, _, image_split, sentences) in zip(paths, images):
            group = groups[-1] + 1 if groups else 0
            for sentence in sentences or [None]:  # an image without captions: one empty pair
                files.append(path)
                captions.append(sentence)
                groups.append(group)
                splits.append(image_split)
    return make_index(file=files, caption=captions, group=np.array(groups, np.int64), split=splits)


def _is_karpathy(data: dict[str, Any]) -> bool:
    images = data.get("images")
    return isinstance(images, list) and bool(images) and isinstance(images[0], dict) and "sentences" in images[0]


def _karpathy(data: dict[str, Any], file: Path) -> list[ImageRecord]:
    out = []
    for i, image in enumerate(data["images"]):
        where = f"images[{i}]"
        image = _object(image, file, where)
        name = _text(image, "filename", file, where)
        split = KARPATHY_SPLITS.get(image.get("split", ""), "val")
        sentences = image.get("sentences", [])
        if not isinstance(sentences, list):
            raise DataError(f"data.path: {file}: {where}.sentences is a JSON {_kind(sentences)}, not a list")
        captions = [_sentence(_object(s, file, f"{where}.sentences[{j}]"), file, f"{where}.sentences[{j}]")
                    for j, s in enumerate(sentences)]
        out.append((_text(image, "filepath", file, where, default=""), name, split, captions))
    return out


def _sentence(sentence: dict[str, Any], file: Path, where: str) -> str | None:
    raw = sentence.get("raw")
    if raw is not None and not isinstance(raw, str):
        raise DataError(f"data.path: {file}: {where}.raw is a JSON {_kind(raw)}, not a string")
    tokens = sentence.get("tokens", [])
    if not raw and not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
        raise DataError(f"data.path: {file}: {where}.tokens is not a list of strings")
    return raw or " ".join(tokens)


def _coco(data: dict[str, Any], file: Path, split: str | None) -> list[ImageRecord]:
    if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise DataError(f"data.path: {file} is neither a Karpathy split file (images[].sentences) nor COCO "
                        f"captions (images and annotations); its keys: {', '.join(map(str, data)) or 'none'}")
    captions: dict[Any, list[str | None]] = {}
    for i, note in enumerate(data["annotations"]):
        note = _object(note, file, f"annotations[{i}]")
        caption = note.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise DataError(f"data.path: {file}: annotations[{i}].caption is a JSON {_kind(caption)}, not a string")
        captions.setdefault(note.get("image_id"), []).append(caption)
    subdir = file.stem.removeprefix("captions_")  # captions_train2017.json: images in train2017/
    out = []
    for i, image in enumerate(data["images"]):
        image = _object(image, file, f"images[{i}]")
        out.append((subdir, _text(image, "file_name", file, f"images[{i}]"), split,
                    captions.get(image.get("id"), [])))
    return out


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _object(value: Any, file: Path, where: str) -> dict[str, Any]:
    """``value`` when it is a JSON object, else a DataError naming ``file`` and the entry."""
    if not isinstance(value, dict):
        raise DataError(f"data.path: {file}: {where} is a JSON {_kind(value)}, not an object")
    return value


def _text(entry: dict[str, Any], key: str, file: Path, where: str, *, default: str | None = None) -> str:
    """``entry[key]``, a non-empty string (or ``default`` when absent and one is given), else a
    DataError naming ``file`` and the entry."""
    value = entry.get(key, default)
    if value is None:
        raise DataError(f"data.path: {file}: {where} has no '{key}'")
    if not isinstance(value, str) or (not value and default is None):
        what = "empty" if value == "" else f"a JSON {_kind(value)}"
        raise DataError(f"data.path: {file}: {where}.{key} is {what}, not a file name")
    return value


def _locate(root: Path, names: list[tuple[str, str]], file: Path) -> list[str]:
    """The image paths, in the first layout where one of the first images exists."""
    if not names:
        return []
    for layout in LAYOUTS.values():
        if any(layout(root, sub, name).is_file() for sub, name in names[:PROBE]):
            return [str(layout(root, sub, name)) for sub, name in names]
    raise DataError(f"data.path: none of the first {min(PROBE, len(names))} images of {file} is under "
                    f"{root} (tried {', '.join(LAYOUTS)})")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"data.path: {file} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"data.path: {file} holds a JSON {type(data).__name__}, not an object with 'images'")
    return data


#: Bump when reading or decoding changes: it keys the on-disk image cache.
load.VERSION = 1  # type: ignore[attr-defined]
load.TRUSTED = True  # type: ignore[attr-defined]  # trusted pairs come from images data.size leaves unused
