"""``roclip`` (Yang, Gao & Mirzasoleiman 2023, "Robust Contrastive Language-Image Pretraining
against Data Poisoning and Backdoor Attacks"): in every ``period``-th epoch, each image is
paired not with its own caption but with the caption nearest to it in a pool of captions
seen in earlier steps, so a poisoned caption is rarely the one an image is pulled towards.

Following the authors' code (a nearest-neighbour memory bank, as in NNCLR): the pool is a
first-in-first-out queue of the last ``pool_size`` caption embeddings (detached), updated
after every step of every epoch; in a matching epoch (epoch % period == 0, epochs counted
from 1) the loss is CLIP's between the batch's images and their nearest pool captions by
cosine similarity, so the text tower gets no gradient in those epochs; other epochs train
with CLIP's loss as usual. The pool is part of the loop's checkpoints.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from poison.defenses import DEFENSES, Defense, Stage
from trainers.objectives import Objective, Step


@DEFENSES.register("roclip")
class RoClip(Defense):
    kind: Literal["roclip"] = "roclip"
    pool_size: int = Field(2048, ge=1)  # caption embeddings kept in the pool
    period: int = Field(2, ge=1)        # every period-th epoch matches images to pool captions

    metric_names: ClassVar[tuple[str, ...]] = ()
    stage: ClassVar[Stage] = "training"

    def objective(self, seed: int) -> "NearestCaption":
        return NearestCaption(self.pool_size, self.period)


class NearestCaption(Objective):
    """CLIP's loss, with each image's caption replaced by its nearest pool caption every
    ``period``-th epoch; the pool is a FIFO queue of detached caption embeddings."""

    def __init__(self, pool_size: int, period: int) -> None:
        super().__init__()
        self.pool_size, self.period = pool_size, period
        self.pool: torch.Tensor | None = None  # (filled, D), oldest first

    def loss(self, step: Step) -> torch.Tensor:
        images, texts, scale = step.out["image_features"], step.out["text_features"], step.out["logit_scale"]
        if self.pool is not None and self.pool.device != images.device:  # loaded from a checkpoint
            self.pool = self.pool.to(images.device)
        if step.epoch % self.period == 0 and self.pool is not None:
            nearest = self.pool[(images.detach().float() @ self.pool.T).argmax(dim=1)]
            loss = self.pair_loss(images, nearest.to(images.dtype), scale)
        else:
            loss = self.pair_loss(images, texts, scale)
        self.push(texts.detach().float())
        return loss

    def push(self, texts: torch.Tensor) -> None:
        """Appends ``texts`` to the pool, dropping the oldest beyond ``pool_size``."""
        pool = texts if self.pool is None else torch.cat([self.pool, texts])
        self.pool = pool[-self.pool_size:]

    def state_dict(self) -> dict[str, Any]:
        return {} if self.pool is None else {"pool": self.pool.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool = state.get("pool")
