"""Retrieval metrics of poisoning attacks: MinRank and Hit@K (DESIGN.md, pinned).

For each query (a caption), ``min_rank`` is the 1-based rank of the best-ranked
target (the single target image, or any image of the target class) among the
whole gallery of test images; ``hit_at_k`` is the fraction of queries whose
min_rank is at most k. Ties count in the query's favour (rank = 1 + the number of
gallery items scoring strictly higher than the best target), as in
``trainers.metrics.correct_ranks``.

Mapping to mm_poison (Yang et al. 2023, ``get_avg_min_rank_and_hit``): their
rank is the 0-based position in an argsort, and ``hit_k`` counts ``rank < k``;
so ``ours = theirs + 1`` (up to ties, which argsort breaks arbitrarily) and the
Hit@K values are the same. Their ``avg_min_rank`` is our ``min_rank_mean - 1``.
"""
from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def min_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of the best-scoring target of each query.

    ``scores`` is (queries, gallery); ``targets`` a boolean mask over the gallery
    (shared by all queries) or a (queries, gallery) mask.

    Example:
        >>> scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
        >>> min_ranks(scores, np.array([False, True, True])).tolist()
        [2, 1]
    """
    scores = np.asarray(scores, dtype=np.float64)
    mask = np.broadcast_to(np.asarray(targets, dtype=bool), scores.shape)
    if not mask.any(axis=1).all():
        raise ValueError("every query needs at least one target in the gallery")
    best = np.where(mask, scores, -np.inf).max(axis=1)
    return 1 + (scores > best[:, None]).sum(axis=1)


def ranks_by_embedding(queries: np.ndarray, gallery: np.ndarray, targets: np.ndarray,
                       block: int = 1024) -> np.ndarray:
    """:func:`min_ranks` of normalised query embeddings against a gallery (cosine
    scores), computed ``block`` queries at a time so that 10,000 x 10,000 never
    sits in memory at once. ``targets`` is a mask over the gallery."""
    out = [min_ranks(queries[s : s + block] @ gallery.T, targets) for s in range(0, len(queries), block)]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def hit_metrics(ranks: np.ndarray, prefix: str = "", ks: tuple[int, ...] = KS) -> dict[str, float]:
    """``{prefix}hit_at_k`` for each k, ``{prefix}min_rank_mean`` and ``_median``.

    Example:
        >>> hit_metrics(np.array([1, 3, 12, 7]))
        {'hit_at_1': 0.25, 'hit_at_5': 0.5, 'hit_at_10': 0.75, 'min_rank_mean': 5.75, 'min_rank_median': 5.0}
    """
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        nan = float("nan")
        return {**{f"{prefix}hit_at_{k}": nan for k in ks}, f"{prefix}min_rank_mean": nan,
                f"{prefix}min_rank_median": nan}
    out = {f"{prefix}hit_at_{k}": float(np.mean(ranks <= k)) for k in ks}
    out[f"{prefix}min_rank_mean"] = float(np.mean(ranks))
    out[f"{prefix}min_rank_median"] = float(np.median(ranks))
    return out


def metric_names(prefix: str = "", ks: tuple[int, ...] = KS) -> tuple[str, ...]:
    return (*(f"{prefix}hit_at_{k}" for k in ks), f"{prefix}min_rank_mean", f"{prefix}min_rank_median")


__all__ = ["KS", "hit_metrics", "metric_names", "min_ranks", "ranks_by_embedding"]
