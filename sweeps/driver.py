"""The Ray Tune driver: Optuna draws each trial's parameters, MLflow records them.

``run_sweep`` validates nothing itself (the config arrives validated), starts or
joins Ray, trains the sweep's clean model once as a Ray task beside the trials,
and runs a ``Tuner`` whose trials call :func:`trainers.run_trial`.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
import pyarrow.parquet as pq
import ray
import yaml
from ray import tune
from ray.tune.search import ConcurrencyLimiter, SearchAlgorithm, Searcher
from ray.tune.search.optuna import OptunaSearch

from poison import ConfigError
from sweeps.config import SweepConfig, resolve
from sweeps.space import define_by_run, make_sampler
from sweeps.tracking import Tracker
from poison import plan_hash
from trainers import TrialConfig, clean_model, run_trial

PLAN_FILE, METRICS_FILE, CONFIG_FILE = "poison_plan.parquet", "metrics.json", "trial_config.yaml"
Printer = Callable[[str], None]
QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
             "RAY_TRAIN_V2_ENABLED": "0"}


@dataclass
class TrialRow:
    """One finished (or failed) trial, for the summary table."""

    trial_id: str
    status: str
    values: dict[str, Any]
    metrics: dict[str, float]
    run_id: str | None
    error: str = ""


@dataclass
class SweepOutcome:
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    rows: list[TrialRow]
    study_name: str
    study_url: str


def optuna_storage(sweep: SweepConfig) -> str:
    """Where the sweep's Optuna study lives (one study per launch, named like the Tune run)."""
    folder = Path(sweep.storage.path).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def run_sweep(sweep: SweepConfig, *, tracking_uri: str, address: str | None = None,
              printer: Printer = print) -> SweepOutcome:
    """Runs the sweep to the end; failed trials are recorded as failed, never fatal."""
    start_driver(sweep, address, printer)  # before any MLflow run exists: a bad address leaves nothing behind
    tracker = Tracker(tracking_uri, sweep)
    parent = tracker.start_parent()
    logger = TrialLogger(sweep, tracker, printer)
    run_name = f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        study_url = optuna_storage(sweep)
        tracker.client.log_param(parent, "optuna.study", f"{run_name} in {study_url}")
        clean = clean_first(sweep)[0]
        logger.say(f"clean model: utility {clean['utility']:.3f} "
                   f"({'from the cache' if clean['cached'] else 'trained'})")
        tuner(sweep, _searcher(sweep, run_name, study_url), sweep.search.num_samples, logger, run_name,
              list(sweep.search.objectives)).fit()
    except BaseException:
        tracker.finish_parent(None, status="FAILED")
        raise
    rows = logger.rows()  # the logger recorded every trial's outcome as it happened
    tracker.finish_parent(summary_csv(rows, sweep))
    return SweepOutcome(tracker.experiment_id, parent, tracking_uri, rows, run_name, study_url)


def start_driver(sweep: SweepConfig, address: str | None, printer: Printer) -> None:
    """What every launch does first: quiet Tune and Optuna, start or join Ray, and refuse a
    trial no node can hold."""
    # Epoch results deliberately omit the objectives: a trial that fails after some
    # epochs must reach Optuna as FAIL, not as COMPLETE with its last epoch's values.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    for key, value in QUIET_ENV.items():  # our own progress lines replace Tune's reporter
        os.environ.setdefault(key, value)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _start_ray(address)
    _check_resources(sweep, local=address is None, printer=printer)


def _start_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError(f"--address: cannot join the Ray cluster at {address}: {err}") from None
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)


def _check_resources(sweep: SweepConfig, *, local: bool, printer: Printer) -> None:
    """A trial no node can hold would wait forever: refuse it locally, warn on a cluster
    (whose autoscaler may still add such a node)."""
    want = {"CPU": sweep.resources.cpu, "GPU": sweep.resources.gpu}
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if any(all(node.get(k, 0) >= v for k, v in want.items() if v) for node in nodes):
        return
    have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes) or "no nodes"
    key = "resources.gpu" if want["GPU"] and not any(n.get("GPU", 0) >= want["GPU"] for n in nodes) else "resources.cpu"
    message = (f"{key}: no node can hold a trial of {want['CPU']:g} CPU and {want['GPU']:g} GPU "
               f"(nodes: {have})")
    if local:
        raise ConfigError(message)
    printer(f"warning: {message}; trials wait until the autoscaler adds such a node")


