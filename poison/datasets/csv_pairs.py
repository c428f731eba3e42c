"""``csv``: a CC3M-style CSV or TSV file of local image paths and captions (``data.path``).

The separator comes from the extension (``.tsv``/``.tab``: tab, ``.csv``: comma, anything
else: tab when the header line has one, else comma); ``.gz``/``.bz2`` files are read as
they are. The header names the columns: the image path is the first of
``IMAGE_COLUMNS`` the file has (``filepath``, ``image``, ``url``, ...), the caption the
first of ``CAPTION_COLUMNS`` (``caption``, ``title``, ``text``, ...), matched without
regard to case; ``data.image_column`` and ``data.caption_column`` name others. A relative path is relative to the
file's folder. A row with the wrong number of fields is skipped as ``malformed``; a
missing or undecodable image and an empty caption are skipped as everywhere
(``poison.datasets.files``). The pairs have no classes: alone, the attacks that need labels
refuse the dataset; with ``data.zeroshot`` (a labelled evaluation set) or ``data.classes``
(classes named by the captions) each pair takes the class its caption names
(``poison.datasets.zeroshot``).

Example ``data`` section::

    data: {dataset: csv, path: /data/cc3m/train.tsv, size: null, test_size: 5000, image_size: 64}
"""
from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from poison.datasets._base import DATASETS, DataError, DataSpec
from poison.datasets.files import load_index, make_index, require_path
from poison.manifest import Dataset

IMAGE_COLUMNS = ("filepath", "file_path", "image_path", "img_path", "path", "filename", "file_name", "file",
                 "image", "img", "jpg", "png", "url", "image_url")
CAPTION_COLUMNS = ("caption", "captions", "title", "text", "txt", "sentence", "description", "alt", "alt_text")
SEPARATORS = {".tsv": "\t", ".tab": "\t", ".csv": ","}
COMPRESSED = (".gz", ".bz2")


@DATASETS.register("csv")
def load(spec: DataSpec) -> Dataset:
    """Reads the file's two columns now (Arrow's CSV reader), decodes the drawn images once."""
    path = require_path(spec, "a CSV or TSV file of image paths and captions")
    if path.is_dir():
        raise DataError(f"data.path: {path} is a folder; the csv dataset needs a CSV or TSV file")
    return load_index(read_index(path, image_column=spec.image_column, caption_column=spec.caption_column),
                      spec, sources=[path], root=path.parent)


def read_index(path: Path, *, image_column: str | None = None, caption_column: str | None = None) -> pa.Table:
    r"""The index of a CSV/TSV file (``poison.datasets.files.INDEX_SCHEMA``).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "pairs.tsv").write_text("Image\tTitle\nimg/0.jpg\ta dog\n")
        >>> index = read_index(folder / "pairs.tsv")
        >>> index["file"][0].as_py() == f"{folder}/img/0.jpg", index["caption"].to_pylist()
        (True, ['a dog'])
    """
    sep = separator(path)
    header = _header(path, sep)
    image = image_column or _pick(header, IMAGE_COLUMNS, path, "image-path")
    caption = caption_column or _pick(header, CAPTION_COLUMNS, path, "caption")
    for key, name in (("data.image_column", image), ("data.caption_column", caption)):
        if name not in header:
            raise DataError(f"{key}: {path} has no column {name!r}; its columns: {', '.join(header)}")
    malformed: list[object] = []
    try:
        table = _read(path, sep, [image, caption], None)
    except pa.ArrowInvalid:  # a row with the wrong number of fields: read again, skipping such rows
        table = _read(path, sep, [image, caption], malformed)
    files = _resolve(table[image].combine_chunks(), path.parent, path, image)
    n, bad = table.num_rows, len(malformed)
    return make_index(
        file=pa.concat_arrays([files, pa.nulls(bad, pa.string())]),
        caption=pa.concat_arrays([table[caption].combine_chunks(), pa.nulls(bad, pa.string())]),
        problem=pa.concat_arrays([pa.nulls(n, pa.string()), pa.array(["malformed"] * bad, pa.string())]),
    )


def _read(path: Path, sep: str, columns: list[str], malformed: list[object] | None) -> pa.Table:
    """The ``columns`` of the file as strings; with ``malformed``, rows with the wrong number of
    fields are left out and appended to it (Arrow's reader is slower with such a handler)."""
    def on_invalid(row: object) -> str:
        malformed.append(row)  # type: ignore[union-attr]
        return "skip"

    parse = pacsv.ParseOptions(delimiter=sep, invalid_row_handler=on_invalid if malformed is not None else None)
    convert = pacsv.ConvertOptions(include_columns=columns, strings_can_be_null=False,
                                   column_types={c: pa.string() for c in columns})
    try:
        return pacsv.read_csv(path, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as err:
        if malformed is None and "Expected" in str(err):
            raise  # the wrong number of fields: the caller reads again with a handler
        raise DataError(f"data.path: {path} cannot be read as a {_kind(sep)} file: {err}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"data.path: {path} cannot be read as a {_kind(sep)} file: {err}") from None


def separator(path: Path) -> str:
    """The field separator of ``path``, from its extension (a compression suffix aside)."""
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    if suffixes and suffixes[-1] in SEPARATORS:
        return SEPARATORS[suffixes[-1]]
    return "\t" if "\t" in _first_line(path) else ","


def _first_line(path: Path) -> str:
    with pa.input_stream(str(path), compression="detect") as stream:
        head = stream.read(1 << 16)
    return head.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace").rstrip("\r")


def _header(path: Path, sep: str) -> list[str]:
    line = _first_line(path)
    if not line.strip():
        raise DataError(f"data.path: {path} is empty or has no header line")
    return next(csv.reader([line], delimiter=sep))


def _pick(header: list[str], candidates: tuple[str, ...], path: Path, what: str) -> str:
    lowered = {name.strip().lower(): name for name in header}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    raise DataError(f"data.path: {path} has no recognisable {what} column (looked for {', '.join(candidates)}); "
                    f"its columns: {', '.join(header)}")


def _resolve(paths: pa.Array, folder: Path, source: Path, column: str) -> pa.Array:
    """Relative paths joined to ``folder``; empty ones null (skipped as missing)."""
    head = paths.slice(0, 1000)
    if len(paths) and pc.all(pc.match_substring_regex(head, r"^https?://")).as_py() and \
            pc.all(pc.match_substring_regex(paths, r"^https?://")).as_py():
        raise DataError(f"data.path: column {column!r} of {source} holds URLs; download the images first "
                        "(img2dataset, then dataset: webdataset) or list local paths")
    resolved = pc.binary_replace_slice(paths, 0, 0, f"{folder}/").cast(pa.string())
    absolute = pc.starts_with(paths, "/")
    if pc.any(absolute).as_py():
        resolved = pc.if_else(absolute, paths, resolved)
    empty = pc.equal(pc.binary_length(paths), 0)
    if pc.any(empty).as_py():
        resolved = pc.if_else(empty, pa.scalar(None, pa.string()), resolved)
    return resolved


def _kind(sep: str) -> str:
    return "TSV" if sep == "\t" else "CSV"


#: Bump when reading or decoding changes: it keys the on-disk image cache.
load.VERSION = 1  # type: ignore[attr-defined]
load.TRUSTED = True  # type: ignore[attr-defined]  # trusted pairs come from images data.size leaves unused
