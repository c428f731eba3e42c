"""Manifests: one Arrow table per dataset, one row per image–caption pair.

Columns: ``id`` (int64, unique), ``image`` (int64 index into the dataset's
image array), ``caption`` (string), ``label`` (int32 class index, -1 when
unknown), ``split`` (``"train"`` or ``"test"``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("image", pa.int64()),
        ("caption", pa.string()),
        ("label", pa.int32()),
        ("split", pa.string()),
    ]
)


Strings = list[str] | np.ndarray | pa.Array | pa.ChunkedArray


def make_manifest(*, image: np.ndarray, caption: Strings, label: np.ndarray, split: Strings) -> pa.Table:
    """Builds a manifest table; ids are the row numbers.

    ``caption`` and ``split`` may be Arrow arrays, taken as they are (no Python
    strings: a 3-million-row manifest builds in well under a second).
    """
    n = len(caption)
    return pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "image": pa.array(np.asarray(image, dtype=np.int64)),
            "caption": _strings(caption),
            "label": pa.array(np.asarray(label, dtype=np.int32)),
            "split": _strings(split),
        },
        schema=SCHEMA,
    )


def _strings(values: Strings) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.cast(pa.string())
    return pa.array(list(values), pa.string())


def split_rows(manifest: pa.Table, split: str) -> pa.Table:
    """The rows of one split, in manifest order."""
    return manifest.filter(pc.equal(manifest["split"], split))


@dataclass
class Dataset:
    """A loaded dataset: its manifest, class names and a lazy image array.

    ``images`` is a uint8 array of shape (N, H, W, 3), indexed by the
    manifest's ``image`` column; it is built on first use and cached on disk
    as a memory-mappable ``.npy`` so that every trial on a node shares it.
    ``trusted_capacity`` is how many trusted pairs (``DataSpec.trusted``) the
    source has beside these training pairs (``None``: as many as asked for; a
    dataset that cannot keep a trusted split apart has none).

    ``skipped`` counts the source's pairs that were drawn but left out of the
    manifest as unusable (a missing or undecodable image, an empty caption), and
    ``skip_reasons`` splits that count by reason; both are zero for generated data.
    Skipping happens before the manifest exists, so a poison plan never refers to
    a skipped pair.
    """

    name: str
    manifest: pa.Table
    classnames: list[str]
    templates: list[str]
    image_size: int
    _render: Callable[[], np.ndarray] = field(repr=False)
    _cache_file: Path | None = field(default=None, repr=False)
    _images: np.ndarray | None = field(default=None, repr=False)
    trusted_capacity: int | None = 0
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = cached_array(self._cache_file, self._render)
        return self._images

    def split(self, name: str) -> pa.Table:
        return split_rows(self.manifest, name)

    @property
    def num_train(self) -> int:
        return self.split("train").num_rows


def cache_key(**parts: object) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_array(path: Path | None, render: Callable[[], np.ndarray], dtype: type = np.uint8) -> np.ndarray:
    """``render()`` as ``dtype``, kept at ``path`` as a ``.npy`` and memory-mapped: built once per
    node, read by every later caller; a partial or corrupt file is rebuilt, a new one written
    atomically (``None``: no file)."""
    if path is None:
        return render()
    if path.exists():
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError):
            path.unlink(missing_ok=True)  # partial or corrupt: rebuild
    array = np.ascontiguousarray(render(), dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: np.save(fh, array))
    return np.load(path, mmap_mode="r")


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Calls ``write`` on a new file beside ``path``, then renames it to ``path``: readers never
    see a half-written file (the caches' entries, checkpoints)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
