"""The poisoned training set, assembled lazily from a manifest and a poison plan.

Nothing is copied: rows point into the dataset's (memory-mapped) image array,
and the attack stamps its triggers on a batch's poisoned rows as it loads.
"""
from __future__ import annotations

import collections
import copy
import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from poison import Attack, Dataset
from poison.attacks import PLAN_SCHEMA
from poison.datasets.files import locked
from poison.manifest import cache_key, cached_array


class TrainingSet:
    """Clean training pairs (minus replaced ones) followed by the plan's pairs.

    Captions are tokenized once per distinct caption: the dataset's training captions through
    ``token_cache`` (a folder: tokenized by the first trial on a node, memory-mapped by the
    rest, keyed by the captions and the tokenizer), the plan's new captions per trial. At
    3M web captions tokenizing takes minutes (open_clip's tokenizer is Python), which every
    trial would otherwise spend again."""

    def __init__(self, dataset: Dataset, attack: Attack, plan: pa.Table,
                 tokenize: Callable[[list[str]], torch.Tensor], *, token_cache: str | Path | None = None) -> None:
        train = dataset.split("train")
        replaced = plan.filter(pc.equal(plan["op"], "replace"))["poison_id"]  # altered pairs keep their id
        clean = train.filter(pc.invert(pc.is_in(train["id"], value_set=replaced)))
        self.dataset, self.attack, self.tokenize = dataset, attack, tokenize
        # an epoch's length: the clean training pairs, whatever the attack adds or a filter removes
        self.epoch_rows = train.num_rows
        self.image = np.concatenate([clean["image"].to_numpy(), plan["image"].to_numpy()])
        self.plan_row = np.concatenate([np.full(clean.num_rows, -1), np.arange(plan.num_rows)])
        captions = pa.concat_arrays([clean["caption"].combine_chunks().cast(pa.string()),
                                     plan["caption"].combine_chunks().cast(pa.string())])
        known = pc.unique(train["caption"].combine_chunks().cast(pa.string()))  # the dataset's, cached
        new = pc.unique(plan["caption"].combine_chunks().cast(pa.string()))
        new = new.filter(pc.invert(pc.is_in(new, value_set=known)))  # the plan's own captions
        at_known = pc.index_in(captions, value_set=known)
        at_new = pc.add(pc.index_in(captions, value_set=new), len(known))
        self.caption = pc.coalesce(at_known, at_new).to_numpy()  # row → index into the distinct captions
        self.distinct = pa.concat_arrays([known, new])
        base = cached_tokens(known, tokenize, token_cache)
        self.tokens = TokenTable(base, token_ids(tokenize, new.to_pylist(), width=base.shape[1]))
        # the plan's own columns (trigger placement, which part of a combined attack, ...) for stamp()
        self.plan_columns = {c: plan[c].to_numpy() for c in plan.column_names
                             if c not in PLAN_SCHEMA.names or c == "source_label"}

    @property
    def captions(self) -> list[str]:
        """The distinct captions, in the order ``caption`` indexes them."""
        return self.distinct.to_pylist()

    def __len__(self) -> int:
        return len(self.image)

    @property
    def poisoned(self) -> np.ndarray:
        """Boolean per row: the attack added or altered it (the ground truth of filters)."""
        return self.plan_row >= 0

    def subset(self, keep: np.ndarray) -> TrainingSet:
        """The rows where the boolean ``keep`` is true, in order (what a data-side defense leaves)."""
        kept = copy.copy(self)
        kept.image, kept.plan_row, kept.caption = self.image[keep], self.plan_row[keep], self.caption[keep]
        return kept

    def images(self, rows: np.ndarray) -> np.ndarray:
        """uint8 images (B, H, W, 3) of ``rows``, triggers stamped."""
        images = np.array(self.dataset.images[self.image[rows]])
        plan_rows = self.plan_row[rows]
        poisoned = plan_rows >= 0
        if poisoned.any():
            cols = {k: v[plan_rows[poisoned]] for k, v in self.plan_columns.items()}
            images[poisoned] = self.attack.stamp(images[poisoned], cols)
        return images

    def batch(self, rows: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """uint8 images (B, H, W, 3) with triggers stamped, and token ids (B, L)."""
        return self.images(rows), self.tokens[self.caption[rows]]

    def steps(self, batch_size: int) -> int:
        """Optimizer steps in an epoch: as many full batches as the clean training pairs make
        (``epoch_rows``), so a trial whose attack injects pairs, or whose filter removes some,
        takes exactly the steps of its clean model, and ``utility_drop`` measures the poison, not
        a different amount of training. One batch of every row when there are fewer than a batch."""
        if len(self) < batch_size:
            return 1
        return max(1, self.epoch_rows // batch_size)

    def epoch(self, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """The rows of an epoch's ``steps`` shuffled full batches (a contrastive batch needs its
        negatives), ``passes`` over the rows as far as needed (a filtered set smaller than an
        epoch); ``batch(rows)`` loads one. When the set is the clean pairs alone this is one
        permutation cut into batches, the remainder left out.

        Example (10 clean rows, batches of 4: two steps, however many rows the set has):
            >>> class Rows(TrainingSet):
            ...     def __init__(self, n): self.image, self.epoch_rows = np.zeros(n), 10
            >>> [len(Rows(n).epoch(4, np.random.default_rng(0))) for n in (10, 13, 6, 3)]
            [2, 2, 2, 1]
        """
        return passes(np.arange(len(self)), self.steps(batch_size), batch_size, rng)


def passes(rows: np.ndarray, count: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` batches of ``rows``: shuffled passes over them, each cut into its own full batches
    (its remainder left out, so no batch holds a row twice); one batch of every row a pass when
    there are fewer than a batch.

    Example:
        >>> [sorted(b.tolist()) for b in passes(np.arange(6), 3, 4, np.random.default_rng(1))]
        [[0, 1, 2, 4], [2, 3, 4, 5], [0, 1, 4, 5]]
    """
    if len(rows) == 0 or count <= 0:
        return []
    out: list[np.ndarray] = []
    while len(out) < count:
        order = rows[rng.permutation(len(rows))]
        if len(rows) < batch_size:
            out.append(order)
            continue
        out += [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    return out[:count]


Item, Prepared = TypeVar("Item"), TypeVar("Prepared")


def prefetched(prepare: Callable[[Item], Prepared], items: Iterable[Item], threads: int) -> Iterator[Prepared]:
    """``prepare(item)`` for each item, in order, the next ``threads`` of them prepared ahead in
    that many background threads while the caller works on the current one (0: each prepared
    when asked, in the caller's thread). An error in ``prepare`` is raised where its item is
    taken; items not taken when the caller stops are cancelled (running ones finish first).

    Threads, not processes: a batch is a slice of the memory-mapped image cache with triggers
    stamped and normalised, numpy and torch work that releases the GIL, so a thread overlaps it
    with the training step at no copy; on a GPU the host-side work (gathering, stamping,
    pinning) then runs while the device computes the previous step."""
    if threads <= 0:
        yield from map(prepare, items)
        return
    items = iter(items)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="poisonsweep-loader") as pool:
        pending = collections.deque(pool.submit(prepare, item) for item in itertools.islice(items, threads))
        try:
            while pending:
                ready = pending.popleft()
                for item in itertools.islice(items, 1):  # keep ``threads`` batches in the making
                    pending.append(pool.submit(prepare, item))
                yield ready.result()
        finally:
            for future in pending:
                future.cancel()


class TokenTable:
    """Token ids of the distinct captions: ``base`` (the dataset's, maybe memory-mapped) then
    ``extra`` (the plan's own); indexing with row numbers gives an int64 tensor, as the model takes."""

    def __init__(self, base: np.ndarray, extra: np.ndarray) -> None:
        self.base, self.extra = base, extra

    def __len__(self) -> int:
        return len(self.base) + len(self.extra)

    def __getitem__(self, index: np.ndarray) -> torch.Tensor:
        index = np.asarray(index)
        out = np.empty((len(index), self.base.shape[1]), np.int64)
        low = index < len(self.base)
        out[low] = self.base[index[low]]
        out[~low] = self.extra[index[~low] - len(self.base)]
        return torch.from_numpy(out)


def token_ids(tokenize: Callable[[list[str]], torch.Tensor], captions: list[str], *, width: int | None = None) -> np.ndarray:
    """``tokenize(captions)`` as int32 ids (open_clip's vocabularies fit), (0, width) for none."""
    if not captions:
        return np.zeros((0, width if width is not None else tokenize(["probe"]).shape[1]), np.int32)
    return tokenize(captions).numpy().astype(np.int32)


def cached_tokens(captions: pa.Array, tokenize: Callable[[list[str]], torch.Tensor],
                  folder: str | Path | None) -> np.ndarray:
    """Token ids of ``captions`` (distinct), kept in ``folder`` under a key of the captions' bytes
    and the tokenizer (its class, context length and the ids it gives a probe caption)."""
    render = lambda: token_ids(tokenize, captions.to_pylist())  # noqa: E731
    if folder is None:
        return render()
    digest = hashlib.sha256()
    fresh = pa.concat_arrays([captions])  # offset 0, own buffers
    for buffer in fresh.buffers():
        if buffer is not None:
            digest.update(memoryview(buffer))
    probe = tokenize(["A photo of 2 dogs, a cat & a café."]).numpy().tobytes()
    key = cache_key(captions=digest.hexdigest(), n=len(captions), tokenizer=type(tokenize).__qualname__,
                    context=getattr(tokenize, "context_length", None), probe=hashlib.sha256(probe).hexdigest())
    path = Path(folder) / f"tokens-{key}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):  # the node's other trials wait for the first one's tokens, then map them
        return cached_array(path, render, dtype=np.int32)


def to_tensor(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) → normalised float (B, 3, H, W) on the device of ``mean``."""
    x = torch.from_numpy(images)
    if mean.device.type == "cuda":
        x = x.pin_memory().to(mean.device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std
