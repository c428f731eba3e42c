"""Trained models cached on disk, content-addressed by what determined them.

One mechanism serves the sweep's clean model, the poisoned models that defense trials
share ("attack once, evaluate many defenses") and the filters' reference models: a
folder per key holding ``model.pt`` (a state dict, loaded with ``weights_only=True``) and
``metrics.json`` (the evaluation, the per-epoch history, the resolved config). The first
trial to need an entry trains it while the others wait on a file lock; files are written
atomically, and a partial or corrupt entry is rebuilt, never used.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from poison import Dataset, plan_hash
from poison.config import key_values
from poison.manifest import atomic_write, cache_key
from trainers.config import TrialConfig
from trainers.distributed import Ranks
from trainers.evaluate import Evaluator
from trainers.loop import autocast_for, device_for, freeze_tower
from trainers.models import Built, architecture_fingerprint, build_model


@dataclass
class TrainedModel:
    """A trained model's weights and what its training reported."""

    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float]  # the last epoch's evaluation
    history: list[dict[str, float]] = field(default_factory=list)  # every epoch's report
    seconds: float = 0.0  # training time, evaluation excluded
    samples: int = 0
    steps: int = 0  # optimizer steps
    data_seconds: float = 0.0  # the part of ``seconds`` spent getting batches ready
    cached: bool = False  # loaded from the cache rather than trained now

    def build(self, config: TrialConfig) -> Built:
        """A fresh model of ``config``'s architecture with these weights, its frozen tower frozen again."""
        built = build_model(config.model.arch, config.model.pretrained, device=device_for(config),
                            image_size=config.data.image_size)
        built.model.load_state_dict(self.state_dict)
        freeze_tower(built.model, config.train.trainable, config.train.freeze)
        return built

    def evaluator(self, config: TrialConfig, dataset: Dataset) -> Evaluator:
        return Evaluator(self.build(config), dataset, autocast=autocast_for(config, device_for(config)))


def model_key(config: TrialConfig, plan: pa.Table | None = None, **extra: Any) -> str:
    """Hash of everything that determines the model ``config`` trains without a defense: the
    resolved seed, data, model and train sections less what the schema marks as not changing
    the result (``poison.config.key_values``: thread counts, device, memory layout; data keys
    while unset), the attack and its plan when there is one, the architecture's open_clip
    config and version, ``extra``."""
    resolved = key_values(config)
    parts = {k: resolved[k] for k in ("seed", "data", "model", "train")}
    if config.attack.kind != "none":
        parts.update(attack=resolved["attack"], plan=plan_hash(plan) if plan is not None else None)
    return cache_key(**parts, **extra, arch=architecture_fingerprint(config.model.arch), version=2)


def cached(folder: Path | None, train: Callable[[], TrainedModel], *, meta: dict[str, Any],
           store: bool = True) -> TrainedModel:
    """The model stored in ``folder``, else ``train()``'s, stored there with ``meta`` (once: under a
    lock, so concurrent callers wait for one training). ``store=False`` only reads an entry that
    is already there, without waiting; ``folder=None``: no cache.

    In a data-parallel trial (``trainers.distributed``) every rank calls it: rank 0 alone locks,
    reads and stores, and the ranks train together when it found nothing."""
    if folder is None:
        return train()
    ranks = Ranks.current()
    if ranks.parallel:
        return _cached_together(folder, train, meta=meta, store=store, ranks=ranks)
    if not store:
        return _load(folder) or train()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        loaded = _load(folder)
        if loaded is not None:
            return loaded
        model = train()
        _store(folder, model, meta)
        return model


def _cached_together(folder: Path, train: Callable[[], TrainedModel], *, meta: dict[str, Any], store: bool,
                     ranks: Ranks) -> TrainedModel:
    """:func:`cached` for the ranks of one data-parallel trial: rank 0's finding decides for all
    (a rank waiting on the lock while the others train together would wait forever)."""
    if store and ranks.lead:
        folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") if store and ranks.lead else contextlib.nullcontext() as lock:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        loaded = _load(folder) if ranks.lead else None
        if ranks.share(loaded is not None):  # complete files, written atomically: the others read them too
            return loaded if ranks.lead else (_load(folder) or _unreadable(folder))
        model = train()
        if store and ranks.lead:
            _store(folder, model, meta)
        return model


def _unreadable(folder: Path) -> TrainedModel:
    raise RuntimeError(f"{folder}: cached model rank 0 loaded is unreadable on this rank")


def _load(folder: Path) -> TrainedModel | None:
    weights, meta = folder / "model.pt", folder / "metrics.json"
    if not (weights.is_file() and meta.is_file()):
        return None
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        record = json.loads(meta.read_text())
        return TrainedModel(state, record["metrics"], history=record.get("history", []),
                            seconds=record.get("seconds", 0.0), samples=record.get("samples", 0),
                            steps=record.get("steps", 0),
                            data_seconds=record.get("data_seconds", 0.0), cached=True)
    except Exception:  # partial or corrupt entry: rebuild it, never use it
        return None


def _store(folder: Path, model: TrainedModel, meta: dict[str, Any]) -> None:
    atomic_write(folder / "model.pt", lambda fh: torch.save(model.state_dict, fh))
    record = {"metrics": model.metrics, "history": model.history, "seconds": model.seconds,
              "samples": model.samples, "steps": model.steps, "data_seconds": model.data_seconds, **meta}
    atomic_write(folder / "metrics.json", lambda fh: fh.write(json.dumps(record, indent=1).encode()))


