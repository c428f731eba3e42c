"""What the loaders of real files share: index → seeded selection → skipping → manifest.

A loader (``csv``, ``webdataset``, ``coco-captions``, ``imagefolder``) only reads its
format into an *index*, an Arrow table with one row per image–caption pair of the
source (:func:`make_index`). The rest is common to all of them (:func:`load_index`):

1. **selection**, seeded by ``data.seed``: a test split (the source's own when it has
   one, else ``data.test_size`` images drawn from it, 10% by default), ``data.size``
   training pairs from the rest, and a trusted split (``DataSpec.trusted``) from the
   training pairs whose images the ``data.size`` pairs do not use. A test image
   counts once, with its first non-empty caption, so retrieval has one partner per query.
2. **skipping**: drawn pairs with an empty caption, or one the loader marked as broken
   (``problem``), are left out; the images of the others are decoded once, and pairs
   whose image is missing or undecodable are left out too. ``Dataset.skipped`` counts
   them, ``Dataset.skip_reasons`` by reason. ``data.size`` is the number of pairs
   *drawn*: the training split has that many minus the skipped ones, never a
   replacement drawn in their place, so the pairs kept do not depend on which failed.
3. the **manifest** of the pairs left, built before any attack sees the dataset, so a
   poison plan only ever refers to usable pairs.

Images are decoded with Pillow to RGB, and resized by scaling the shorter side to
``data.image_size`` and cropping the centre square (bicubic; a JPEG is first scaled
down by its decoder, ``Image.draft``, never below the target size). They are
decoded in threads, one file at a time per thread (never the whole set of encoded
bytes in memory), straight into the node's cache: a memory-mapped ``.npy`` under
``data.cache_dir`` with a ``.status.npy`` beside it (0 = decoded, else the reason
code), both written atomically, keyed by the spec and by the source files' names,
sizes and modification times. A second process asking for the same cache waits for
the first one to finish it instead of decoding again.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from poison import streams
from poison.datasets._base import DataError, DataSpec
from poison.manifest import Dataset, atomic_write, make_manifest

log = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema([
    ("file", pa.string()),     # the file holding the image's bytes (an image file, or a tar shard)
    ("offset", pa.int64()),    # where its bytes start in ``file``
    ("length", pa.int64()),    # how many bytes (-1: the whole file)
    ("caption", pa.string()),
    ("label", pa.int32()),     # class index, -1 without classes
    ("group", pa.int64()),     # which image (rows sharing one: several captions of it); dense 0..G-1
    ("split", pa.string()),    # "train" / "test" given by the source; null: drawn with the seed
    ("problem", pa.string()),  # a reason the loader already knows the row is unusable; null: none
])
#: Why a drawn pair was skipped, by code (0 = kept): the keys of ``Dataset.skip_reasons``.
REASONS = ("empty_caption", "missing", "undecodable", "malformed", "too_large")
OK, EMPTY_CAPTION, MISSING, UNDECODABLE, MALFORMED, TOO_LARGE = range(6)
#: The longest side an image may have, as a multiple of ``data.image_size`` (at least
#: MIN_MAX_SIDE px): a larger one is skipped as ``too_large`` before it is decoded, and so is an
#: image file or shard member of more bytes than an uncompressed RGB image of that side.
MAX_SIDE_RATIO, MIN_MAX_SIDE = 64, 8192
DEFAULT_TEST_FRACTION = 0.1
CHUNK = 64  # images per decoding task
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")


def require_path(spec: DataSpec, what: str) -> Path:
    """``data.path`` as a Path, or a DataError naming the key (absent, or not there)."""
    if not spec.path:
        raise DataError(f"data.path: the {spec.dataset} dataset needs data.path ({what})")
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist ({spec.dataset} needs {what})")
    return path


def make_index(*, file: pa.Array | Sequence[str | None], caption: pa.Array | Sequence[str | None],
               offset: np.ndarray | None = None, length: np.ndarray | None = None,
               label: np.ndarray | None = None, group: np.ndarray | None = None,
               split: pa.Array | Sequence[str | None] | None = None,
               problem: pa.Array | Sequence[str | None] | None = None) -> pa.Table:
    """An index table (INDEX_SCHEMA); absent columns take their defaults (whole files, no
    label, one image per row, no split of the source's own, no known problem)."""
    n = len(file)
    columns = {
        "file": file, "offset": np.zeros(n, np.int64) if offset is None else offset,
        "length": np.full(n, -1, np.int64) if length is None else length, "caption": caption,
        "label": np.full(n, -1, np.int32) if label is None else label,
        "group": np.arange(n, dtype=np.int64) if group is None else group,
        "split": pa.nulls(n, pa.string()) if split is None else split,
        "problem": pa.nulls(n, pa.string()) if problem is None else problem,
    }
    return pa.table({k: pa.array(v, INDEX_SCHEMA.field(k).type) if not isinstance(v, (pa.Array, pa.ChunkedArray))
                     else v.cast(INDEX_SCHEMA.field(k).type) for k, v in columns.items()}, schema=INDEX_SCHEMA)


def load_index(index: pa.Table, spec: DataSpec, *, sources: Sequence[Path], classnames: list[str] | None = None,
               templates: list[str] | None = None, root: Path | None = None) -> Dataset:
    """The Dataset of ``index``: selection, skipping, decoding (cached) and the manifest.

    ``sources`` are the files the index was read from (their sizes and modification
    times key the image cache); ``classnames`` and ``templates`` are the zero-shot
    classes, when the source has any; ``root``: the dataset's folder, which the drawn images'
    paths may not leave unless ``data.outside_paths`` is ``allow``.
    """
    if index.num_rows == 0:
        raise DataError(f"data.path: {spec.path} holds no image-caption pairs for {spec.dataset}")
    known = known_reasons(index)
    rows, is_test, capacity = select(index, spec, known=known)
    reasons = known[rows]
    _check_left(spec, is_test[reasons == OK], reasons)  # before decoding anything
    hit = reasons == OK  # the rows whose images are decoded: one image per distinct group
    _, first, inverse = np.unique(index["group"].to_numpy()[rows[hit]], return_index=True, return_inverse=True)
    located = index.select(["file", "offset", "length"]).take(pa.array(rows[hit][first]))
    if root is not None and spec.outside_paths == "refuse":
        check_inside(located["file"].to_pylist(), root)
    images, status = decode_images(located, spec, sources)
    reasons[hit] = status[inverse]
    image = np.full(len(rows), -1, np.int64)
    image[hit] = inverse
    keep = reasons == OK
    _check_left(spec, is_test[keep], reasons)
    kept = pa.array(rows[keep])
    split = pa.DictionaryArray.from_arrays(pa.array(is_test[keep].astype(np.int8)), pa.array(["train", "test"]))
    manifest = make_manifest(image=image[keep], caption=index["caption"].take(kept),
                             label=index["label"].take(kept).to_numpy(), split=split)
    return Dataset(name=spec.dataset, manifest=manifest, classnames=classnames or [], templates=templates or [],
                   image_size=spec.image_size, _render=lambda: images, _images=images, trusted_capacity=capacity,
                   skipped=int(np.sum(~keep)), skip_reasons=_counts(reasons))


def check_inside(files: Sequence[str], root: Path) -> None:
    """Raises DataError unless every one of ``files`` (links followed) lies in ``root``.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> check_inside([str(root / "a.jpg"), str(root / "sub" / "b.jpg")], root)
        >>> check_inside([str(root / "a.jpg"), str(root / ".." / "b.jpg")], root)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        poison.datasets._base.DataError: data.outside_paths: 1 of the 2 drawn image paths leave ... (the first: ...); set data.outside_paths: allow to read them
    """
    base = os.path.realpath(root)
    outside = [f for f in dict.fromkeys(files) if not os.path.realpath(f).startswith(base + os.sep)]
    if outside:
        first = outside[0]
        real = os.path.realpath(first)
        shown = first if real == os.path.normpath(first) else f"{first} -> {real}"
        raise DataError(f"data.outside_paths: {len(outside):,} of the {len(set(files)):,} drawn image paths leave "
                        f"{base} (the first: {shown}); set data.outside_paths: allow to read them")


def select(index: pa.Table, spec: DataSpec, *, known: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """The drawn rows of ``index`` (training, then test), a mask of the test ones, and how
    many trusted pairs the source has beside the training pairs. ``known`` are the rows'
    :func:`known_reasons` (computed when not given).

    Example:
        >>> index = make_index(file=[f"{i}.jpg" for i in range(10)], caption=["x"] * 10)
        >>> rows, is_test, capacity = select(index, DataSpec(dataset="csv", size=6, test_size=2))
        >>> len(rows), int(is_test.sum()), capacity
        (8, 2, 2)
    """
    usable = (known_reasons(index) if known is None else known) == OK
    group = index["group"].to_numpy()
    rep = _representatives(group, usable)  # one row per image, its first usable caption
    rng = streams.rng(spec.seed, streams.FILES_SELECT)
    test, pool = _split_groups(index, rep, usable[rep], spec, rng)
    pool_rows = np.flatnonzero(pool[group])
    train = _draw(pool_rows, spec.size, rng, f"data.size: {{:,}} exceeds the {{:,}} training pairs of {spec.path}; "
                  "set data.size: null to use all of them")
    rest = pool_rows[~np.isin(group[pool_rows], group[train])]  # images the training pairs do not use
    if spec.trusted is not None:
        train = _draw(rest, spec.trusted, streams.rng(spec.seed, streams.FILES_TRUSTED),
                      "trusted split: {:,} pairs do not fit in the {:,} training pairs whose images "
                      "data.size leaves unused", shuffle=True)
    is_test = np.r_[np.zeros(len(train), bool), np.ones(len(test), bool)]
    return np.concatenate([train, rep[test]]), is_test, len(rest)


def _representatives(group: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Per group (dense ids), its first usable row, else its first row."""
    if np.array_equal(group, np.arange(len(group))):
        return group  # one row per image (fast path for millions of rows)
    order = np.lexsort((~usable, group))
    first = np.r_[True, group[order][1:] != group[order][:-1]]
    return order[first]


def _split_groups(index: pa.Table, rep: np.ndarray, usable: np.ndarray, spec: DataSpec,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Test images (group ids, sorted) and a boolean mask of the images training may draw from.

    Drawn test images are drawn among those with a usable caption (a known problem
    never costs the test split an image; an undecodable one still may).
    """
    n = len(rep)
    given = index["split"]
    if given.null_count < len(given):  # the source's own split
        names = given.take(pa.array(rep))
        candidates = np.flatnonzero(pc.fill_null(pc.equal(names, "test"), False).to_numpy(zero_copy_only=False))
        test = _draw(candidates, spec.test_size, rng, f"data.test_size: {{:,}} exceeds the {{:,}} test images "
                     f"of {spec.path}")
        if not len(test):
            raise DataError(f"data.path: {spec.path} has a split of its own but no test images in it")
        return test, pc.fill_null(pc.equal(names, "train"), False).to_numpy(zero_copy_only=False)
    candidates = np.flatnonzero(usable)
    if not len(candidates):
        raise DataError(f"data.path: no usable pairs in {spec.path}: none of its {n:,} images has a caption")
    n_test = spec.test_size or max(1, round(DEFAULT_TEST_FRACTION * min(spec.size or n, n)))
    if n_test >= n or n_test > len(candidates):
        raise DataError(f"data.test_size: {n_test:,} test images leave too few of the {n:,} images of "
                        f"{spec.path} ({len(candidates):,} with a caption) for training and test")
    test = _draw(candidates, n_test, rng, "{}{}")
    pool = np.ones(n, bool)
    pool[test] = False
    return test, pool


def _draw(rows: np.ndarray, count: int | None, rng: np.random.Generator, message: str, *,
          shuffle: bool = False) -> np.ndarray:
    """``count`` of ``rows`` drawn without replacement (all when None), in index order;
    ``shuffle`` takes a prefix of a permutation (a smaller draw is part of a larger one)."""
    if count is None:
        return rows
    if count > len(rows):
        raise DataError(message.format(count, len(rows)))
    pick = rng.permutation(len(rows))[:count] if shuffle else rng.choice(len(rows), count, replace=False)
    return rows[np.sort(pick)]


def known_reasons(index: pa.Table) -> np.ndarray:
    """Per index row, the reason code known before decoding: the loader's ``problem``, else
    an empty caption; OK for the rows whose image is still to be decoded."""
    blank = pc.or_(pc.equal(pc.binary_length(index["caption"]), 0), pc.utf8_is_space(index["caption"]))
    reasons = np.where(pc.fill_null(blank, True).to_numpy(zero_copy_only=False), EMPTY_CAPTION, OK).astype(np.int8)
    problem = index["problem"]
    if problem.null_count < len(problem):
        for code, name in enumerate(REASONS, start=1):
            reasons[pc.fill_null(pc.equal(problem, name), False).to_numpy(zero_copy_only=False)] = code
    return reasons


def _counts(reasons: np.ndarray) -> dict[str, int]:
    return {name: int(np.sum(reasons == code)) for code, name in enumerate(REASONS, start=1)}


def _check_left(spec: DataSpec, is_test: np.ndarray, reasons: np.ndarray) -> None:
    for name, present in (("train", not is_test.all()), ("test", is_test.any())):
        if not present:
            skipped = ", ".join(f"{n:,} {r}" for r, n in _counts(reasons).items() if n) or "none"
            raise DataError(f"data.path: no usable {name} pairs left in {spec.path} after skipping "
                            f"(skipped: {skipped})")


# -- decoding and the node's image cache ------------------------------------------------------

def decode_images(table: pa.Table, spec: DataSpec, sources: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The images whose bytes ``table`` locates (columns file, offset, length), decoded to
    uint8 (N, side, side, 3), and per image OK or the reason it failed (its pixels black).

    With ``spec.cache_dir`` both are read from the node's cache, or decoded into it once.
    """
    key = _fingerprint(table, sources)
    path = spec.cache_file(source=key)
    shape = (table.num_rows, spec.image_size, spec.image_size, 3)
    if path is None:
        images, status = np.zeros(shape, np.uint8), np.zeros(len(table), np.int8)
        _decode_all(table, images, status, spec.image_size)
        return images, status
    status_path = path.with_suffix(".status.npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        found = _read_cache(path, status_path, shape)
        if found is not None:
            return found
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
        os.close(fd)
        try:
            images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            status = np.zeros(len(table), np.int8)
            _decode_all(table, images, status, spec.image_size)
            images.flush()
            del images
            os.replace(tmp, path)  # the images first: a status file means they are complete
            _save_atomic(status_path, status)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return np.load(path, mmap_mode="r"), status


def _read_cache(path: Path, status_path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    if not (path.exists() and status_path.exists()):
        return None
    try:
        images, status = np.load(path, mmap_mode="r"), np.load(status_path)
        if images.shape == shape and status.shape == shape[:1]:
            return images, status
    except (ValueError, OSError):
        pass
    path.unlink(missing_ok=True)  # partial or corrupt: rebuild
    status_path.unlink(missing_ok=True)
    return None


def _save_atomic(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda fh: np.save(fh, array))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Holds an exclusive lock beside ``path``: one process on the node builds the cache,
    the others wait for it and then read it."""
    with open(path.with_suffix(".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _file_stats(files: pa.Array) -> np.ndarray:
    """(size, modification time in ns) of each distinct path in ``files`` (-1, -1: missing), in
    sorted path order, stat'ed by threads (a network file system answers each in a round trip)."""
    paths = sorted(set(pc.drop_null(files).to_pylist()) - {""})

    def stat(path: str) -> tuple[int, int]:
        try:
            info = os.stat(path)
        except OSError:
            return -1, -1
        return info.st_size, info.st_mtime_ns

    if len(paths) < 1024:
        return np.array([stat(p) for p in paths], np.int64).reshape(-1, 2)
    with ThreadPoolExecutor(max_workers=16) as pool:
        return np.array(list(pool.map(stat, paths, chunksize=256)), np.int64).reshape(-1, 2)


def _fingerprint(table: pa.Table, sources: Sequence[Path]) -> str:
    """A digest of which bytes are decoded (file, offset, length of each image), of the source
    files' sizes and modification times, and of every image file's: an image replaced under the
    same name is decoded again, never served from the cache."""
    digest = hashlib.sha256()
    files = pc.fill_null(table["file"], "").combine_chunks()
    offsets = np.frombuffer(files.buffers()[1], np.int32)[files.offset : files.offset + len(files) + 1]
    if len(files):
        digest.update((offsets - offsets[0]).tobytes())
        digest.update(memoryview(files.buffers()[2])[offsets[0] : offsets[-1]])
    for column in ("offset", "length"):
        digest.update(table[column].to_numpy().tobytes())
    for source in sources:
        stat = source.stat()
        digest.update(f"{source}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(_file_stats(files).tobytes())
    return digest.hexdigest()[:16]


def _decode_all(table: pa.Table, images: np.ndarray, status: np.ndarray, side: int) -> None:
    if table.num_rows > CHUNK:
        log.info("decoding %s images to %d px", f"{table.num_rows:,}", side)

    def chunk(start: int) -> None:
        part = table.slice(start, CHUNK)
        rows = zip(part["file"].to_pylist(), part["offset"].to_pylist(), part["length"].to_pylist())
        for i, (file, offset, length) in enumerate(rows, start=start):
            status[i] = decode_into(images, i, file, offset, length, side)

    starts = range(0, table.num_rows, CHUNK)
    if len(starts) == 1:
        chunk(0)
        return
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
        list(pool.map(chunk, starts))


def max_side(side: int) -> int:
    """The longest side, in pixels, of an image decoded for ``side``-pixel training.

    >>> max_side(32), max_side(224)
    (8192, 14336)
    """
    return max(MAX_SIDE_RATIO * side, MIN_MAX_SIDE)


def max_bytes(side: int) -> int:
    """The most bytes an image file or shard member may hold: an uncompressed RGB square of
    :func:`max_side`, plus 1 MiB of headers."""
    return 3 * max_side(side) ** 2 + 2**20


def decode_into(images: np.ndarray, i: int, file: str | None, offset: int, length: int, side: int) -> int:
    """Decodes one image into ``images[i]``; returns OK or the reason code it was skipped for."""
    if not file:
        return MISSING
    try:
        if (os.path.getsize(file) if length < 0 else length) > max_bytes(side):
            return TOO_LARGE
        if length < 0:
            images[i] = decode(file, side)
            return OK
        with open(file, "rb") as fh:  # a member of a shard: only its own bytes are read
            fh.seek(offset)
            data = fh.read(length)
        if len(data) < length:
            return UNDECODABLE  # a truncated shard
        images[i] = decode(io.BytesIO(data), side)
        return OK
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return MISSING
    except (TooLarge, Image.DecompressionBombError):
        return TOO_LARGE
    except Exception:  # noqa: BLE001  (whatever Pillow raises for a bad file: skipped and counted)
        return UNDECODABLE


class TooLarge(ValueError):
    """An image larger than :func:`max_side` allows, found from its header."""


def decode(source: str | io.BytesIO, side: int) -> np.ndarray:
    """One image as uint8 (side, side, 3): RGB, shorter side scaled to ``side``, centre crop.

    Every mode Pillow reads becomes RGB: 16- and 32-bit grey scaled from their full range
    (``I;16``: 0-65535, ``I``: 0-65535 as 16-bit PNGs open) and floats from [0, 1] to 0-255
    (Pillow's own conversion clips them); transparency is dropped as open_clip's
    ``_convert_to_rgb`` drops it. An image whose longer side exceeds :func:`max_side` raises
    TooLarge before its pixels are decoded.

    Example:
        >>> buffer = io.BytesIO()
        >>> Image.new("RGB", (60, 30), (255, 0, 0)).save(buffer, "PNG")
        >>> decode(buffer, 16).shape
        (16, 16, 3)
        >>> grey = io.BytesIO()
        >>> Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(grey, "PNG")  # 16-bit mid-grey
        >>> decode(grey, 8)[0, 0].tolist()
        [128, 128, 128]
    """
    with Image.open(source) as img:
        if max(img.size) > max_side(side):
            raise TooLarge(f"{img.size[0]}x{img.size[1]} px")
        img.draft("RGB", (side, side))  # JPEG: let the decoder scale down (stays >= side)
        rgb = _eight_bit(img).convert("RGB")
    w, h = rgb.size
    c = min(w, h)
    box = ((w - c) / 2, (h - c) / 2, (w + c) / 2, (h + c) / 2)  # the centre square
    return np.asarray(rgb.resize((side, side), Image.Resampling.BICUBIC, box=box), dtype=np.uint8)


def _eight_bit(img: Image.Image) -> Image.Image:
    """``img`` in an 8-bit mode: 16- and 32-bit integer and float grey rescaled, others as they are."""
    if img.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I
        scaled = np.asarray(img, np.float64) * (255 / 65535)
    elif img.mode == "F":
        scaled = np.asarray(img, np.float64) * 255
    else:
        return img
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


__all__ = ["IMAGE_EXTENSIONS", "INDEX_SCHEMA", "REASONS", "check_inside", "decode", "max_bytes", "max_side", "decode_images", "known_reasons", "load_index",
           "make_index", "require_path", "select"]
