"""One trial, without Ray: poison the data, defend, train CLIP, evaluate.

``run_trial(config)`` is a plain function of a validated :class:`TrialConfig`;
the sweep driver wraps it, ``poisonsweep train`` calls it directly. A defense acts
through its hooks (``poison.defenses.Defense``): a keep-mask before training, the
trained model after it; the loop itself (``trainers.loop``) knows no defense.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import torch

from poison import Dataset, load_dataset, plan_hash, streams
from poison.attacks import empty_plan
from poison.config import ConfigError
from poison.defenses import Defense, detection_metrics, filter_metrics
from trainers.cache import TrainedModel, cached, model_key
from trainers.config import TrialConfig
from trainers.data import TrainingSet
from trainers.distributed import Ranks
from trainers.evaluate import Evaluator, evaluate_trial
from trainers.hooks import PostTraining, ReferencePairs, trusted_dataset
from trainers.loop import EpochCallback, autocast_for, device_for, fit, freeze_tower
from trainers.models import build_model
from trainers.resume import Checkpointer


@dataclass
class TrialResult:
    metrics: dict[str, float]
    plan: pa.Table
    state_dict: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


def run_trial(config: TrialConfig, *, cache_dir: str | None = None, on_epoch: EpochCallback | None = None,
              baseline: bool = True, checkpointer: Checkpointer | None = None) -> TrialResult:
    """Trains one poisoned (and maybe defended) model and returns its final metrics (DESIGN.md names).

    With ``baseline``, the sweep's clean model (same data, model and recipe, no
    poison) is loaded from ``cache_dir`` or trained once and cached, and
    ``clean_utility``, ``utility_drop`` and ``clean_attack_success`` are added.
    A ``checkpointer`` keeps the training's state between epochs, and a trial that finds one
    there goes on from it (``resumed_from_epoch`` says from which epoch).
    A trial whose defense leaves training as it is (none, or one acting after
    training) shares its poisoned model through ``cache_dir`` with every such trial
    of the same attack; ``poisoned_cache_hit`` says whether it was loaded.

    Example:
        >>> from trainers import parse_trial_config
        >>> cfg = parse_trial_config({"data": {"size": 512}, "train": {"epochs": 1}})  # doctest: +SKIP
        >>> run_trial(cfg).metrics["utility"]  # doctest: +SKIP
    """
    dataset = load_dataset(config.data_spec(cache_dir))
    config.attack.check(dataset)  # reject before any training
    config.defense.check(dataset, pretrained=config.model.pretrained is not None)
    plan = config.attack.plan(dataset, config.seed)
    clean = (clean_model(config, cache_dir=cache_dir)
             if baseline and config.attack.kind != "none" else None)
    if on_epoch is not None:  # each epoch's report says what the final metrics will say of it
        on_epoch = _with_trial_metrics(on_epoch, _plan_metrics(dataset, plan), clean)
    model, metrics = trained_model(config, dataset, plan, cache_dir=cache_dir, on_epoch=on_epoch,
                                   checkpointer=checkpointer)
    metrics.update(model.metrics, train_seconds=model.seconds, data_seconds=model.data_seconds,
                   samples_per_second=model.samples / max(model.seconds, 1e-9), train_steps=float(model.steps))
    state = model.state_dict
    defended = _after_training(config, dataset, model, cache_dir=cache_dir, on_epoch=on_epoch)
    if defended is not None:
        state, after = defended
        metrics.update(after)
    return TrialResult(metrics=_final_metrics(config, dataset, plan, metrics, clean), plan=plan, state_dict=state)


def trained_model(config: TrialConfig, dataset: Dataset, plan: pa.Table, *, cache_dir: str | None,
                  on_epoch: EpochCallback | None = None,
                  checkpointer: Checkpointer | None = None) -> tuple[TrainedModel, dict[str, float]]:
    """The trial's trained model, before any post-training defense, and the metrics of how it was got.

    Trained as without a defense (``stage`` none or post), it is the same model for every
    defense of the attack, so it goes through the cache: the clean model always, a poisoned
    one stored when a post-training defense needs it and read whenever it is there (a
    stored model replays its epochs to ``on_epoch``). A data-side or in-training defense
    trains a model of its own.
    """
    metrics: dict[str, float] = {}  # a data-side defense's, when it trains now

    def train() -> TrainedModel:
        model, own = _train(config, dataset, plan, on_epoch, cache_dir=cache_dir, checkpointer=checkpointer)
        metrics.update(own)
        return model

    if cache_dir is None or config.defense.stage not in ("none", "post"):
        return train(), metrics
    kind = "clean" if config.attack.kind == "none" else "poisoned"
    meta = {"config": {k: v for k, v in config.to_dict().items() if k != "defense"}, "plan_hash": plan_hash(plan)}
    model = cached(Path(cache_dir) / kind / model_key(config, plan), train, meta=meta,
                   store=kind == "clean" or config.defense.stage == "post")
    if model.cached and on_epoch is not None:
        for epoch in model.history:
            on_epoch(epoch)
    return model, {**metrics, f"{kind}_cache_hit": float(model.cached)}


def _train(config: TrialConfig, dataset: Dataset, plan: pa.Table, on_epoch: EpochCallback | None = None, *,
           cache_dir: str | None = None,
           checkpointer: Checkpointer | None = None) -> tuple[TrainedModel, dict[str, float]]:
    """Trains and evaluates after every epoch, on the rows the data-side defense keeps;
    returns the model and the defense's metrics."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    data = TrainingSet(dataset, config.attack, plan, open_clip.get_tokenizer(config.model.arch),
                       token_cache=Path(cache_dir) / "tokens" if cache_dir else None)
    data, defense_metrics = _keep(config, dataset, data, cache_dir)  # before seeding: it may train a reference
    torch.manual_seed(config.seed)
    device = device_for(config)
    built = build_model(config.model.arch, config.model.pretrained, device=device,
                        image_size=config.data.image_size)
    freeze_tower(built.model, config.train.trainable, config.train.freeze)
    evaluator = Evaluator(built, dataset, autocast=autocast_for(config, device))
    objective = config.defense.objective(config.seed)
    fitted = fit(built, data, config, rng=streams.rng(config.seed, streams.BATCHES), on_epoch=on_epoch,
                 evaluate=lambda: evaluate_trial(evaluator, config.attack, dataset, config.seed),
                 checkpointer=checkpointer, objective=objective)
    model = TrainedModel(built.model.state_dict(), fitted.last, history=fitted.history, seconds=fitted.seconds,
                         samples=fitted.samples, steps=fitted.steps, data_seconds=fitted.data_seconds)
    if objective is not None:
        defense_metrics = {**defense_metrics, **objective.metrics()}
    if fitted.resumed_from:
        defense_metrics = {**defense_metrics, "resumed_from_epoch": float(fitted.resumed_from)}
    return model, defense_metrics