def _searcher(sweep: SweepConfig, run_name: str, study_url: str) -> ConcurrencyLimiter:
    objectives = sweep.search.objectives
    seed = sweep.search.seed if sweep.search.seed is not None else sweep.default_trial.seed
    searcher = OptunaSearch(
        storage=optuna.storages.RDBStorage(study_url), study_name=run_name,
        space=define_by_run(sweep.dimensions), metric=list(objectives), mode=list(objectives.values()),
        sampler=make_sampler(sweep.search.sampler, seed),
        points_to_evaluate=sweep.initial_points() or None,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=sweep.search.max_concurrent)


def tuner(sweep: SweepConfig, search_alg: Searcher | SearchAlgorithm, num_samples: int, logger: "TrialLogger",
          run_name: str, objectives: list[str], param_space: dict[str, Any] | None = None) -> tune.Tuner:
    """The Tuner of ``num_samples`` trials drawn by ``search_alg``, each a :func:`_trainable`
    (with the sweep's resources, its CPU share as torch threads) mirrored into MLflow by ``logger``."""
    cache_dir, threads = sweep.storage.cache_dir(), max(1, int(sweep.resources.cpu))
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, raw=sweep.raw, dims=sweep.dimensions, cache_dir=cache_dir,
                             threads=threads, objectives=objectives),
        {"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu},
    )
    storage = Path(sweep.storage.path).resolve()
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            num_samples=num_samples,
            reuse_actors=True,  # a new actor re-imports torch and open_clip: seconds per trial
        ),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=str(storage),
            callbacks=[logger],
            failure_config=tune.FailureConfig(max_failures=0),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )


