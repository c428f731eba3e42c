"""``safeclip`` (Yang et al. 2024, "Better Safe than Sorry: Pre-training CLIP against Targeted
Data Poisoning and Backdoor Attacks"): never let a pair the model finds unlikely teach the
image–caption link. As the authors' code (BigML-CS-UCLA/SafeCLIP, ``SafeCLIP/src/main.py:worker``,
``src/train.py:get_loss``, ``src/samplers.py:fit_gmm_to_cos_sim``):

1. ``inmodal_epochs`` (default 5) train every pair with the in-modal loss alone: per modality, two
   augmented views of the batch; each view-1 embedding is replaced by its nearest neighbour (cosine)
   in a first-in-first-out memory bank of ``memory_bank`` (default 256) detached view-1 embeddings,
   looked up before the batch is added, and the loss is the cross-entropy of
   ``scale · view2 · neighboursᵀ`` over rows (one direction), images and captions averaged; the
   bank starts as the seed's standard-normal rows, unnormalised, as lightly 1.2.39 leaves them;
2. ``clip_epochs`` (default 1) train every pair with CLIP's loss alone, at a constant learning rate
   of ``clip_lr_ratio`` (0.01) times ``train.lr``, the authors' 5e-6 against their 5e-4 (the
   loop's ``Objective.epoch_lr``);
3. before each later epoch every training pair is embedded by the current model, a two-component
   Gaussian mixture (scikit-learn) is fitted to the image–caption cosine similarities, and each
   pair's posterior of the higher-mean component ranks it. The first split takes as safe the
   pairs whose posterior is at least ``first_posterior`` (0.9), so the first safe share is the
   data's; every later split takes the top share by posterior, the share growing by
   ``safe_step`` (0.01) per split up to ``safe_cap`` (0.85);
4. an epoch trains the risky pairs first, in batches of their own, with the in-modal loss, then
   the safe pairs, in batches of their own, with CLIP's loss (``Objective.batches``), each a
   shuffled pass of full batches.

Every phase trains on augmented views, as the authors' ``src/data.py:ImageCaptionDataset`` with
``cross_aug`` (their default): two SimCLR-style views of each image, drawn afresh at each load
(``trainers.augment.simclr_view``), and two EDA variants of each caption, made once at the start
(``caption_view: eda``; ``token-edit`` is ours, for a machine without WordNet). The in-modal loss
takes view 1 as the bank's queries and view 2 as the rows; CLIP's loss is the authors' crossed one,
``(CE(scale · image₁ · caption₂ᵀ) + CE(scale · caption₁ · image₂ᵀ)) / 2`` over rows; the split's
similarities are view 1's (a fresh image view and the first EDA caption,
``src/evaluate.py:get_all_similarity_distance``).

Not matched (``docs/sources/safeclip.md`` lists every difference): each of their phases after the
split has a scheduler of its own, here the trial's schedule runs through; their mixture's
``random_state`` is 0, here a stream of the seed; they embed both views in one forward pass of the
doubled batch (shared BatchNorm statistics), here two.

The last split is scored against the plan like a filter's keep-mask (``filter_removed`` = risky
pairs, ``filter_poison_recall``, ``filter_precision``), with the detection metrics of its posteriors.

``safeclip-mixed`` is ours, a named variant: ``inmodal_epochs`` (default 0) of CleanCLIP's
symmetric in-modal losses, ``clip_epochs`` (default 1) of CLIP's loss plus them, then before each
epoch the safe pairs are those in the higher-mean component and among the most similar
``safe_fraction`` (growing by ``safe_growth``); a batch mixes both, safe pairs trained with CLIP's
loss among themselves and risky ones with the in-modal losses, each term weighted by its share.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from poison import streams
from poison.defenses import (
    DEFENSES,
    DETECTION_METRICS,
    FILTER_METRICS,
    Defense,
    Stage,
    detection_metrics,
    filter_metrics,
)
from poison.manifest import Dataset
from trainers.augment import CaptionSource, CaptionView, augment_images, require_wordnet, simclr_view
from trainers.data import passes
from trainers.defenses.cleanclip import InModal
from trainers.distributed import Ranks
from trainers.objectives import Step, nearest_rows, ring_write


@DEFENSES.register("safeclip-mixed")
class SafeClipMixed(Defense):
    """Ours: safe and risky pairs in one batch (module docstring)."""

    kind: Literal["safeclip-mixed"] = "safeclip-mixed"
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

    def objective(self, seed: int) -> MixedSafeRisky:
        return MixedSafeRisky(self, seed)


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
    return top & (posterior_of_similar(x, seed) > 0.5)  # the mixture's prediction (all, when it is skipped)


class MixedSafeRisky(InModal):
    """In-modal losses only during warm-up; then CLIP's loss on the safe pairs of a batch and the
    in-modal losses on its risky ones, the split refitted before every epoch."""

    def __init__(self, config: SafeClipMixed, seed: int) -> None:
        super().__init__(clip_weight=1.0, inmodal_weight=1.0, symmetric=True,
                         captions=CaptionSource("token-edit", seed, token_drop=config.token_drop))
        self.config, self.seed = config, seed
        self.safe: np.ndarray | None = None  # per training row; None: every pair alike
        self.clip_all = False                # phase 2: CLIP's loss on every pair
        self.scores: dict[str, float] = {}   # the last split against the plan

    def start_epoch(self, epoch: int, pairs: Any) -> None:
        super().start_epoch(epoch, pairs)
        c = self.config
        split = epoch - c.inmodal_epochs - c.clip_epochs  # 1 at the first split
        self.clip_all, self.safe = c.inmodal_epochs < epoch <= c.inmodal_epochs + c.clip_epochs, None
        if split < 1:
            return
        images, texts = pairs.embed()
        similarity = (images * texts).sum(dim=1).cpu().numpy()
        fraction = min(1.0, c.safe_fraction + c.safe_growth * (split - 1))
        seed = int(streams.rng(self.seed, streams.SAFECLIP_EPOCH, epoch).integers(2**31))
        safe = safe_split(similarity, fraction, seed)
        scores = {**filter_metrics(safe, pairs.data.poisoned), **detection_metrics(-similarity, pairs.data.poisoned)}
        self.safe, self.scores = Ranks.current().share((safe, scores))  # data-parallel: rank 0's split

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
            text_views = step.model.encode_text(self.caption_views(step, step.rows[risky]), normalize=True)
            inmodal = (self.view_loss(images[~safe_t], image_views, scale)
                       + self.view_loss(texts[~safe_t], text_views, scale)) / 2
            loss = loss + risky.mean() * inmodal
        return loss


@DEFENSES.register("safeclip")
class SafeClip(Defense):
    """The authors' schedule (module docstring)."""

    kind: Literal["safeclip"] = "safeclip"
    inmodal_epochs: int = Field(5, ge=0)      # --inmodal_warmup
    clip_epochs: int = Field(1, ge=0)         # --multimodal_warmup
    memory_bank: int = Field(256, ge=1)       # --memory_bank_size, per modality
    first_posterior: float = Field(0.9, gt=0, lt=1)  # the first split's posterior threshold
    safe_step: float = Field(0.01, ge=0, le=1)       # --update_filter_ratio
    safe_cap: float = Field(0.85, gt=0, le=1)        # --cap_filter_ratio
    caption_view: CaptionView = "eda"                # the authors' / ours (module docstring)
    token_drop: float = Field(0.1, ge=0, lt=1)       # caption_view: token-edit
    # the CLIP warm-up epochs' constant learning rate, a share of train.lr: the authors' --filter_lr
    # 5e-6 against their 5e-4
    clip_lr_ratio: float = Field(0.01, gt=0, le=1)

    # the last split scored against the plan like a filter's keep-mask: filter_removed = risky
    # pairs, filter_poison_recall = poisoned pairs found risky, filter_precision = risky that are poison;
    # the detection metrics rank the pairs by their posterior of the lower-similarity component
    metric_names: ClassVar[tuple[str, ...]] = (*FILTER_METRICS[:3], *DETECTION_METRICS)
    stage: ClassVar[Stage] = "training"

    def check(self, dataset: Dataset, *, pretrained: bool) -> None:
        require_wordnet("defense.caption_view", self.caption_view)

    def objective(self, seed: int) -> SafeRisky:
        return SafeRisky(self, seed)


