"""Defenses, registered by name (``defense.kind``).

A defense is a frozen config with optional hooks on the one training loop of
trainers/ (each defaults to doing nothing, so a defense implements only its own):

1. ``check(dataset, pretrained=...)``: rejects what cannot work on this dataset
   (more trusted pairs than it has) before any training, naming the key;
2. ``keep_mask(pairs, seed)``: before training, which rows of the poisoned training
   set to train on. Data-side filters score the rows on a clean reference model's
   embeddings, asked of :class:`TrainingPairs`, so they need no torch and live here;
3. ``objective(seed)``: during training, the loss the loop minimises instead of CLIP's
   (RoCLIP's nearest-caption matching), a ``trainers.objectives.Objective``;
4. ``after_training(session)``: changes the trained model (clean fine-tuning, CleanCLIP).
   Defenses with hooks 3 or 4 need torch, so they live in ``trainers.defenses``, registered here.

``stage`` tells the trainer when a defense acts. Under ``none`` and ``post`` the
model is trained exactly as without a defense, so one poisoned checkpoint serves
every such trial of an attack ("attack once, evaluate many defenses").
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from poison.config import ConfigError, Section, make_registered
from poison.manifest import Dataset
from poison.registry import Registry

DEFENSES: Registry = Registry("defense")

#: The seed's stream of a defense's own random choices (isolation forests, ...).
#: What every data-side filter reports, scored against the poison plan.
FILTER_METRICS = ("filter_removed", "filter_poison_recall", "filter_precision", "defense_seconds")

Stage = Literal["none", "data", "training", "post"]


class TrainingPairs(Protocol):
    """What a data-side defense may ask of the poisoned training set (trainers/ implements it)."""

    def __len__(self) -> int:
        """Rows of the poisoned training set: clean pairs, then the plan's pairs."""

    def reference_embeddings(self, *, trusted_pairs: int | None) -> tuple[np.ndarray, np.ndarray]:
        """L2-normalised (N, D) image and caption embeddings of every row, triggers stamped,
        under a clean reference model: ``model.pretrained`` when the trial has one, else a
        model trained once on ``trusted_pairs`` trusted pairs (None: as many as ``data.size``)."""


class Defense(Section):
    """Base of defenses; the default is no defense."""

    kind: str

    #: The metrics it adds to a trial (objectives a sweep may use).
    metric_names: ClassVar[tuple[str, ...]] = ()
    #: When it acts: ``data`` (a keep-mask), ``training`` (inside the loop), ``post`` (after
    #: it) or ``none``. The default is the cautious one: a trained model of its own.
    stage: ClassVar[Stage] = "training"

    @property
    def extra_epochs(self) -> int:
        """Epochs it reports after the trial's own (``train.epochs``), e.g. fine-tuning."""
        return 0

    def check(self, dataset: Dataset, *, pretrained: bool) -> None:
        """Raises ConfigError (naming the key) when the defense cannot run on ``dataset``;
        ``pretrained``: whether ``model.pretrained`` is given (it is then the reference model)."""

    def keep_mask(self, pairs: TrainingPairs, seed: int) -> np.ndarray | None:
        """Before training: a boolean keep-mask over the rows of ``pairs`` (None: keep all)."""
        return None

    def objective(self, seed: int) -> Any | None:
        """During training: the ``trainers.objectives.Objective`` the loop minimises (None: CLIP's loss)."""
        return None

    def after_training(self, session: Any) -> dict[str, float] | None:
        """After training: changes the model through ``session`` (a ``trainers.defenses.PostTraining``)
        and returns its own metrics, or None when it did nothing."""
        return None


@DEFENSES.register("none")
class NoDefense(Defense):
    """No defense."""

    kind: Literal["none"] = "none"
    stage: ClassVar[Stage] = "none"


def filter_metrics(keep: np.ndarray, poisoned: np.ndarray) -> dict[str, float]:
    """A keep-mask scored against the plan's ground truth (``poisoned``: rows the attack added or altered).

    ``filter_poison_recall`` is NaN without poison, ``filter_precision`` NaN when nothing is removed.

    Example:
        >>> filter_metrics(np.array([False, True, False, True]), np.array([True, True, False, False]))
        {'filter_removed': 2.0, 'filter_poison_recall': 0.5, 'filter_precision': 0.5}
    """
    removed, poisoned = ~np.asarray(keep, bool), np.asarray(poisoned, bool)
    hits, n_removed, n_poison = int((removed & poisoned).sum()), int(removed.sum()), int(poisoned.sum())
    return {"filter_removed": float(n_removed),
            "filter_poison_recall": hits / n_poison if n_poison else math.nan,
            "filter_precision": hits / n_removed if n_removed else math.nan}


def check_trusted(dataset: Dataset, pairs: int, key: str) -> None:
    """Raises ConfigError naming ``key`` when ``dataset`` has fewer than ``pairs`` trusted pairs."""
    capacity = dataset.trusted_capacity
    if capacity == 0:
        raise ConfigError(f"{key}: {dataset.name} has no trusted pairs beside the {dataset.num_train:,} "
                          f"training pairs of data.size")
    if capacity is not None and pairs > capacity:
        raise ConfigError(f"{key}: {pairs:,} trusted pairs do not fit: {dataset.name} has {capacity:,} "
                          f"training pairs outside the {dataset.num_train:,} of data.size")


def make_defense(data: object, path: str = "defense") -> Defense:
    """Validates a defense mapping into its registered class (absent: no defense)."""
    return make_registered(DEFENSES, data, path, default="none")


from poison.defenses import filters, outliers  # noqa: E402,F401  (registration on import)

__all__ = ["DEFENSES", "Defense", "FILTER_METRICS", "NoDefense", "TrainingPairs",
           "check_trusted", "filter_metrics", "make_defense"]