def _trainable(values: dict[str, Any], *, raw: dict[str, Any], dims: dict, cache_dir: str,
               threads: int, objectives: list[str]) -> None:
    """One Tune trial: resolve the config, train, report epochs, then the final metrics."""
    config = for_worker(resolve(raw, dims, values), threads)
    result = run_trial(config, cache_dir=cache_dir,
                       on_epoch=lambda m: tune.report({"epoch_metrics": m}))
    bad = [k for k in objectives if not _finite(result.metrics.get(k))]
    if bad:  # Optuna must be told FAIL, not given a NaN
        raise FloatingPointError(f"objective(s) {', '.join(bad)} not finite: "
                                 f"{ {k: result.metrics.get(k) for k in bad} }")
    with tempfile.TemporaryDirectory() as folder:
        pq.write_table(result.plan, Path(folder) / PLAN_FILE)
        (Path(folder) / METRICS_FILE).write_text(json.dumps(result.metrics, indent=1))
        (Path(folder) / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        tune.report(result.metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def clean_first(sweep: SweepConfig, seeds: list[int] | None = None) -> list[dict[str, Any]]:
    """Trains (or finds in the cache) the sweep's clean model before the trials start: the
    default point's, or one per seed of ``seeds``.

    Each runs as one Ray task with the CPUs of all concurrent trials (a running task
    beside the Tuner starves Tune's placement groups), so trials only load it.
    """
    largest_node = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
    cpus = max(sweep.resources.cpu, min(sweep.resources.cpu * sweep.search.max_concurrent, largest_node))
    task = _train_clean.options(num_cpus=cpus, num_gpus=min(sweep.resources.gpu, 1) if sweep.resources.gpu else 0)
    default = sweep.default_trial
    configs = [default] if seeds is None else [default.model_copy(update={"seed": s}) for s in seeds]
    cache_dir, threads = sweep.storage.cache_dir(), max(1, int(cpus))
    return ray.get([task.remote(c.model_dump(mode="json"), cache_dir, threads) for c in configs])


@ray.remote
def _train_clean(config: dict[str, Any], cache_dir: str, threads: int) -> dict[str, Any]:
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


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class TrialLogger(tune.Callback):
    """Mirrors every trial into MLflow as it runs, and prints its progress.

    One logger may serve several Tuners in turn (the budget search's rounds): trials
    are numbered on across them, out of ``total`` (default ``search.num_samples``).
    """

    def __init__(self, sweep: SweepConfig, tracker: Tracker, printer: Printer, *, total: int | None = None) -> None:
        self.sweep, self.tracker, self.printer = sweep, tracker, printer
        self.total = total or sweep.search.num_samples
        self.run_ids: dict[str, str] = {}
        self.order: dict[str, int] = {}
        self.finished: dict[str, TrialRow] = {}
        self.start = time.monotonic()
        self.last_epoch: dict[str, dict[str, float]] = {}

    def say(self, line: str) -> None:
        """Prints a progress line stamped with the time since the sweep started."""
        elapsed = int(time.monotonic() - self.start)
        self.printer(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {line}")

    def _label(self, trial: Any) -> str:
        return f"trial {self.order[trial.trial_id]}/{self.total}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.order.setdefault(trial.trial_id, len(self.order) + 1)
        config = self.sweep.resolve(trial.config)
        name = f"trial-{self.order[trial.trial_id]:03d}"
        self.run_ids[trial.trial_id] = self.tracker.start_trial(trial.trial_id, config, trial.config, name=name)
        values = " ".join(f"{k}={_fmt(v)}" for k, v in trial.config.items())
        self.say(f"{self._label(trial)} started: {values or 'defaults'}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        epoch = result.get("epoch_metrics")
        if not epoch:
            return
        self.tracker.log_metrics(self.run_ids[trial.trial_id], epoch, step=int(epoch["epoch"]))
        self.last_epoch[trial.trial_id] = epoch
        total = _epochs(self.sweep.resolve(trial.config))
        self.say(f"{self._label(trial)} epoch {int(epoch['epoch'])}/{total}: loss {epoch['loss']:.3f} "
                     f"utility {epoch.get('utility', float('nan')):.3f} "
                     f"attack_success {epoch.get('attack_success', float('nan')):.3f}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.run_ids[trial.trial_id]
        with trial.checkpoint.as_directory() as folder:
            metrics = json.loads((Path(folder) / METRICS_FILE).read_text())
            step = _epochs(self.sweep.resolve(trial.config))  # the last epoch's step
            seen = self.last_epoch.get(trial.trial_id, {})  # already logged at this step
            new = {k: v for k, v in metrics.items() if seen.get(k) != v}
            plan = pq.read_table(Path(folder) / PLAN_FILE)
            self.tracker.finish_trial(run_id, new, step, [Path(folder) / PLAN_FILE, Path(folder) / CONFIG_FILE],
                                      tags={"plan_hash": plan_hash(plan)})
        self.finished[trial.trial_id] = TrialRow(trial.trial_id, "FINISHED", dict(trial.config), metrics, run_id)
        self.say(f"{self._label(trial)} done: attack_success {metrics.get('attack_success', float('nan')):.3f} "
                     f"utility {metrics['utility']:.3f} poison_count {metrics['poison_count']}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = _error_text(trial)
        run_id = self.run_ids.get(trial.trial_id)
        if run_id:
            self.tracker.fail_trial(run_id, error)
        last = error.strip().splitlines()[-1] if error.strip() else "error"
        self.finished[trial.trial_id] = TrialRow(trial.trial_id, "FAILED", dict(trial.config), {}, run_id, last)
        self.say(f"{self._label(trial)} FAILED: {last}")

    def rows(self) -> list[TrialRow]:
        return [self.finished[t] for t in sorted(self.finished, key=lambda t: self.order.get(t, 0))]


def _epochs(config: TrialConfig) -> int:
    """Epochs a trial reports: its training's plus a post-training defense's."""
    return config.train.epochs + config.defense.extra_epochs


def _error_text(trial: Any) -> str:
    path = trial.error_file
    if path and Path(path).is_file():
        return Path(path).read_text()
    return str(trial.get_error() or "")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


SUMMARY_COLUMNS = ["poison_count", "attack_success", "utility", "clean_utility", "clean_attack_success"]


def summary_csv(rows: list[TrialRow], sweep: SweepConfig) -> str:
    """One line per trial; a dimension its drawn kinds do not use is left empty."""
    dims, cols = list(sweep.dimensions), SUMMARY_COLUMNS
    lines = [",".join(["trial_id", "status", *dims, *cols, "run_id"])]
    for r in rows:
        lines.append(",".join([r.trial_id, r.status, *(str(r.values.get(d, "")) for d in dims),
                               *(str(r.metrics.get(c, "")) for c in cols), r.run_id or ""]))
    return "\n".join(lines) + "\n"


def summary_table(rows: list[TrialRow], sweep: SweepConfig) -> str:
    """The final table of trials: their drawn values ("-": a dimension the trial's kinds
    do not use) and headline metrics."""
    dims = list(sweep.dimensions)
    head = ["trial", "status", *dims, "poison_count", "trigger", "attack_success", "utility"]
    body = []
    for r in rows:
        trigger = sweep.resolve(r.values).attack.trigger_name
        body.append([r.trial_id, r.status, *(_fmt(r.values[d]) if d in r.values else "-" for d in dims),
                     _fmt(r.metrics.get("poison_count", "")), trigger,
                     _fmt(r.metrics.get("attack_success", "")), _fmt(r.metrics.get("utility", ""))])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*map(str, row)) for row in body)])
