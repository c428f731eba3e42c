"""Training pairs from one dataset, zero-shot classes and test images from another
(``data.zeroshot``): how CLIP poisoning is studied on web data. Carlini & Terzis train on
Conceptual Captions and measure the backdoor by zero-shot classification on ImageNet; the
captions have no classes, the evaluation set does.

The combined dataset has the training split of the training data and the test split of the
evaluation data (its classes, prompt templates and labels). Its images are the two image
arrays side by side, indexed through one index space (:class:`StackedImages`, nothing
copied). A training pair's class is its own class where the training data has classes of the
same name; otherwise the class its caption names (:func:`caption_labels`: the one class
whose name occurs in the caption as whole words, case and punctuation aside; -1 when none or
more than one does), the way both papers pick the captions "of a class" in a web scrape. So
the attacks that need classes (poison pools, target captions, source captions) work on
unlabelled pairs, and attack success and utility are measured on the evaluation set.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from poison.datasets._base import DataError
from poison.manifest import Dataset, make_manifest

# words: runs of ASCII letters and digits, lower-cased, and of any non-ASCII characters
# (so "café" stays a word); any other ASCII character separates words
_SEPARATE = np.array([not (chr(b).isascii() and chr(b).isalnum()) and b < 128 for b in range(256)])


def normalise(name: str) -> str:
    """A class name as the words :func:`caption_labels` matches.

    Example:
        >>> normalise("T-shirt/top"), normalise("  Golden_Retriever "), normalise("Café au lait")
        ('t shirt top', 'golden retriever', 'café au lait')
    """
    lowered = pc.utf8_lower(pa.array([name], pa.large_string()))[0].as_py()  # as captions are lowered
    data = np.frombuffer(lowered.encode(), np.uint8)
    return " ".join(np.where(_SEPARATE[data], np.uint8(32), data).tobytes().decode().split())


def _split(lowered: pa.Array) -> pa.ListArray:
    """Each string's words (module-level ``_SEPARATE`` bytes become spaces; one byte-table pass
    over the whole buffer instead of a regex per string, which took 11 s for 3M captions)."""
    offsets = np.frombuffer(lowered.buffers()[1], np.int64)[lowered.offset : lowered.offset + len(lowered) + 1]
    data = np.frombuffer(lowered.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    spaced = np.where(_SEPARATE[data], np.uint8(32), data)
    text = pa.LargeStringArray.from_buffers(len(lowered), pa.py_buffer((offsets - offsets[0]).astype(np.int64)),
                                            pa.py_buffer(spaced.tobytes()))
    return pc.utf8_split_whitespace(text)


def caption_labels(captions: pa.Array | pa.ChunkedArray, classnames: list[str]) -> np.ndarray:
    """Per caption, the index of the one class whose name (as words, :func:`normalise`) occurs
    in it as consecutive whole words; -1 when no class or several classes do. Vectorised
    (pyarrow compute to split and look words up, numpy to match runs of words): 3M captions
    against 1,000 class names take a few seconds (benchmarks/manifest_3m.py).

    Example:
        >>> caption_labels(pa.array(["A photo of a Sea Lion.", "two cats and a dog", "dogs",
        ...                          "a cat", None, "a sea, lion"]), ["cat", "dog", "sea lion"]).tolist()
        [2, 1, -1, 0, -1, 2]
    """
    names = [normalise(c).split() for c in classnames]
    captions = pc.fill_null(captions, "")
    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks()
    # large strings: a 3M-caption scrape can pass 2 GB of characters
    words = _split(pc.utf8_lower(captions.cast(pa.large_string())))
    vocabulary = sorted({w for name in names for w in name})
    # each word as its index in the class names' vocabulary + 1 (0: a word no name has)
    ids = pc.fill_null(pc.index_in(pc.list_flatten(words), value_set=pa.array(vocabulary, pa.large_string())),
                       -1).to_numpy().astype(np.int64) + 1
    owner = pc.list_parent_indices(words).to_numpy()
    base = len(vocabulary) + 1
    found_rows, found_classes = [], []
    for length in sorted({len(name) for name in names if name}):
        if base ** length >= 2**62:
            raise ValueError(f"class names of {length} words over a vocabulary of {base - 1:,} are too many to match")
        span = len(ids) - length + 1
        if span <= 0:
            continue
        key = ids[:span].copy()
        same = key > 0
        for k in range(1, length):  # the run of `length` words starting at each word, as one integer
            key = key * base + ids[k : k + span]
            same &= (ids[k : k + span] > 0) & (owner[k : k + span] == owner[:span])
        wanted = [(i, name) for i, name in enumerate(names) if len(name) == length]
        codes = np.zeros(len(wanted), np.int64)
        for k in range(length):
            codes = codes * base + np.array([vocabulary.index(name[k]) + 1 for _, name in wanted], np.int64)
        order = np.argsort(codes)
        at = np.clip(np.searchsorted(codes[order], key), 0, len(codes) - 1)
        found = same & (codes[order][at] == key)
        found_classes.append(np.array([i for i, _ in wanted], np.int64)[order][at[found]])
        found_rows.append(owner[:span][found])
    labels = np.full(len(captions), -1, np.int32)
    if found_rows:
        # a caption names exactly one class when the least and the greatest class it names agree
        rows, classes = np.concatenate(found_rows), np.concatenate(found_classes)
        least = np.full(len(captions), len(names), np.int64)
        greatest = np.full(len(captions), -1, np.int64)
        np.minimum.at(least, rows, classes)
        np.maximum.at(greatest, rows, classes)
        single = least == greatest
        labels[single] = least[single]
    # two classes of the same name (once normalised): a caption naming one names both
    seen: dict[tuple[str, ...], int] = {}
    for name in names:
        seen[tuple(name)] = seen.get(tuple(name), 0) + 1
    twins = [i for i, name in enumerate(names) if seen[tuple(name)] > 1]
    labels[np.isin(labels, twins)] = -1
    return labels


class StackedImages:
    """Two uint8 image arrays seen as one, indexed by integer arrays (or one integer): rows
    below ``offset`` come from ``first``, the rest from ``second`` (row − offset). Nothing is
    copied until a batch is taken."""

    def __init__(self, first: np.ndarray, second: np.ndarray, offset: int) -> None:
        if first.shape[1:] != second.shape[1:]:
            raise DataError(f"data.zeroshot: its images are {second.shape[1:]}, the training images "
                            f"{first.shape[1:]}")
        self.first, self.second, self.offset = first, second, offset
        self.shape = (offset + len(second), *first.shape[1:])
        self.dtype = first.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: np.ndarray | int) -> np.ndarray:
        if np.isscalar(index):
            i = int(index)
            return self.first[i] if i < self.offset else self.second[i - self.offset]
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        out = np.empty((len(index), *self.shape[1:]), self.dtype)
        low = index < self.offset
        out[low] = self.first[index[low]]
        out[~low] = self.second[index[~low] - self.offset]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[np.arange(len(self))].astype(dtype or self.dtype)


PROMPTS = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}."]


def caption_classes(dataset: Dataset, classnames: list[str], *,
                    require: tuple[str, ...] = ("train", "test")) -> Dataset:
    """``dataset`` with ``classnames`` as its zero-shot classes and every pair, training and test,
    labelled with the one class its caption names (:func:`caption_labels`; -1: none or several).
    An image's class is its test caption's; images whose caption names no class take part in
    retrieval but in no class-based metric. Each split in ``require`` must have a caption that
    names a class (a trusted split, used only to train a reference model, need not)."""
    if dataset.classnames:
        raise DataError(f"data.classes: {dataset.name} has classes of its own ({', '.join(dataset.classnames[:5])}"
                        f"{', ...' if len(dataset.classnames) > 5 else ''}); data.classes is for pairs without")
    labels = caption_labels(dataset.manifest["caption"], classnames)
    manifest = dataset.manifest.set_column(dataset.manifest.schema.get_field_index("label"), "label", pa.array(labels))
    for split in require:
        if not (labels[(dataset.manifest["split"].to_numpy(zero_copy_only=False) == split)] >= 0).any():
            raise DataError(f"data.classes: no {split} caption of {dataset.name} names one of "
                            f"{', '.join(classnames[:5])}{', ...' if len(classnames) > 5 else ''}")
    return dataclasses.replace(dataset, manifest=manifest, classnames=list(classnames), templates=PROMPTS)


def with_zeroshot(train: Dataset, test: Dataset) -> Dataset:
    """``train``'s training pairs with ``test``'s test split, classes and templates (module doc)."""
    if not test.classnames:
        raise DataError(f"data.zeroshot.dataset: {test.name} has no classes to classify into")
    pairs = train.split("train")
    held = test.split("test")
    if pairs.num_rows == 0 or held.num_rows == 0:
        raise DataError(f"data.zeroshot: no {'training pairs' if pairs.num_rows == 0 else 'test images'} left")
    if train.classnames:  # the training data's own classes, where the evaluation set has them by name
        index = {normalise(c): i for i, c in enumerate(test.classnames)}
        mapping = np.array([index.get(normalise(c), -1) for c in train.classnames] + [-1], np.int32)
        labels = mapping[pairs["label"].to_numpy()]  # -1 (unknown) indexes the trailing -1
        unmapped = labels < 0  # a class the evaluation set lacks, or none: the caption's
        if unmapped.any():
            labels[unmapped] = caption_labels(pairs["caption"].filter(pa.array(unmapped)), test.classnames)
    else:
        labels = caption_labels(pairs["caption"], test.classnames)
    offset = int(pc.max(train.manifest["image"]).as_py()) + 1
    ids = int(pc.max(train.manifest["id"]).as_py()) + 1
    manifest = make_manifest(
        image=np.concatenate([pairs["image"].to_numpy(), held["image"].to_numpy() + offset]),
        caption=pa.concat_arrays([pairs["caption"].combine_chunks().cast(pa.string()),
                                  held["caption"].combine_chunks().cast(pa.string())]),
        label=np.concatenate([labels, held["label"].to_numpy()]),
        split=pa.DictionaryArray.from_arrays(
            pa.array(np.repeat(np.array([0, 1], np.int8), [pairs.num_rows, held.num_rows])), pa.array(["train", "test"])),
    )
    manifest = manifest.set_column(0, "id", pa.array(np.concatenate(
        [pairs["id"].to_numpy(), held["id"].to_numpy() + ids])))

    def images() -> StackedImages:
        return StackedImages(train.images, test.images, offset)

    reasons = dict(train.skip_reasons)
    for reason, count in test.skip_reasons.items():
        reasons[reason] = reasons.get(reason, 0) + count
    return dataclasses.replace(
        train, name=f"{train.name} (zero-shot on {test.name})", manifest=manifest, classnames=list(test.classnames),
        templates=list(test.templates), _render=images, _cache_file=None, _images=None,
        skipped=train.skipped + test.skipped, skip_reasons=reasons)


__all__ = ["PROMPTS", "StackedImages", "caption_classes", "caption_labels", "normalise", "with_zeroshot"]