def posterior_of_similar(similarity: np.ndarray, seed: int) -> np.ndarray:
    """Each pair's posterior of the higher-mean component of a two-component Gaussian mixture
    fitted to the image–caption cosine ``similarity`` (scikit-learn; 1 for all when the pairs are
    too few or all alike), as ``src/samplers.py:fit_gmm_to_cos_sim``.

    Example:
        >>> posterior_of_similar(np.array([0.9, 0.85, 0.8, 0.1, 0.05, 0.88]), seed=0).round(3).tolist()
        [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    """
    x = np.asarray(similarity, np.float64).reshape(-1, 1)
    if len(x) < 4 or np.ptp(x) == 0:
        return np.ones(len(x))
    from sklearn.mixture import GaussianMixture  # here: sklearn is 1.6 s of every trial worker's start-up

    mixture = GaussianMixture(n_components=2, random_state=seed).fit(x)
    return mixture.predict_proba(x)[:, int(np.argmax(mixture.means_.ravel()))]


def split_by_posterior(posterior: np.ndarray, share: float | None, threshold: float) -> np.ndarray:
    """Safe pairs: the first split (``share`` None) those whose posterior is at least ``threshold``;
    a later one the top ``round(share · N)`` by posterior (ties by row order).

    Example:
        >>> p = np.array([0.95, 0.2, 0.91, 0.5, 0.99])
        >>> split_by_posterior(p, None, 0.9).tolist(), split_by_posterior(p, 0.4, 0.9).tolist()
        ([True, False, True, False, True], [True, False, False, False, True])
    """
    if share is None:
        return posterior >= threshold
    safe = np.zeros(len(posterior), bool)
    safe[np.argsort(-posterior, kind="stable")[: int(round(share * len(posterior)))]] = True
    return safe


