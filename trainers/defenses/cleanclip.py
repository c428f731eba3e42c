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
policy), per image, as the authors' code. Caption views (``caption_view: eda``, the default): one
EDA variant per clean pair, made once before fine-tuning, as the authors' ``utils/augment_text.py``
writes it to their csv (``trainers.augment``; needs WordNet). ``caption_view: token-edit`` is
ours, for a machine without WordNet: EDA's deletion and swap on the token ids, drawn afresh each
step (``trainers.augment.augment_tokens``).
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torchvision.transforms import v2

from poison.defenses import DEFENSES
from poison.manifest import Dataset
from trainers.augment import CaptionSource, CaptionView, augment_images, require_wordnet
from trainers.defenses.finetune import CleanFinetune
from trainers.objectives import Objective, Step


@DEFENSES.register("cleanclip")
class CleanClip(CleanFinetune):
    kind: Literal["cleanclip"] = "cleanclip"  # type: ignore[assignment]
    clip_weight: float = Field(1.0, ge=0)
    inmodal_weight: float = Field(1.0, ge=0)
    caption_view: CaptionView = "eda"  # the authors' / ours (see above)
    token_drop: float = Field(0.1, ge=0, lt=1)  # caption_view: token-edit
    inmodal_loss: Literal["one-way", "symmetric"] = "one-way"  # the authors' / ours (see above)

    def check(self, dataset: Dataset, *, pretrained: bool) -> None:
        require_wordnet("defense.caption_view", self.caption_view)
        super().check(dataset, pretrained=pretrained)

    def finetune_objective(self, seed: int) -> InModal:
        return InModal(self.clip_weight, self.inmodal_weight, symmetric=self.inmodal_loss == "symmetric",
                       captions=CaptionSource(self.caption_view, seed, token_drop=self.token_drop))


class InModal(Objective):
    """CleanCLIP's loss: weighted cross-modal plus in-modal (augmented view) InfoNCE, the in-modal
    terms one-way (originals against views, the authors') or ``symmetric`` (ours)."""

    augment = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)

    def __init__(self, clip_weight: float, inmodal_weight: float, *, symmetric: bool,
                 captions: CaptionSource) -> None:
        super().__init__()
        self.clip_weight, self.inmodal_weight, self.symmetric, self.captions = clip_weight, inmodal_weight, symmetric, captions

    def start_epoch(self, epoch: int, pairs: Any) -> None:
        self.captions.bind(pairs.data)

    def caption_views(self, step: Step, rows: np.ndarray | None = None) -> torch.Tensor:
        """The caption views of the batch's rows (or of ``rows`` among them), as the text tower takes them."""
        return step.text_input(self.captions.tokens(step.rows if rows is None else rows))

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
            text_views = step.model.encode_text(self.caption_views(step), normalize=True)
            inmodal = (self.view_loss(images, image_views, scale) + self.view_loss(texts, text_views, scale)) / 2
            loss = loss + self.inmodal_weight * inmodal
        return loss

