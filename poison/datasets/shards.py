"""``webdataset``: img2dataset's tar shards, each sample an image and a caption with one key.

``data.path`` is a folder of ``.tar`` files, one ``.tar`` file, a brace pattern
(``/data/cc3m/{00000..00331}.tar``) or a glob (``/data/cc3m/*.tar``). In a shard, the
members ``000123.jpg`` (or ``.jpeg``, ``.png``, ``.webp``) and ``000123.txt`` are one
sample (the key is the name up to the first dot of its last part); other members
(``.json``) are ignored. A sample without an image is skipped as ``missing``, one
without a caption as ``empty_caption``. Shards are read with the standard library
(uncompressed tars, as img2dataset writes them): the index keeps each image's offset
in its shard, and decoding reads those bytes alone. The pairs have no classes.

Example ``data`` section::

    data: {dataset: webdataset, path: "/data/cc3m/{00000..00331}.tar", size: 500000, image_size: 64}
"""
from __future__ import annotations

import glob
import logging
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from poison.datasets._base import DATASETS, DataError, DataSpec
from poison.datasets.files import IMAGE_EXTENSIONS, load_index, make_index
from poison.manifest import Dataset, atomic_write, cache_key

log = logging.getLogger(__name__)
IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # preference order when a sample has several
CAPTION_KEY = "txt"
_BRACE = re.compile(r"\{([^{}]*)\}")
MAX_SHARDS = 1_000_000  # shards a brace pattern may name


@DATASETS.register("webdataset")
def load(spec: DataSpec) -> Dataset:
    """Lists the shards' members now (captions read), decodes the drawn images once."""
    shards = shard_paths(spec.path)
    folder = Path(spec.cache_dir) / "webdataset-index" if spec.cache_dir else None
    return load_index(read_index(shards, cache=folder), spec, sources=shards)


def shard_paths(path: str | None) -> list[Path]:
    """The shard files ``data.path`` names, sorted; a DataError names what is missing."""
    if not path:
        raise DataError("data.path: the webdataset dataset needs data.path (a folder of .tar shards, "
                        "or a brace or glob pattern of them)")
    given = Path(path).expanduser()
    if given.is_dir():
        shards = sorted(given.glob("*.tar"))
        if not shards:
            raise DataError(f"data.path: {given} holds no .tar shards")
        return shards
    if given.is_file():
        return [given]
    names = expand_braces(str(given))
    if len(names) > 1 or names[0] != str(given):
        missing = [n for n in names if not any(Path(m).is_file() for m in glob.glob(n))]
        if missing:
            raise DataError(f"data.path: {len(missing):,} of the {len(names):,} shards of {path} do not exist "
                            f"(first: {missing[0]})")
    shards = sorted({Path(m) for n in names for m in glob.glob(n) if Path(m).is_file()})
    if not shards:
        raise DataError(f"data.path: {path} does not exist (no shard matches it)")
    return shards


def expand_braces(pattern: str, *, whole: str | None = None) -> list[str]:
    """Brace expansion as webdataset writes shard names: ``{a..b}`` (zero-padded like ``a``)
    and ``{x,y}``; a range that runs backwards, names more than MAX_SHARDS shards, or braces
    that are empty or hold an empty choice raise a DataError naming the pattern.

    Example:
        >>> expand_braces("s/{008..010}.tar")
        ['s/008.tar', 's/009.tar', 's/010.tar']
        >>> expand_braces("{a,b}-{1..2}")
        ['a-1', 'a-2', 'b-1', 'b-2']
    """
    whole = whole or pattern
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.groups()
        if int(hi) < int(lo):
            raise DataError(f"data.path: {whole}: the range {{{body}}} runs backwards")
        if int(hi) - int(lo) + 1 > MAX_SHARDS:
            raise DataError(f"data.path: {whole}: the range {{{body}}} names {int(hi) - int(lo) + 1:,} shards "
                            f"(at most {MAX_SHARDS:,})")
        options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
        if body == "":
            raise DataError(f"data.path: {whole}: empty braces {{}}")
        if "" in options:
            raise DataError(f"data.path: {whole}: an empty choice in {{{body}}}")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    names = [expanded for option in options for expanded in expand_braces(head + option + tail, whole=whole)]
    if len(names) > MAX_SHARDS:
        raise DataError(f"data.path: {whole}: names {len(names):,} shards (at most {MAX_SHARDS:,})")
    return names


def read_index(shards: list[Path], *, cache: Path | None = None) -> pa.Table:
    """The index of the samples of every shard, in shard and member order. With ``cache`` (a
    folder), each shard's samples are kept there under a key of its path, size and
    modification time, so a node reads a shard's tar headers once (about 10,000 samples/s),
    not once per trial; a changed shard gets a new key."""
    tables = [shard_samples(shard, cache) for shard in shards]
    counts = np.array([t.num_rows for t in tables], np.int64)
    offset = np.concatenate([t["offset"].to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)
    has_image = offset >= 0
    names = pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(len(shards), dtype=np.int32), counts)),
                                           pa.array([str(s) for s in shards], pa.string()))
    return make_index(
        file=pc.if_else(pa.array(has_image), names.cast(pa.string()), pa.scalar(None, pa.string())),
        caption=pa.concat_arrays([t["caption"].combine_chunks() for t in tables]) if tables else pa.array([], pa.string()),
        offset=np.maximum(offset, 0),
        length=np.concatenate([t["length"].to_numpy() for t in tables]) if tables else np.zeros(0, np.int64),
        problem=pc.if_else(pa.array(has_image), pa.scalar(None, pa.string()), pa.scalar("missing", pa.string())))