class SafeRisky(InModal):
    """The authors' SafeCLIP objective: phases, splits, separate risky and safe passes, and the
    in-modal loss against a nearest-neighbour memory bank (module docstring)."""

    def __init__(self, config: SafeClip, seed: int) -> None:
        super().__init__(clip_weight=1.0, inmodal_weight=1.0, symmetric=False,
                         captions=CaptionSource(config.caption_view, seed, 0, config.token_drop))
        self.second = CaptionSource(config.caption_view, seed, 1, config.token_drop)  # each pair's caption view 2
        self.image_view = None  # the SimCLR-style transform, made at the first batch (its side)
        self.loaded: np.ndarray | None = None  # the batch's images as loaded (the loop trains on view 1)
        self.config, self.seed = config, seed
        self.safe: np.ndarray | None = None  # per training row, from the first split on
        self.share: float | None = None      # the safe share of the last split (None before the first)
        self.phase = "inmodal"               # inmodal | clip | split
        self.banks: dict[str, torch.Tensor] = {}  # per modality: (memory_bank, D) ring, oldest overwritten
        self.next_row: dict[str, int] = {}
        self.scores: dict[str, float] = {}   # the last split against the plan

    def start_epoch(self, epoch: int, pairs: Any) -> None:
        self.captions.bind(pairs.data)
        self.second.bind(pairs.data)
        c = self.config
        if epoch <= c.inmodal_epochs:
            self.phase = "inmodal"
            return
        if epoch <= c.inmodal_epochs + c.clip_epochs:
            self.phase = "clip"
            return
        self.phase = "split"
        images, texts = pairs.embed(inputs=self.first_view)
        similarity = (images * texts).sum(dim=1).cpu().numpy()
        seed = int(streams.rng(self.seed, streams.SAFECLIP_EPOCH, epoch).integers(2**31))
        posterior = posterior_of_similar(similarity, seed)
        if self.share is not None:
            self.share = min(self.share + c.safe_step, c.safe_cap)
        safe = split_by_posterior(posterior, self.share, c.first_posterior)
        share = float(safe.mean()) if self.share is None else self.share  # the first split: the data's share
        scores = {**filter_metrics(safe, pairs.data.poisoned), **detection_metrics(1.0 - posterior, pairs.data.poisoned)}
        # data-parallel: every rank trains rank 0's split (BatchNorm statistics differ between ranks)
        self.safe, self.share, self.scores = Ranks.current().share((safe, share, scores))

    def epoch_lr(self, epoch: int, lr: float) -> float | None:
        """The CLIP warm-up epochs at a constant ``clip_lr_ratio · train.lr`` (the authors' 5e-6)."""
        return lr * self.config.clip_lr_ratio if self.phase == "clip" else None

    def batches(self, epoch: int, data: Any, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """After a split: the risky pairs' full batches, then the safe pairs', as many in all as any
        epoch of the trial (``data.steps``: the schedule and the clean model's steps); the risky
        pass first takes the full batches its pairs make, the safe pairs the rest (another pass
        over them where they are few)."""
        if self.phase != "split":
            return data.epoch(batch_size, rng)
        steps = data.steps(batch_size)
        risky, safe = np.flatnonzero(~self.safe), np.flatnonzero(self.safe)
        n_risky = steps if len(safe) == 0 else min(max(len(risky) // batch_size, 1 if len(risky) else 0), steps)
        return [*passes(risky, n_risky, batch_size, rng), *passes(safe, steps - n_risky, batch_size, rng)]

    def metrics(self) -> dict[str, float]:
        return dict(self.scores)

    def first_view(self, rows: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """View 1 of ``rows``: a fresh SimCLR-style view of each image, the first EDA caption."""
        if self.image_view is None:
            self.image_view = simclr_view(images.shape[1])
        return augment_images(images, self.image_view), self.captions.tokens(rows)

    def inputs(self, rows: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """The loop trains on view 1; the images as loaded are kept for view 2."""
        self.loaded = images
        return self.first_view(rows, images)

    def second_view(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """View 2's normalised image and caption embeddings: another fresh image view, the second EDA caption."""
        images = step.to_input(augment_images(self.loaded, self.image_view))
        tokens = step.text_input(self.second.tokens(step.rows))
        return step.model.encode_image(images, normalize=True), step.model.encode_text(tokens, normalize=True)

    def loss(self, step: Step) -> torch.Tensor:
        out, scale = step.out, step.out["logit_scale"]
        image_2, text_2 = self.second_view(step)
        if self.phase == "clip" or self.phase == "split" and self.safe[step.rows].all():
            return self.crossed_loss(out["image_features"], out["text_features"], image_2, text_2, scale)
        return self.bank_loss(out["image_features"].detach(), out["text_features"].detach(), image_2, text_2, scale)

    @staticmethod
    def crossed_loss(image_1: torch.Tensor, text_1: torch.Tensor, image_2: torch.Tensor, text_2: torch.Tensor,
                     scale: torch.Tensor) -> torch.Tensor:
        """The authors' CLIP loss on views (``get_loss`` with ``cross_aug``): the cross-entropy over
        rows of ``scale · image₁ · caption₂ᵀ`` and of ``scale · caption₁ · image₂ᵀ``, averaged."""
        target = torch.arange(len(image_1), device=image_1.device)
        return (torch.nn.functional.cross_entropy(scale * image_1 @ text_2.T, target)
                + torch.nn.functional.cross_entropy(scale * text_1 @ image_2.T, target)) / 2

    def bank_loss(self, image_1: torch.Tensor, text_1: torch.Tensor, image_2: torch.Tensor, text_2: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
        """The in-modal loss against the memory banks: per modality, the cross-entropy of
        ``scale · view2 · NN(view1)ᵀ`` over rows, then view 1 enqueued."""
        losses = []
        for name, first, second in (("image", image_1, image_2), ("text", text_1, text_2)):
            neighbours = self.nearest(name, first.float())
            logits = scale * second @ neighbours.to(second.dtype).T
            losses.append(torch.nn.functional.cross_entropy(logits, torch.arange(len(second), device=second.device)))
            self.enqueue(name, first.float())
        return (losses[0] + losses[1]) / 2

    def nearest(self, name: str, queries: torch.Tensor) -> torch.Tensor:
        """Each query's nearest bank row by cosine, returned raw (the bank as it was before this batch)."""
        if name not in self.banks:
            index = 0 if name == "image" else 1
            rows = streams.rng(self.seed, streams.SAFECLIP_BANK, index).standard_normal(
                (self.config.memory_bank, queries.shape[1]))
            self.banks[name] = torch.as_tensor(rows, dtype=torch.float32, device=queries.device)
            self.next_row[name] = 0
        self.banks[name] = self.banks[name].to(queries.device)
        return nearest_rows(self.banks[name], queries)

    def enqueue(self, name: str, rows: torch.Tensor) -> None:
        """``rows`` over the bank's oldest entries, wrapping around."""
        self.next_row[name] = ring_write(self.banks[name], self.next_row[name], rows)

    def state_dict(self) -> dict[str, Any]:
        return {"banks": {k: v.cpu() for k, v in self.banks.items()}, "next_row": dict(self.next_row),
                "share": self.share, "scores": dict(self.scores)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.banks, self.next_row = dict(state.get("banks", {})), dict(state.get("next_row", {}))
        self.share, self.scores = state.get("share"), dict(state.get("scores", {}))
