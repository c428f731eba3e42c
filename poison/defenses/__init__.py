"""Defenses, registered by name (``defense.kind``).

A defense is a frozen config with optional hooks on the one training loop of
trainers/ (each defaults to doing nothing, so a defense implements only its own):

1. ``check(dataset, pretrained=...)``: rejects what cannot work on this dataset
   (more trusted pairs than it has) before any training, naming the key;
2. ``keep_mask(pairs, seed)``: before training, which rows of the poisoned training
   set to train on. Data-side filters score the rows on a clean reference model's
   embeddings, asked of :class:`TrainingPairs`, so they need no torch and live here;
   one that scores pairs also returns the scores through ``select`` (a :class:`Selection`),
   and the trial logs how well they detect the poison (:func:`detection_metrics`);
3. ``objective(seed)``: during training, the loss the loop minimises instead of CLIP's
   (RoCLIP's nearest-caption matching), a ``trainers.objectives.Objective``;
4. ``after_training(session)``: changes the trained model (clean fine-tuning, CleanCLIP).
   Defenses with hooks 3 or 4 need torch, so they live in ``trainers.defenses``, registered here.

``stage`` tells the trainer when a defense acts. Under ``none`` and ``post`` the
model is trained exactly as without a defense, so one poisoned checkpoint serves
every such trial of an attack ("attack once, evaluate many defenses").
"""
from poison.defenses import filters, outliers  # noqa: F401  (each registers itself on import)
from poison.defenses._base import (
    DEFENSES,
    DETECTION_METRICS,
    FILTER_METRICS,
    Defense,
    NoDefense,
    PostTrainingSession,
    Selection,
    Stage,
    TrainingPairs,
    check_trusted,
    detection_metrics,
    filter_metrics,
    make_defense,
)

__all__ = ["check_trusted", "Defense", "DEFENSES", "detection_metrics", "DETECTION_METRICS", "filter_metrics", "FILTER_METRICS", "make_defense", "NoDefense", "PostTrainingSession", "Selection", "Stage", "TrainingPairs"]