SAMPLES_SCHEMA = pa.schema([("offset", pa.int64()), ("length", pa.int64()), ("caption", pa.string())])


def shard_samples(shard: Path, cache: Path | None = None) -> pa.Table:
    """One shard's samples (``SAMPLES_SCHEMA``: image offset, length, caption; offset -1: no
    image), read from ``cache`` when it holds this version of the shard, else from the tar and
    stored there (atomically; a partial or corrupt file is read again from the tar)."""
    path = None
    if cache is not None:
        stat = shard.stat()
        key = cache_key(shard=str(shard.resolve()), size=stat.st_size, mtime=stat.st_mtime_ns, version=load.VERSION)
        path = cache / f"{shard.stem}-{key}.arrow"
        try:
            with pa.OSFile(str(path), "rb") as source:
                table = pa.ipc.open_file(source).read_all()
            if table.schema.equals(SAMPLES_SCHEMA):
                return table
        except (OSError, pa.ArrowInvalid):
            pass
    samples = _samples(shard)
    offsets, lengths, captions = zip(*samples) if samples else ((), (), ())
    table = pa.table({"offset": pa.array(offsets, pa.int64()), "length": pa.array(lengths, pa.int64()),
                      "caption": pa.array(captions, pa.string())}, schema=SAMPLES_SCHEMA)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(fh) -> None:
            with pa.ipc.new_file(fh, SAMPLES_SCHEMA) as writer:
                writer.write_table(table)

        atomic_write(path, write)
    return table


def _samples(shard: Path) -> list[tuple[int, int, str | None]]:
    """(image offset, image length, caption) of each sample of one shard (offset -1: no image)."""
    members = _members(shard)
    out = []
    with open(shard, "rb") as fh:
        for parts in members.values():
            image = next((parts[k] for k in IMAGE_KEYS if k in parts), None)
            if image is None and CAPTION_KEY not in parts:
                continue  # neither image nor caption (metadata only): not a pair
            caption = None
            if CAPTION_KEY in parts:
                offset, size = parts[CAPTION_KEY]
                fh.seek(offset)
                caption = fh.read(size).decode("utf-8", errors="replace")
            out.append((*(image or (-1, -1)), caption))
    return out


def _members(shard: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """key → {extension: (data offset, size)} of a shard's files, in member order."""
    samples = _scan(shard)
    if samples is not None:
        return samples
    samples = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            try:
                for member in tar:
                    if member.isfile():
                        _add(samples, member.name, member.offset_data, member.size)
            except (tarfile.TarError, EOFError, OSError) as err:  # a truncated shard: keep what was read
                log.warning("%s: stopped reading at a damaged member (%s)", shard, err)
    except tarfile.ReadError as err:
        raise DataError(f"data.path: {shard} is not an uncompressed tar shard ({err})") from None
    return samples


def _scan(shard: Path) -> dict[str, dict[str, tuple[int, int]]] | None:
    """:func:`_members` by reading the plain ustar headers that img2dataset writes (ten times
    faster than ``tarfile``); None when the shard has others (pax, GNU long names, not a tar),
    which ``tarfile`` then reads. Stops, keeping what it read, at a damaged header."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    offset = 0
    with open(shard, "rb") as fh:
        while True:
            header = fh.read(_BLOCK)
            if offset == 0 and len(header) < _BLOCK:
                return None  # too short for a tar: tarfile says what it is
            if len(header) < _BLOCK or header == _EMPTY:
                return samples
            if header[257:262] != b"ustar" and not _checksum_ok(header):  # the magic suffices, else the sum
                if offset == 0:
                    return None  # not a tar (or compressed): tarfile says what it is
                log.warning("%s: stopped reading at a damaged header at byte %d", shard, offset)
                return samples
            kind = header[156:157]
            if kind not in _PLAIN or header[124] & 0x80:  # pax/GNU headers, base-256 sizes
                return None
            size = int(header[124:136].rstrip(b" \0") or b"0", 8)
            if kind in _FILES:
                _add(samples, _name(header), offset + _BLOCK, size)
            offset += _BLOCK + -(-size // _BLOCK) * _BLOCK
            fh.seek(offset)


_BLOCK = 512
_EMPTY = bytes(_BLOCK)
_FILES = (b"0", b"\0", b"7")  # regular files
_PLAIN = (*_FILES, b"1", b"2", b"3", b"4", b"5", b"6")  # ustar types with no extended header


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = int(header[148:156].rstrip(b" \0") or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", errors="replace")


def _add(samples: dict[str, dict[str, tuple[int, int]]], name: str, offset: int, size: int) -> None:
    folder, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return
    stem, ext = base.split(".", 1)
    key = f"{folder}/{stem}" if folder else stem
    samples.setdefault(key, {})[ext.lower()] = (offset, size)


#: Bump when reading or decoding changes: it keys the on-disk image cache.
load.VERSION = 1  # type: ignore[attr-defined]
load.TRUSTED = True  # type: ignore[attr-defined]  # trusted pairs come from images data.size leaves unused
