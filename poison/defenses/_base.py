"""The base of ``poison.defenses``: what every plug-in imports (the package's ``__init__`` imports the plug-ins, which register themselves)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from poison.config import ConfigError, Section, make_registered
from poison.manifest import Dataset
from poison.registry import Registry

DEFENSES: Registry = Registry("defense")

#: How well a defense's per-pair scores separate poisoned from clean pairs, whatever it then drops.
DETECTION_METRICS = ("filter_auroc", "filter_pr_auc", "filter_fpr_at_95")
#: What every data-side filter reports, scored against the poison plan.
FILTER_METRICS = ("filter_removed", "filter_poison_recall", "filter_precision", *DETECTION_METRICS,
                  "defense_seconds")

Stage = Literal["none", "data", "training", "post"]


class TrainingPairs(Protocol):
    """What a data-side defense may ask of the poisoned training set (trainers/ implements it)."""

    def __len__(self) -> int:
        """Rows of the poisoned training set: clean pairs, then the plan's pairs."""

    def reference_embeddings(self, *, trusted_pairs: int | None) -> tuple[np.ndarray, np.ndarray]:
        """L2-normalised (N, D) image and caption embeddings of every row, triggers stamped,
        under a clean reference model: ``model.pretrained`` when the trial has one, else a
        model trained once on ``trusted_pairs`` trusted pairs (None: as many as ``data.size``)."""


class PostTrainingSession(Protocol):
    """What a post-training defense (``after_training``) may ask of the trial
    (``trainers.hooks.PostTraining`` implements it)."""

    config: Any  # the trial's resolved config (a ``trainers.config.TrialConfig``)
    metrics: dict[str, float]  # the latest evaluation of the model

    def trusted(self, pairs: int, key: str) -> Dataset:
        """``pairs`` clean pairs disjoint from the trial's training pairs (errors name ``key``)."""

    def fit(self, data: Dataset, *, epochs: int, lr: float, objective: Any | None = None) -> dict[str, float]:
        """Trains the model further on ``data`` with the trial's loop and recipe (``epochs``, ``lr``,
        ``objective``: a ``trainers.objectives.Objective``, default CLIP's loss); returns the last
        evaluation."""


@dataclass(frozen=True)
class Selection:
    """What a data-side defense decided: the rows to keep, and each row's suspicion score
    (higher: more suspicious) when it scores pairs."""

    keep: np.ndarray
    scores: np.ndarray | None = None


class Defense(Section):
    """Base of defenses: a frozen config with optional hooks on the one training loop of
    trainers/, each doing nothing by default, so a defense implements only its own.

    Lifecycle, in a trial's order:

    1. ``check(dataset, pretrained=...)``: before any training, rejects what cannot work on
       this dataset (more trusted pairs than it has), naming the key;
    2. ``select(pairs, seed)`` / ``keep_mask(pairs, seed)``: before training, the rows of the
       poisoned training set to train on (a data-side filter, ``stage = "data"``);
    3. ``objective(seed)``: during training, the loss the loop minimises instead of CLIP's
       (``stage = "training"``);
    4. ``after_training(session)``: after training, changes the model through a
       :class:`PostTrainingSession` (``stage = "post"``).

    ``metric_names`` are the metrics it adds; ``extra_epochs`` the epochs it reports after the
    trial's own.
    """

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

    def select(self, pairs: TrainingPairs, seed: int) -> Selection | None:
        """``keep_mask`` with the scores behind it; a defense that scores pairs overrides this
        (and its ``keep_mask`` returns ``select(...).keep``)."""
        keep = self.keep_mask(pairs, seed)
        return None if keep is None else Selection(np.asarray(keep, bool))

    def objective(self, seed: int) -> Any | None:
        """During training: the ``trainers.objectives.Objective`` the loop minimises (None: CLIP's loss)."""
        return None

    def after_training(self, session: PostTrainingSession) -> dict[str, float] | None:
        """After training: changes the model through ``session`` and returns its own metrics,
        or None when it did nothing."""
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


def detection_metrics(scores: np.ndarray, poisoned: np.ndarray) -> dict[str, float]:
    """How well suspicion ``scores`` (higher: more suspicious) rank the plan's ``poisoned`` rows
    above the clean ones, whatever threshold a defense then applies (scikit-learn's metrics):

    - ``filter_auroc``: area under the ROC curve (the chance that a poisoned row outscores a
      clean one, ties counted half);
    - ``filter_pr_auc``: area under the precision-recall curve as average precision (precision
      at each poisoned row's rank, averaged over the poisoned rows);
    - ``filter_fpr_at_95``: the share of clean rows scored at or above the highest threshold that
      still catches 95% of the poisoned rows.

    All NaN when the rows are all poisoned or all clean.

    Example (two poisoned rows, ranked 1st and 3rd of five):
        >>> m = detection_metrics(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 0], bool))
        >>> {k: round(v, 4) for k, v in m.items()}
        {'filter_auroc': 0.8333, 'filter_pr_auc': 0.8333, 'filter_fpr_at_95': 0.3333}
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores, poisoned = np.asarray(scores, np.float64), np.asarray(poisoned, bool)
    if poisoned.all() or not poisoned.any():
        return dict.fromkeys(DETECTION_METRICS, math.nan)
    fpr, tpr, _ = roc_curve(poisoned, scores, drop_intermediate=False)  # every threshold: ties matter
    return {"filter_auroc": float(roc_auc_score(poisoned, scores)),
            "filter_pr_auc": float(average_precision_score(poisoned, scores)),
            "filter_fpr_at_95": float(fpr[np.argmax(tpr >= 0.95)])}


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


__all__ = ["check_trusted", "Defense", "DEFENSES", "detection_metrics", "DETECTION_METRICS", "filter_metrics", "FILTER_METRICS", "make_defense", "NoDefense", "PostTrainingSession", "Selection", "Stage", "TrainingPairs"]