def _keep(config: TrialConfig, dataset: Dataset, data: TrainingSet,
          cache_dir: str | None) -> tuple[TrainingSet, dict[str, float]]:
    """The rows the defense's ``keep_mask`` keeps, scored against the plan (``filter_*``; the
    detection metrics too when the defense scores pairs)."""
    start, reference = time.perf_counter(), _ReferenceSupplier(config, dataset, cache_dir)
    selection = config.defense.select(ReferencePairs(data, reference), config.seed)
    selection = Ranks.current().share(selection)  # data-parallel: every rank trains on rank 0's rows
    if selection is None:
        return data, {}
    keep = np.asarray(selection.keep, bool)
    if keep.shape != (len(data),):
        raise ValueError(f"defense {config.defense.kind}: keep-mask of shape {keep.shape} for {len(data)} rows")
    if not keep.any():
        raise ConfigError(f"defense: {config.defense.kind} removed all {len(data):,} training pairs")
    seconds = time.perf_counter() - start - reference.seconds  # the shared reference model is not its cost
    detection = {} if selection.scores is None else detection_metrics(selection.scores, data.poisoned)
    return data.subset(keep), {**filter_metrics(keep, data.poisoned), **detection, **reference.metrics,
                               "defense_seconds": seconds}


class _ReferenceSupplier:
    """The filters' reference model, got on first use: ``model.pretrained`` when given, else a
    model of the trial's recipe trained once on trusted pairs and cached (``reference/``)."""

    def __init__(self, config: TrialConfig, dataset: Dataset, cache_dir: str | None) -> None:
        self.config, self.dataset, self.cache_dir = config, dataset, cache_dir
        self.seconds, self.metrics = 0.0, {}

    def __call__(self, trusted_pairs: int | None) -> Evaluator:
        start, config = time.perf_counter(), self.config
        autocast = autocast_for(config, device_for(config))
        if config.model.pretrained is not None:
            built = build_model(config.model.arch, config.model.pretrained, device=device_for(config),
                                image_size=config.data.image_size)
            return Evaluator(built, self.dataset, autocast=autocast)
        model = reference_model(config, trusted_pairs or self.dataset.num_train, cache_dir=self.cache_dir)
        self.seconds += time.perf_counter() - start
        self.metrics = {"reference_cache_hit": float(model.cached), "reference_utility": model.metrics["utility"]}
        return Evaluator(model.build(reference_config(config)), self.dataset, autocast=autocast)


