"""``safeclip`` (Yang et al. 2024, "Better Safe than Sorry: Pre-training CLIP against Targeted
Data Poisoning and Backdoor Attacks"): never let a pair the model finds unlikely teach the
image–caption link.

1. ``inmodal_epochs`` (default 0) train every pair with in-modal losses only (each image
   against its augmented view, each caption against its own; CleanCLIP's views and InfoNCE),
   so the towers learn their modalities without any pairing;
2. ``clip_epochs`` (default 1) train every pair with CLIP's loss plus the in-modal losses
   (the authors' one slow CLIP epoch), so images and captions share a space;
3. before each later epoch, every training pair is embedded by the current model; the *safe*
   pairs are those in the higher-mean component of a two-component Gaussian mixture
   (scikit-learn, seeded) fitted to the pairs' image–caption cosine similarities, and among
   the most similar ``safe_fraction`` of all pairs, a fraction that grows by ``safe_growth``
   each epoch (the authors grow the safe set slowly, so a poison learned from a few pairs
   cannot pull the rest in). A batch trains its safe pairs with CLIP's loss among themselves
   and its risky pairs with the in-modal losses, each term weighted by its share of the batch.

The defaults are the best of the settings measured here (README); the authors warm up with
in-modal epochs and train their CLIP epoch at a low learning rate, which an objective cannot
set (AdamW's steps do not scale with the loss).

Poisoned pairs join an image and a caption that do not belong together, so they have low
similarity and stay out of the cross-modal loss. The last split is scored against the plan
like a filter's keep-mask (``filter_removed`` = risky pairs, ``filter_poison_recall``,
``filter_precision``).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from poison import streams
from poison.defenses import (DEFENSES, DETECTION_METRICS, FILTER_METRICS, Defense, Stage, detection_metrics,
                             filter_metrics)
from trainers.defenses.cleanclip import InModal, augment_images, augment_tokens
from trainers.objectives import Step


@DEFENSES.register("safeclip")
class SafeClip(Defense):
    kind: Literal["safeclip"] = "safeclip"
    inmodal_epochs: int = Field(0, ge=0)   # in-modal losses only, on every pair
    clip_epochs: int = Field(1, ge=0)      # CLIP's loss plus the in-modal ones, on every pair
    safe_fraction: float = Field(0.15, gt=0, le=1)  # at most this fraction is safe at the first split
    safe_growth: float = Field(0.05, ge=0, le=1)    # ... and this much more at each later one
    token_drop: float = Field(0.1, ge=0, lt=1)     # caption views (see cleanclip)

    # the last split scored against the plan like a filter's keep-mask: filter_removed = risky
    # pairs, filter_poison_recall = poisoned pairs found risky, filter_precision = risky that are poison;
    # the detection metrics rank the pairs by their image-caption dissimilarity at that split
    metric_names: ClassVar[tuple[str, ...]] = (*FILTER_METRICS[:3], *DETECTION_METRICS)
    stage: ClassVar[Stage] = "training"

    def objective(self, seed: int) -> "SafeRisky":
        return SafeRisky(self, seed)


def safe_split(similarity: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean per pair: in the higher-mean component of a two-component Gaussian mixture fitted
    to the image–caption cosine ``similarity``, and among the most similar ``fraction`` of pairs
    (ties by row order; the mixture is skipped when the pairs are too few or all equal).

    Example:
        >>> safe_split(np.array([0.9, 0.85, 0.8, 0.1, 0.05, 0.88]), fraction=1.0, seed=0).tolist()
        [True, True, True, False, False, True]
        >>> safe_split(np.array([0.9, 0.85, 0.8, 0.1, 0.05, 0.88]), fraction=0.5, seed=0).tolist()
        [True, True, False, False, False, True]
    """
    x = np.asarray(similarity, np.float64)
    top = np.zeros(len(x), bool)
    top[np.argsort(-x, kind="stable")[: int(round(fraction * len(x)))]] = True
    if len(x) < 4 or np.ptp(x) == 0:
        return top
    from sklearn.mixture import GaussianMixture  # here: sklearn is 1.6 s of every trial worker's start-up

    mixture = GaussianMixture(n_components=2, random_state=seed).fit(x.reshape(-1, 1))
    return top & (mixture.predict(x.reshape(-1, 1)) == int(np.argmax(mixture.means_.ravel())))


class SafeRisky(InModal):
    """In-modal losses only during warm-up; then CLIP's loss on the safe pairs of a batch and the
    in-modal losses on its risky ones, the split refitted before every epoch."""

    def __init__(self, config: SafeClip, seed: int) -> None:
        super().__init__(clip_weight=1.0, inmodal_weight=1.0, token_drop=config.token_drop, symmetric=True)
        self.config, self.seed = config, seed
        self.safe: np.ndarray | None = None  # per training row; None: every pair alike
        self.clip_all = False                # phase 2: CLIP's loss on every pair
        self.scores: dict[str, float] = {}   # the last split against the plan

    def start_epoch(self, epoch: int, pairs: Any) -> None:
        c = self.config
        split = epoch - c.inmodal_epochs - c.clip_epochs  # 1 at the first split
        self.clip_all, self.safe = c.inmodal_epochs < epoch <= c.inmodal_epochs + c.clip_epochs, None
        if split < 1:
            return
        images, texts = pairs.embed()
        similarity = (images * texts).sum(dim=1).cpu().numpy()
        fraction = min(1.0, c.safe_fraction + c.safe_growth * (split - 1))
        seed = int(streams.rng(self.seed, streams.SAFECLIP_EPOCH, epoch).integers(2**31))
        self.safe = safe_split(similarity, fraction, seed)
        self.scores = {**filter_metrics(self.safe, pairs.data.poisoned),
                       **detection_metrics(-similarity, pairs.data.poisoned)}

    def metrics(self) -> dict[str, float]:
        return dict(self.scores)

    def loss(self, step: Step) -> torch.Tensor:
        if self.clip_all:
            return super().loss(step)  # CLIP's loss plus the in-modal losses, every pair
        images, texts, scale = step.out["image_features"], step.out["text_features"], step.out["logit_scale"]
        safe = np.zeros(len(images), bool) if self.safe is None else self.safe[step.rows]
        safe_t = torch.from_numpy(safe).to(images.device)
        loss = images.new_zeros(())
        if safe.sum() >= 2:
            loss = loss + safe.mean() * self.pair_loss(images[safe_t], texts[safe_t], scale)
        risky = ~safe
        if risky.sum() >= 2:
            image_views = step.model.encode_image(step.to_input(augment_images(step.images[risky], self.augment)),
                                                  normalize=True)
            text_views = step.model.encode_text(augment_tokens(step.tokens[~safe_t], self.token_drop), normalize=True)
            inmodal = (self.view_loss(images[~safe_t], image_views, scale)
                       + self.view_loss(texts[~safe_t], text_views, scale)) / 2
            loss = loss + risky.mean() * inmodal
        return loss
