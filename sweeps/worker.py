"""What runs inside Ray workers: a trial (``trainable``) and the sweep's clean model
(``train_clean``).

Kept apart from the driver so that a worker imports only Ray Tune and trainers/: not
Optuna, MLflow or the driver's analysis code (a new trial actor starts seconds sooner).
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray
import yaml
from ray import tune

from sweeps.config import resolve
from trainers import TrialConfig, clean_model, run_trial
from trainers.resume import read_state, write_state

#: A trial's final checkpoint: its poison plan, final metrics and resolved config.
PLAN_FILE, METRICS_FILE, CONFIG_FILE = "poison_plan.parquet", "metrics.json", "trial_config.yaml"


class TuneCheckpointer:
    """The training loop's state kept in Tune's checkpoints: saved with the epoch's report, so
    a trial that Tune restarts (a lost worker, a retried error) goes on from its last epoch."""

    def __init__(self, every: int) -> None:
        self.every, self.pending = every, None

    def load(self) -> dict[str, Any] | None:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return read_state(folder)

    def save(self, state: dict[str, Any]) -> None:
        self.pending = state

    def report(self, metrics: dict[str, float]) -> None:
        if self.pending is None:
            tune.report({"epoch_metrics": metrics})
            return
        with tempfile.TemporaryDirectory() as folder:
            write_state(folder, self.pending)
            self.pending = None
            tune.report({"epoch_metrics": metrics}, checkpoint=tune.Checkpoint.from_directory(folder))


def trainable(values: dict[str, Any], *, raw: dict[str, Any], dims: dict, cache_dir: str,
               threads: int, objectives: list[str], every: int = 1) -> None:
    """One Tune trial: resolve the config, train (on from its last checkpoint when Tune
    restarted it), report epochs with their checkpoints, then the final metrics."""
    config = for_worker(resolve(raw, dims, values), threads)
    saver = TuneCheckpointer(every)
    result = run_trial(config, cache_dir=cache_dir, on_epoch=saver.report, checkpointer=saver if every else None)
    bad = [k for k in objectives if not finite(result.metrics.get(k))]
    if bad:  # Optuna must be told FAIL, not given a NaN
        raise FloatingPointError(f"objective(s) {', '.join(bad)} not finite: "
                                 f"{ {k: result.metrics.get(k) for k in bad} }")
    with tempfile.TemporaryDirectory() as folder:
        pq.write_table(result.plan, Path(folder) / PLAN_FILE)
        (Path(folder) / METRICS_FILE).write_text(json.dumps(result.metrics, indent=1))
        (Path(folder) / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        tune.report(result.metrics, checkpoint=tune.Checkpoint.from_directory(folder))


@ray.remote
def train_clean(config: dict[str, Any], cache_dir: str, threads: int) -> dict[str, Any]:
    model = clean_model(for_worker(TrialConfig.model_validate(config), threads), cache_dir=cache_dir)
    return {"utility": model.metrics["utility"], "cached": model.cached}


def for_worker(config: TrialConfig, threads: int) -> TrialConfig:
    """The trial's config inside a Ray worker: its CPU share as torch threads, and the CPU
    when Ray gave it no GPU (Ray no longer hides a node's GPUs from CPU-only tasks)."""
    update: dict[str, Any] = {}
    if config.train.threads is None:
        update["threads"] = threads
    if config.train.device == "auto" and not ray.get_gpu_ids():
        update["device"] = "cpu"
    return config.model_copy(update={"train": config.train.model_copy(update=update)}) if update else config


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