def reference_config(config: TrialConfig) -> TrialConfig:
    """The offline reference model's config: the trial's data, model and recipe without poison
    or defense, both towers trained (it has to embed images and captions alike)."""
    clean = config.clean()
    return clean.model_copy(update={"train": clean.train.model_copy(update={"trainable": "both"})})


def reference_model(config: TrialConfig, trusted_pairs: int, *, cache_dir: str | None) -> TrainedModel:
    """The reference model of ``config``, trained on ``trusted_pairs`` trusted pairs instead of the
    training pairs (so a filter is not handed the answer); trained once, cached (``reference/``)."""
    reference = reference_config(config)
    trusted = trusted_dataset(config, trusted_pairs, "defense.reference_pairs", cache_dir)
    folder = Path(cache_dir) / "reference" / model_key(reference, trusted=trusted_pairs) if cache_dir else None
    meta = {"config": reference.to_dict(), "trusted_pairs": trusted_pairs}
    return cached(folder, lambda: _train(reference, trusted, empty_plan())[0], meta=meta)


def _after_training(config: TrialConfig, dataset: Dataset, model: TrainedModel, *, cache_dir: str | None,
                    on_epoch: EpochCallback | None) -> tuple[dict[str, torch.Tensor], dict[str, float]] | None:
    """Runs the defense's ``after_training`` hook; None when it did nothing. Else the defended
    weights and metrics: the new evaluation, the one before as ``predefense_*``, the defense's own."""
    if type(config.defense).after_training is Defense.after_training:  # no hook: no model to build
        return None
    start = time.perf_counter()
    session = PostTraining(config, dataset, model, cache_dir=cache_dir, on_epoch=on_epoch)
    own = config.defense.after_training(session)
    if own is None:
        return None
    metrics = {**session.metrics, **{f"predefense_{k}": v for k, v in model.metrics.items()}, **own,
               "defense_seconds": time.perf_counter() - start}
    return session.built.model.state_dict(), metrics


def _final_metrics(config: TrialConfig, dataset: Dataset, plan: pa.Table, metrics: dict[str, float],
                   clean: TrainedModel | None) -> dict[str, float]:
    metrics = dict(metrics)
    metrics.update(_plan_metrics(dataset, plan),
                   data_skipped=float(dataset.skipped))  # unusable pairs the loader left out
    if clean is not None:
        metrics.update(clean_utility=clean.metrics["utility"],
                       utility_drop=clean.metrics["utility"] - metrics["utility"],
                       clean_train_steps=float(clean.steps))
        attack_on_clean = config.attack.evaluate(dataset, clean.evaluator(config, dataset), config.seed)
        if "attack_success" in attack_on_clean:
            metrics["clean_attack_success"] = attack_on_clean["attack_success"]
        metrics["clean_cache_hit"] = float(clean.cached)
    return metrics


def _plan_metrics(dataset: Dataset, plan: pa.Table) -> dict[str, float]:
    n_replace = int(np.sum(plan["op"].to_numpy(zero_copy_only=False) == "replace")) if plan.num_rows else 0
    total = dataset.num_train + plan.num_rows - n_replace
    return {"poison_count": plan.num_rows, "poison_rate": plan.num_rows / total}


def _with_trial_metrics(on_epoch: EpochCallback, fixed: dict[str, float],
                        clean: TrainedModel | None) -> EpochCallback:
    """``on_epoch`` given, with each epoch's report, the trial's poison counts and (against the clean
    model) its ``utility_drop`` so far: an early-stopping scheduler compares trials at an epoch on
    the objectives and constraints they are judged on at the end."""

    def report(epoch: dict[str, float]) -> None:
        extra = dict(fixed)
        if clean is not None and "utility" in epoch:
            extra["utility_drop"] = clean.metrics["utility"] - epoch["utility"]
        on_epoch({**epoch, **extra})

    return report


# --- the sweep's clean model: trained once, cached by what determines it ---

def clean_key(config: TrialConfig) -> str:
    """Hash of everything that determines the clean model (not the attack, defense or name)."""
    return model_key(config.clean())


def clean_model(config: TrialConfig, *, cache_dir: str | None) -> TrainedModel:
    """Loads the clean model from the cache, or trains and stores it (once, under a lock)."""
    clean = config.clean()
    dataset = load_dataset(clean.data_spec(cache_dir))
    return trained_model(clean, dataset, empty_plan(), cache_dir=cache_dir)[0]
