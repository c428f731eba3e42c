"""Utility metrics on embeddings: zero-shot classification and retrieval.

All functions take L2-normalised embeddings as numpy arrays, so they are
checked on small hand-built cases. Ranks are 1-based; ties count in the
query's favour (rank = 1 + the number of candidates scoring strictly higher).
"""
from __future__ import annotations

import numpy as np


def class_embeddings(per_template: np.ndarray) -> np.ndarray:
    """(classes, templates, dim) normalised text embeddings → (classes, dim).

    Templates are averaged, then the mean is normalised again (CLIP's recipe).
    """
    mean = per_template.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def zeroshot_predict(image_emb: np.ndarray, class_emb: np.ndarray, k: int = 1) -> np.ndarray:
    """Top-k class indices per image, best first: shape (n, k)."""
    scores = image_emb @ class_emb.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def zeroshot_accuracy(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray,
                      ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy for each k (capped at the number of classes)."""
    top = zeroshot_predict(image_emb, class_emb, k=min(max(ks), class_emb.shape[0]))
    hits = top == np.asarray(labels)[:, None]
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def correct_ranks(scores: np.ndarray) -> np.ndarray:
    """For square ``scores`` (query i's correct candidate is i): the 1-based rank of it."""
    correct = np.diag(scores)
    return 1 + (scores > correct[:, None]).sum(axis=1)


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray,
                     ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k of pair i's partner, image→text (``i2t_rk``) and text→image (``t2i_rk``)."""
    scores = image_emb @ text_emb.T
    i2t, t2i = correct_ranks(scores), correct_ranks(scores.T)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t <= k).mean())
        out[f"t2i_r{k}"] = float((t2i <= k).mean())
    return out
