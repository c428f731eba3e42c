"""The poisoned training set, assembled lazily from a manifest and a poison plan.

Nothing is copied: rows point into the dataset's (memory-mapped) image array,
and the attack stamps its triggers on a batch's poisoned rows as it loads.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from poison import Attack, Dataset
from poison.attacks import PLAN_SCHEMA


class TrainingSet:
    """Clean training pairs (minus replaced ones) followed by the plan's pairs."""

    def __init__(self, dataset: Dataset, attack: Attack, plan: pa.Table,
                 tokenize: Callable[[list[str]], torch.Tensor]) -> None:
        train = dataset.split("train")
        replaced = plan.filter(pc.equal(plan["op"], "replace"))["poison_id"]  # altered pairs keep their id
        clean = train.filter(pc.invert(pc.is_in(train["id"], value_set=replaced)))
        self.dataset, self.attack = dataset, attack
        self.image = np.concatenate([clean["image"].to_numpy(), plan["image"].to_numpy()])
        self.plan_row = np.concatenate([np.full(clean.num_rows, -1), np.arange(plan.num_rows)])
        captions = pa.concat_arrays([clean["caption"].combine_chunks(), plan["caption"].combine_chunks()])
        unique = pc.unique(captions)
        self.caption = pc.index_in(captions, value_set=unique).to_numpy()  # row → index into captions
        self.captions = unique.to_pylist()
        self.tokens = tokenize(self.captions)
        # the plan's own columns (trigger placement, which part of a combined attack, ...) for stamp()
        self.plan_columns = {c: plan[c].to_numpy() for c in plan.column_names
                             if c not in PLAN_SCHEMA.names or c == "source_label"}

    def __len__(self) -> int:
        return len(self.image)

    @property
    def poisoned(self) -> np.ndarray:
        """Boolean per row: the attack added or altered it (the ground truth of filters)."""
        return self.plan_row >= 0

    def subset(self, keep: np.ndarray) -> "TrainingSet":
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

    def epoch(self, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
        """Shuffled full batches (a contrastive batch needs its negatives): each its rows,
        uint8 images (triggers stamped) and token ids."""
        order = rng.permutation(len(self))
        usable = len(order) - len(order) % batch_size if len(order) >= batch_size else len(order)
        for start in range(0, usable, batch_size):
            rows = order[start : start + batch_size]
            yield (rows, *self.batch(rows))


def to_tensor(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) → normalised float (B, 3, H, W) on the device of ``mean``."""
    x = torch.from_numpy(images)
    if mean.device.type == "cuda":
        x = x.pin_memory().to(mean.device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std
