"""Evaluation of a trained model: utility metrics and a classifier for attacks."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from poison import Attack, Dataset
from trainers.data import to_tensor
from trainers.metrics import class_embeddings, retrieval_recall, zeroshot_accuracy, zeroshot_predict
from trainers.models import Built


class Evaluator:
    """Encodes with a model in eval mode (the caller restores train mode); the
    :class:`poison.attacks.ModelView` that attacks evaluate through."""

    def __init__(self, built: Built, dataset: Dataset, *, batch_size: int = 512,
                 autocast: contextlib.AbstractContextManager | None = None) -> None:
        self.built, self.dataset, self.batch_size = built, dataset, batch_size
        self._autocast = autocast

    def _ctx(self) -> contextlib.AbstractContextManager:
        return self._autocast if self._autocast is not None else contextlib.nullcontext()

    @torch.no_grad()
    def images(self, images: np.ndarray) -> np.ndarray:
        model = self.built.model.eval()
        out = []
        for s in range(0, len(images), self.batch_size):
            x = to_tensor(np.ascontiguousarray(images[s : s + self.batch_size]), self.built.mean, self.built.std)
            with self._ctx():
                out.append(model.encode_image(x, normalize=True).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 1), np.float32)

    @torch.no_grad()
    def texts(self, captions: list[str]) -> np.ndarray:
        model = self.built.model.eval()
        out = []
        for s in range(0, len(captions), self.batch_size):
            tokens = self.built.text_input(self.built.tokenize(captions[s : s + self.batch_size]))
            with self._ctx():
                out.append(model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out).numpy()

    @torch.no_grad()
    def embed_tokens(self, tokens) -> np.ndarray:
        """L2-normalised embeddings of every row of ``tokens`` (a ``trainers.data.TokenTable`` or a
        tensor of token ids), in batches: captions already tokenized, not tokenized again."""
        model = self.built.model.eval()
        out = []
        for s in range(0, len(tokens), self.batch_size):
            batch = tokens[np.arange(s, min(s + self.batch_size, len(tokens)))]
            with self._ctx():
                out.append(model.encode_text(self.built.text_input(batch), normalize=True).float().cpu())
        return torch.cat(out).numpy()

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        return self.images(images)

    def embed_texts(self, captions: list[str]) -> np.ndarray:
        return self.texts(captions)

    def class_embeddings(self) -> np.ndarray:
        """Prompt embeddings per class (templates averaged); recomputed each call
        because the model keeps training between evaluations."""
        names, templates = self.dataset.classnames, self.dataset.templates
        prompts = [t.format(c) for c in names for t in templates]
        return class_embeddings(self.texts(prompts).reshape(len(names), len(templates), -1))

    def classify(self, images: np.ndarray) -> np.ndarray:
        """Zero-shot top-1 class index of each uint8 image."""
        return zeroshot_predict(self.images(images), self.class_embeddings(), k=1)[:, 0]

    def class_scores(self, images: np.ndarray) -> np.ndarray:
        """Each uint8 image's cosine similarity to each class's prompt embedding (``classify``'s
        scores: :class:`poison.attacks.ScoresClasses`)."""
        return self.images(images) @ self.class_embeddings().T

    def utility(self) -> dict[str, float]:
        """Zero-shot top-1/5 on the clean test split and retrieval R@1/5/10 both ways.

        ``utility`` is zero-shot top-1 where the dataset has classes (over the test images with a
        class: a ``data.classes`` caption may name none), else mean R@5.
        """
        test = self.dataset.split("test")
        img = self.images(self.dataset.images[test["image"].to_numpy()])
        out = retrieval_recall(img, self.texts(test["caption"].to_pylist()))
        labels = test["label"].to_numpy()
        known = labels >= 0
        if self.dataset.classnames and known.any():
            acc = zeroshot_accuracy(img[known], self.class_embeddings(), labels[known], ks=(1, 5))
            out.update(zeroshot_top1=acc[1], zeroshot_top5=acc[5], utility=acc[1])
        else:
            out["utility"] = (out["i2t_r5"] + out["t2i_r5"]) / 2
        return out


def evaluate_trial(evaluator: Evaluator, attack: Attack, dataset: Dataset, seed: int) -> dict[str, float]:
    """A trial's evaluation after an epoch: utility, then the attack's own metrics."""
    return {**evaluator.utility(), **attack.evaluate(dataset, evaluator, seed)}
