"""What the training loop minimises. By default CLIP's contrastive loss; a defense that acts
during training (``roclip``) or fine-tunes after it (``cleanclip``) hands the loop an
:class:`Objective` of its own, so the loop (``trainers.loop.fit``) knows no defense.

An objective sees one :class:`Step`: the model, the batch (uint8 images as loaded, triggers
stamped, and token ids) and the model's outputs on it. It may keep state between steps (a
caption pool): ``state_dict``/``load_state_dict`` put it in the loop's checkpoints, so a
resumed trial goes on exactly as an uninterrupted one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainers.models import clip_loss


@dataclass
class Step:
    """One training step, as an objective sees it."""

    model: torch.nn.Module
    images: np.ndarray                   # uint8 (B, H, W, 3), triggers stamped
    tokens: torch.Tensor                 # (B, L) token ids, on the model's device
    out: dict[str, torch.Tensor]         # model(images, tokens): normalised features and logit_scale
    epoch: int                           # 1-based, as reported
    to_input: Callable[[np.ndarray], torch.Tensor]  # uint8 images → the model's normalised input
    rows: np.ndarray | None = None       # the batch's rows of the training set
    last_epoch: int | None = None        # the run's last epoch, numbered as ``epoch``
    to_text: Callable[[torch.Tensor], torch.Tensor] | None = None  # token ids (CPU) → the text tower's input

    def text_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids on the CPU (caption views) as the text tower takes them."""
        return self.to_text(tokens) if self.to_text is not None else tokens.to(self.tokens.device)


class Objective:
    """CLIP's symmetric InfoNCE loss (open_clip's ``ClipLoss``) on the batch's own pairs."""

    def __init__(self) -> None:
        self.clip = clip_loss()

    def pair_loss(self, a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """InfoNCE of row i of ``a`` against row i of ``b``, both ways, averaged."""
        return self.clip(a, b, logit_scale)

    def loss(self, step: Step) -> torch.Tensor:
        out = step.out
        return self.pair_loss(out["image_features"], out["text_features"], out["logit_scale"])

    def start_epoch(self, epoch: int, pairs: Any) -> None:
        """Before each epoch: ``pairs`` (``trainers.loop.TrainingEmbeddings``) embeds every
        training pair under the current model when asked (``pairs.embed()``)."""

    def inputs(self, rows: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, torch.Tensor | None] | None:
        """What the loop's forward pass takes instead of the batch as loaded, or None for the batch
        itself: uint8 (B, H, W, 3) images and token ids on the CPU (None: the loaded captions'),
        for the training set's ``rows``. RoCLIP and SafeCLIP train on augmented views of their
        pairs (``trainers.augment``). Called in the loop's thread, so torch's generator, seeded
        and checkpointed by the loop, draws the views."""
        return None

    def batches(self, epoch: int, data: Any, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """The epoch's batches (rows of ``data``, a ``trainers.data.TrainingSet``), after
        ``start_epoch``: by default ``data.epoch``'s shuffled full batches. An objective that trains
        subsets apart (SafeCLIP's risky pairs, then its safe ones) returns its own."""
        return data.epoch(batch_size, rng)

    def epoch_lr(self, epoch: int, lr: float) -> float | None:
        """A learning rate held constant through ``epoch`` instead of the schedule's (``lr`` is the
        recipe's peak), or None to follow the schedule: SafeCLIP's CLIP warm-up epoch runs at a
        hundredth of the others'."""
        return None

    def metrics(self) -> dict[str, float]:
        """What it reports at the end of training (added to the trial's metrics)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def nearest_rows(bank: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Each query's nearest ``bank`` row by cosine (the rows normalised for the search), returned
    as it is stored: a nearest-neighbour memory bank's lookup (RoCLIP's caption pool, SafeCLIP's
    banks; lightly's ``NNMemoryBankModule``)."""
    return bank[(queries @ torch.nn.functional.normalize(bank, dim=1).T).argmax(dim=1)]


def ring_write(bank: torch.Tensor, at: int, rows: torch.Tensor) -> int:
    """Writes ``rows`` over ``bank``'s oldest entries from position ``at``, wrapping around (the
    last ``len(bank)`` of a larger batch); returns the next position."""
    size = len(bank)
    rows = rows[-size:].to(bank.device)
    bank[(at + torch.arange(len(rows), device=bank.device)) % size] = rows
    return int((at + len(rows)) % size)


__all__ = ["Objective", "Step", "nearest_rows", "ring_write"]
