"""``outlier-filter``: embedding-space outlier scores, the top ``fraction`` dropped.

Under a clean reference model neither half of a poisoned pair is unusual on its own
(a triggered dog still looks like a dog, "a photo of a banana" is an ordinary caption);
the pair is. So a pair is scored as one point: by default ``difference`` (image −
caption: clean pairs differ by the modality gap plus a little, a dog-banana pair by a
direction no clean pair has) or ``joint`` (``[image; caption] / √2``, far from clean
pairs of its image's class and of its caption's class alike); ``image`` and ``text``
score one modality. The poisoned pairs of one source class sit together, so ``k``
must exceed their number (the default 64 did on the built-in sets; 16 did not).

Scores (higher: more of an outlier), over Euclidean distances between those points:
``k-distance`` (distance to the k-th nearest other pair), ``lid`` (local intrinsic
dimensionality, the maximum-likelihood estimate of Levina & Bickel over the k nearest:
−1 / mean log(r_i / r_k), Amsaleg et al. 2015) and ``isolation-forest`` (scikit-learn's
``IsolationForest``, ``trees`` trees, seeded by the trial's seed).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from poison import streams
from poison.config import ConfigError
from poison.defenses._base import DEFENSES
from poison.defenses.filters import EmbeddingFilter


@DEFENSES.register("outlier-filter")
class OutlierFilter(EmbeddingFilter):
    kind: Literal["outlier-filter"] = "outlier-filter"
    score: Literal["k-distance", "lid", "isolation-forest"] = "k-distance"
    embedding: Literal["difference", "joint", "image", "text"] = "difference"
    k: int = Field(64, ge=1)         # neighbours of k-distance and lid
    trees: int = Field(100, ge=1)    # isolation-forest

    @model_validator(mode="after")
    def _lid_needs_two(self) -> OutlierFilter:
        if self.score == "lid" and self.k < 2:
            raise ValueError(f"k: lid needs at least 2 neighbours, got k={self.k}")
        return self

    def scores(self, image: np.ndarray, text: np.ndarray, seed: int) -> np.ndarray:
        points = pair_points(image, text, self.embedding)
        if self.score == "isolation-forest":
            return isolation_scores(points, trees=self.trees, seed=seed)
        if self.k >= len(points):
            raise ConfigError(f"defense.k: {self.k} neighbours need more than {self.k} training pairs, "
                              f"got {len(points)}")
        distances = neighbour_distances(points, self.k)
        return distances[:, -1] if self.score == "k-distance" else lid_mle(distances)


def pair_points(image: np.ndarray, text: np.ndarray, embedding: str) -> np.ndarray:
    """The point of each pair in the space ``embedding`` names."""
    image, text = np.asarray(image, np.float32), np.asarray(text, np.float32)
    if embedding == "joint":
        return np.concatenate([image, text], axis=1) / np.sqrt(2.0)
    if embedding == "difference":
        return image - text
    return image if embedding == "image" else text


def neighbour_distances(points: np.ndarray, k: int) -> np.ndarray:
    """(N, k) Euclidean distances of each point to its k nearest other points, ascending."""
    from sklearn.neighbors import NearestNeighbors

    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    return distances[:, 1:]  # column 0 is the point itself (or an exact duplicate: the same 0)


def lid_mle(distances: np.ndarray) -> np.ndarray:
    """Local intrinsic dimensionality from (N, k) ascending neighbour distances.

    Example:
        >>> lid_mle(np.array([[1.0, 2.0], [1.0, 1.0]])).round(3)  # second row: all equally near
        array([2.885,   inf])
    """
    r = np.maximum(np.asarray(distances, np.float64), 1e-12)
    mean_log = np.mean(np.log(r / r[:, -1:]), axis=1)  # ≤ 0; 0 when every neighbour is as near
    return np.where(mean_log < 0, -1.0 / np.minimum(mean_log, -1e-300), np.inf)


def isolation_scores(points: np.ndarray, *, trees: int, seed: int) -> np.ndarray:
    """Anomaly scores of an isolation forest fitted on the points themselves (higher: more isolated)."""
    from sklearn.ensemble import IsolationForest

    state = int(streams.rng(seed, streams.OUTLIER_FILTER).integers(2**31 - 1))
    forest = IsolationForest(n_estimators=trees, random_state=state).fit(points)
    return -forest.score_samples(points)


__all__ = ["OutlierFilter", "isolation_scores", "lid_mle", "neighbour_distances", "pair_points"]
