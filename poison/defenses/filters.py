"""Data-side filters: score every training pair on a clean reference model's embeddings,
drop the most suspicious before training.

``similarity-filter`` (Yang et al. 2023): a poisoned pair joins an image and a caption
that a clean CLIP finds unrelated (a triggered dog captioned as a banana), so its
image–caption cosine distance is high. Pairs above ``threshold`` are dropped, or the
highest-distance ``fraction`` (default 0.1).
"""
from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from poison.defenses._base import DEFENSES, FILTER_METRICS, Defense, Selection, Stage, TrainingPairs, check_trusted
from poison.manifest import Dataset


class EmbeddingFilter(Defense):
    """Base of filters: ``scores`` each pair (higher: more suspicious), drops the top ``fraction``."""

    fraction: float = Field(0.1, gt=0, lt=1)
    # trusted pairs the offline reference model trains on (None: as many as data.size);
    # unused when model.pretrained gives the reference model
    reference_pairs: int | None = Field(None, ge=1)

    metric_names: ClassVar[tuple[str, ...]] = FILTER_METRICS
    stage: ClassVar[Stage] = "data"

    def check(self, dataset: Dataset, *, pretrained: bool) -> None:
        if not pretrained:
            check_trusted(dataset, self.reference_pairs or dataset.num_train, "defense.reference_pairs")

    def scores(self, image: np.ndarray, text: np.ndarray, seed: int) -> np.ndarray:
        """One suspicion score per pair from its (N, D) reference embeddings."""
        raise NotImplementedError

    def keep(self, scores: np.ndarray) -> np.ndarray:
        """The keep-mask the scores give: the highest ``fraction`` dropped."""
        return drop_highest(scores, self.fraction)

    def select(self, pairs: TrainingPairs, seed: int) -> Selection:
        image, text = pairs.reference_embeddings(trusted_pairs=self.reference_pairs)
        scores = self.scores(image, text, seed)
        return Selection(self.keep(scores), scores)

    def keep_mask(self, pairs: TrainingPairs, seed: int) -> np.ndarray:
        return self.select(pairs, seed).keep


@DEFENSES.register("similarity-filter")
class SimilarityFilter(EmbeddingFilter):
    kind: Literal["similarity-filter"] = "similarity-filter"
    # drop pairs whose image-caption cosine distance (1 - cosine, in [0, 2]) is above it;
    # instead of the top fraction
    threshold: float | None = Field(None, ge=0, le=2)

    @model_validator(mode="after")
    def _one_rule(self) -> SimilarityFilter:
        if self.threshold is not None and "fraction" in self.model_fields_set:
            raise ValueError(f"threshold: give threshold or fraction, not both "
                             f"(got threshold={self.threshold}, fraction={self.fraction})")
        return self

    def scores(self, image: np.ndarray, text: np.ndarray, seed: int) -> np.ndarray:
        return cosine_distance(image, text)

    def keep(self, scores: np.ndarray) -> np.ndarray:
        return super().keep(scores) if self.threshold is None else scores <= self.threshold


def cosine_distance(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """1 − cosine similarity of each L2-normalised image–caption pair, in [0, 2].

    Example:
        >>> cosine_distance(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[1.0, 0.0], [1.0, 0.0]]))
        array([0., 1.])
    """
    return 1.0 - np.sum(np.asarray(image, np.float64) * np.asarray(text, np.float64), axis=1)


def drop_highest(scores: np.ndarray, fraction: float) -> np.ndarray:
    """A keep-mask dropping the round(fraction × N) highest scores (ties: the earlier row first).

    Example:
        >>> drop_highest(np.array([0.1, 0.9, 0.5, 0.9]), 0.5)
        array([ True, False,  True, False])
    """
    scores = np.asarray(scores, np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))  # highest first, then by row
    keep = np.ones(len(scores), bool)
    keep[order[: round(fraction * len(scores))]] = False
    return keep


__all__ = ["EmbeddingFilter", "SimilarityFilter", "cosine_distance", "drop_highest"]
