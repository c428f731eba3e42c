"""What the trial hands a defense's hooks (``poison.defenses.Defense``): the poisoned training
set with reference embeddings on demand (before training), and the trained model with the
trial's own loop (after training). A defense sees these, never the loop's internals.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from poison import DataError, Dataset, load_dataset, make_attack, streams
from poison.attacks import empty_plan
from poison.config import ConfigError
from trainers.cache import TrainedModel
from trainers.config import TrialConfig
from trainers.data import TrainingSet
from trainers.evaluate import Evaluator, evaluate_trial
from trainers.loop import EpochCallback, autocast_for, fit
from trainers.objectives import Objective

EMBED_CHUNK = 4096  # rows stamped and embedded at a time


def trusted_dataset(config: TrialConfig, pairs: int, key: str, cache_dir: str | None) -> Dataset:
    """``pairs`` trusted training pairs of the trial's dataset, disjoint from its training pairs
    (``DataSpec.trusted``); a ConfigError names ``key`` when the dataset has too few."""
    try:
        return load_dataset(config.data_spec(cache_dir, trusted=pairs))
    except DataError as err:
        raise ConfigError(f"{key}: {err}") from None


class ReferencePairs:
    """The :class:`poison.defenses.TrainingPairs` of a trial: its poisoned training set, embedded
    on demand by the reference model ``reference(trusted_pairs)`` returns."""

    def __init__(self, data: TrainingSet, reference: Callable[[int | None], Evaluator]) -> None:
        self.data, self.reference = data, reference

    def __len__(self) -> int:
        return len(self.data)

    def reference_embeddings(self, *, trusted_pairs: int | None) -> tuple[np.ndarray, np.ndarray]:
        model = self.reference(trusted_pairs)
        rows = np.arange(len(self.data))
        images = np.concatenate([model.embed_images(self.data.images(rows[s : s + EMBED_CHUNK]))
                                 for s in range(0, len(rows), EMBED_CHUNK)])
        texts = model.embed_tokens(self.data.tokens)[self.data.caption]  # the training set's own ids: no re-tokenizing
        return images, texts


class PostTraining:
    """What a post-training defense (``Defense.after_training``) may do: read the trial's config,
    data and trained model, draw trusted pairs, and train the model further with the trial's
    own loop; ``metrics`` is the latest evaluation."""

    def __init__(self, config: TrialConfig, dataset: Dataset, model: TrainedModel, *, cache_dir: str | None,
                 on_epoch: EpochCallback | None) -> None:
        self.config, self.dataset, self.cache_dir, self.on_epoch = config, dataset, cache_dir, on_epoch
        self.built = model.build(config)  # a copy: the trained (maybe cached) weights stay as they are
        self.metrics = dict(model.metrics)
        self.epochs_done = config.train.epochs
        self._evaluator = Evaluator(self.built, dataset, autocast=autocast_for(config, self.built.mean.device))

    def trusted(self, pairs: int, key: str) -> Dataset:
        """``pairs`` clean pairs disjoint from the trial's training pairs (errors name ``key``)."""
        return trusted_dataset(self.config, pairs, key, self.cache_dir)

    def fit(self, data: Dataset, *, epochs: int, lr: float, objective: Objective | None = None) -> dict[str, float]:
        """Trains the model on ``data``'s training pairs with the trial's recipe but ``epochs`` and
        ``lr`` (minimising ``objective``, default CLIP's loss), evaluating on the trial's test split
        after each epoch (reported as the epochs after the trial's own); returns the last evaluation.

        torch's random state is seeded from the trial's seed first, so an objective's random
        augmentations are the same whether the trained model was just trained or loaded."""
        recipe = self.config.train.model_copy(update={"epochs": epochs, "lr": lr})
        pairs = TrainingSet(data, make_attack(None), empty_plan(), self.built.tokenize,
                            token_cache=Path(self.cache_dir) / "tokens" if self.cache_dir else None)
        rng = streams.rng(self.config.seed, streams.DEFENSE_BATCHES, self.epochs_done)
        torch.manual_seed(int(streams.rng(self.config.seed, streams.DEFENSE_TORCH, self.epochs_done).integers(2**62)))
        fitted = fit(self.built, pairs, self.config, recipe=recipe, rng=rng, on_epoch=self.on_epoch,
                     evaluate=lambda: evaluate_trial(self._evaluator, self.config.attack, self.dataset, self.config.seed),
                     first_epoch=self.epochs_done + 1, objective=objective)
        self.epochs_done += epochs
        self.metrics = fitted.last
        return fitted.last


__all__ = ["PostTraining", "ReferencePairs", "trusted_dataset"]
