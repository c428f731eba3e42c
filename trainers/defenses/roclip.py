"""``roclip`` (Yang, Gao & Mirzasoleiman 2023, "Robust Contrastive Language-Image Pretraining
against Data Poisoning and Backdoor Attacks"): in every ``period``-th epoch, each image is
paired not with its own caption but with the caption nearest to it in a pool of captions
seen in earlier steps, so a poisoned caption is rarely the one an image is pulled towards.

``schedule: authors`` (the default) follows the authors' code (BigML-CS-UCLA/RoCLIP,
``model/src/train.py:get_loss`` and ``model/src/memory_bank.py:NNMemoryBankModule``, over lightly
1.2.39's ``MemoryBankModule``):

- the pool is a ring of ``pool_size`` caption embeddings (the authors' default 21,845; or
  ``pool_fraction`` of the training pairs), created at the first matching step as standard-normal
  rows, left unnormalised as lightly 1.2.39 leaves them (its normalisation's result is discarded),
  drawn from the seed's ``ROCLIP_POOL`` stream;
- it is read and written only in matching epochs: each image's nearest pool row by cosine is
  looked up, then the batch's detached caption embeddings are written over the oldest rows;
- matching epochs are every ``period``-th epoch counted back from the last, never before epoch
  ``period``: the run ends on a matching epoch, and when ``train.epochs`` is a multiple of
  ``period`` these are the authors' epochs ``period``, ``2·period``, ... (``epoch % K == 0``);
- a matching epoch's loss is CLIP's symmetric loss between each image and its nearest pool row,
  plus CLIP's loss on the batch's own pairs times 0, as the authors add it: the text tower gets zero
  gradients (not none), so AdamW still decays it and applies its momentum;
- other epochs train with CLIP's loss as usual;
- ``augment: true`` (the default; the authors' ``--cross_aug``, in their README's command): every
  pair is trained on as augmented views, in every epoch (``model/src/data.py:ImageCaptionDataset``):
  the image as a fresh SimCLR-style view at each load (``trainers.augment.simclr_view``), the
  caption as its one EDA variant made at the start (``caption_view: eda``; ``token-edit`` is ours,
  for a machine without WordNet). ``augment: false`` trains on the pairs as they are.

Not matched: a wrapping batch here wraps around the ring, where lightly drops its tail; the pool
is part of the loop's checkpoints (theirs is not saved). ``docs/sources/roclip.md`` lists every
difference.

``schedule: every-step`` is ours, a named variant: the pool starts empty (a step without one trains
on its own captions), holds the last ``pool_size`` captions of every step of every epoch, and
epochs ``period``, ``2·period``, ... match, whatever the run's length; the text tower is left out of
a matching epoch's graph.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from poison import streams
from poison.defenses import DEFENSES, Defense, Stage
from poison.manifest import Dataset
from trainers.augment import CaptionSource, CaptionView, augment_images, require_wordnet, simclr_view
from trainers.objectives import Objective, Step, nearest_rows, ring_write

AUTHORS_POOL_SIZE = 21845  # model/src/parser.py: --memory_bank_size


@DEFENSES.register("roclip")
class RoClip(Defense):
    kind: Literal["roclip"] = "roclip"
    pool_size: int = Field(AUTHORS_POOL_SIZE, ge=1)  # caption embeddings kept in the pool
    pool_fraction: float | None = Field(None, gt=0, le=1)  # instead: this share of the training pairs
    period: int = Field(2, ge=1)        # every period-th epoch matches images to pool captions
    schedule: Literal["authors", "every-step"] = "authors"
    augment: bool = True  # train on augmented views, as the authors' --cross_aug (module docstring)
    caption_view: CaptionView = "eda"  # with augment: the authors' / ours

    metric_names: ClassVar[tuple[str, ...]] = ()
    stage: ClassVar[Stage] = "training"

    @model_validator(mode="after")
    def _one_size(self) -> RoClip:
        if self.pool_fraction is not None and "pool_size" in self.model_fields_set:
            raise ValueError(f"pool_fraction: give pool_size or pool_fraction, not both "
                             f"(got pool_size={self.pool_size}, pool_fraction={self.pool_fraction})")
        return self

    def check(self, dataset: Dataset, *, pretrained: bool) -> None:
        if self.augment:
            require_wordnet("defense.caption_view", self.caption_view)

    def objective(self, seed: int) -> NearestCaption:
        return NearestCaption(self.pool_size, self.period, schedule=self.schedule, seed=seed,
                              pool_fraction=self.pool_fraction,
                              captions=CaptionSource(self.caption_view, seed) if self.augment else None)


def matching(epoch: int, last_epoch: int, period: int) -> bool:
    """Whether ``epoch`` (1-based) matches: every ``period``-th counted back from ``last_epoch``,
    never before ``period``.

    Example:
        >>> [e for e in range(1, 5) if matching(e, 4, 2)], [e for e in range(1, 4) if matching(e, 3, 2)]
        ([2, 4], [3])
    """
    return epoch >= period and (last_epoch - epoch) % period == 0


class NearestCaption(Objective):
    """CLIP's loss, with each image's caption replaced by its nearest pool caption in matching
    epochs; the pool's schedule is the authors' or ours (module docstring)."""

    def __init__(self, pool_size: int, period: int, *, schedule: str = "authors", seed: int = 0,
                 pool_fraction: float | None = None, captions: CaptionSource | None = None) -> None:
        super().__init__()
        self.pool_size, self.period, self.schedule, self.seed = pool_size, period, schedule, seed
        self.pool_fraction, self.captions = pool_fraction, captions  # captions: the augmented views' (None: none)
        self.image_view = None
        self.pool: torch.Tensor | None = None  # every-step: (filled, D), oldest first; authors: the ring
        self.next_row = 0  # authors: the ring row the next caption is written to

    def start_epoch(self, epoch: int, pairs: Any) -> None:
        if self.pool_fraction is not None:  # sized by the training set, which only the loop knows
            self.pool_size = max(1, round(self.pool_fraction * len(pairs.data)))
        if self.captions is not None:
            self.captions.bind(pairs.data)

    def inputs(self, rows: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, torch.Tensor] | None:
        """With augmentation: a fresh SimCLR-style view of each image and each row's EDA caption."""
        if self.captions is None:
            return None
        if self.image_view is None:
            self.image_view = simclr_view(images.shape[1])
        return augment_images(images, self.image_view), self.captions.tokens(rows)

    def loss(self, step: Step) -> torch.Tensor:
        images, texts, scale = step.out["image_features"], step.out["text_features"], step.out["logit_scale"]
        if self.pool is not None and self.pool.device != images.device:  # loaded from a checkpoint
            self.pool = self.pool.to(images.device)
        if self.schedule == "every-step":
            return self._every_step(step, images, texts, scale)
        if not matching(step.epoch, step.last_epoch or step.epoch, self.period):
            return self.pair_loss(images, texts, scale)
        if self.pool is None:
            rows = streams.rng(self.seed, streams.ROCLIP_POOL).standard_normal((self.pool_size, texts.shape[1]))
            self.pool = torch.as_tensor(rows, dtype=torch.float32, device=images.device)
        nearest = nearest_rows(self.pool, images.detach().float())
        loss = self.pair_loss(images, nearest.to(images.dtype), scale) + 0 * self.pair_loss(images, texts, scale)
        self.next_row = ring_write(self.pool, self.next_row, texts.detach().float())
        return loss

    def _every_step(self, step: Step, images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if step.epoch % self.period == 0 and self.pool is not None:
            nearest = self.pool[(images.detach().float() @ self.pool.T).argmax(dim=1)]
            loss = self.pair_loss(images, nearest.to(images.dtype), scale)
        else:
            loss = self.pair_loss(images, texts, scale)
        self.push(texts.detach().float())
        return loss

    def push(self, texts: torch.Tensor) -> None:
        """every-step: appends ``texts`` to the pool, dropping the oldest beyond ``pool_size``."""
        pool = texts if self.pool is None else torch.cat([self.pool, texts])
        self.pool = pool[-self.pool_size:]

    def state_dict(self) -> dict[str, Any]:
        return {} if self.pool is None else {"pool": self.pool.cpu(), "next_row": self.next_row,
                                             "pool_size": self.pool_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool = state.get("pool")
        self.next_row = state.get("next_row", 0)
        self.pool_size = state.get("pool_size", self.pool_size)
