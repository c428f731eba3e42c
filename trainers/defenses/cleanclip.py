"""``cleanclip`` (Bansal et al. 2023, "CleanCLIP: Mitigating Data Poisoning Attacks in Multimodal
Contrastive Learning"): fine-tune the poisoned model on clean pairs with CLIP's loss plus
in-modal self-supervised losses, so each modality's embedding is pulled towards its own
augmented view and the spurious trigger-to-caption link fades.

It is ``clean-finetune`` (same clean pairs, epochs, lr, ``predefense_*`` metrics) with the loss

    clip_weight · CLIP(images, captions) + inmodal_weight · (InModal(images, images') + InModal(captions, captions')) / 2

as the authors' code (CleanCLIP ``src/train.py:get_loss``): ``InModal(x, x')`` is the
cross-entropy of each original's row of ``scale · x x'ᵀ`` against its own view, the batch's other
views as negatives, in that one direction (``inmodal_loss: one-way``, the default).
``inmodal_loss: symmetric`` is ours, a named variant: CLIP's symmetric loss between the originals
and their views (both directions averaged). Image views: torchvision's AutoAugment (ImageNet
policy), per image, as the authors' code. Caption views: the authors use EDA on the
words (synonyms, insertion, swap, deletion); here, without WordNet, EDA's deletion and swap act
on the token ids between the start and end tokens (each token dropped with ``token_drop``,
keeping one, then two tokens swapped). Needs open_clip's BPE tokenizer, whose end token has the
largest id (true of every architecture open_clip tokenizes itself).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torchvision.transforms import v2

from poison.defenses import DEFENSES
from trainers.defenses.finetune import CleanFinetune
from trainers.objectives import Objective, Step


@DEFENSES.register("cleanclip")
class CleanClip(CleanFinetune):
    kind: Literal["cleanclip"] = "cleanclip"  # type: ignore[assignment]
    clip_weight: float = Field(1.0, ge=0)
    inmodal_weight: float = Field(1.0, ge=0)
    token_drop: float = Field(0.1, ge=0, lt=1)
    inmodal_loss: Literal["one-way", "symmetric"] = "one-way"  # the authors' / ours (see above)

    def finetune_objective(self, seed: int) -> "InModal":
        return InModal(self.clip_weight, self.inmodal_weight, self.token_drop, symmetric=self.inmodal_loss == "symmetric")


class InModal(Objective):
    """CleanCLIP's loss: weighted cross-modal plus in-modal (augmented view) InfoNCE, the in-modal
    terms one-way (originals against views, the authors') or ``symmetric`` (ours)."""

    augment = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)

    def __init__(self, clip_weight: float, inmodal_weight: float, token_drop: float, *, symmetric: bool) -> None:
        super().__init__()
        self.clip_weight, self.inmodal_weight, self.token_drop = clip_weight, inmodal_weight, token_drop
        self.symmetric = symmetric

    def view_loss(self, x: torch.Tensor, views: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The in-modal term of originals ``x`` against their ``views``."""
        if self.symmetric:
            return self.pair_loss(x, views, scale)
        logits = scale * x @ views.T
        return torch.nn.functional.cross_entropy(logits, torch.arange(len(x), device=x.device))

    def loss(self, step: Step) -> torch.Tensor:
        images, texts, scale = step.out["image_features"], step.out["text_features"], step.out["logit_scale"]
        loss = self.clip_weight * self.pair_loss(images, texts, scale)
        if self.inmodal_weight:
            image_views = step.model.encode_image(step.to_input(augment_images(step.images, self.augment)),
                                                  normalize=True)
            text_views = step.model.encode_text(augment_tokens(step.tokens, self.token_drop), normalize=True)
            inmodal = (self.view_loss(images, image_views, scale) + self.view_loss(texts, text_views, scale)) / 2
            loss = loss + self.inmodal_weight * inmodal
        return loss


def augment_images(images: np.ndarray, augment) -> np.ndarray:
    """uint8 (B, H, W, 3) images, each through ``augment`` with its own random draw (torch's RNG)."""
    chw = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return torch.stack([augment(image) for image in chw]).permute(0, 2, 3, 1).numpy()


def augment_tokens(tokens: torch.Tensor, drop: float) -> torch.Tensor:
    """EDA's random deletion and random swap on token ids (torch's RNG): between the start token
    and the end token (the row's largest id), each token is dropped with probability ``drop``
    (one is always kept), then two of the rest trade places; the end token follows the last
    one and the row is zero-padded as before.

    Example:
        >>> augment_tokens(torch.tensor([[9, 5, 6, 10, 0]]), drop=0.0)  # doctest: +SKIP
        tensor([[ 9,  6,  5, 10,  0]])
    """
    rows = tokens.cpu()
    out = torch.zeros_like(rows)
    for i, row in enumerate(rows):
        end = int(row.argmax())
        inner = row[1:end]
        if len(inner):
            keep = torch.rand(len(inner)) >= drop
            if not keep.any():
                keep[torch.randint(len(inner), ())] = True
            inner = inner[keep]
        if len(inner) >= 2:
            a, b = torch.randperm(len(inner))[:2].tolist()
            inner[[a, b]] = inner[[b, a]]
        view = torch.cat([row[:1], inner, row[end : end + 1]])
        out[i, : len(view)] = view
    return out.to(tokens.device)
