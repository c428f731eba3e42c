"""What runs inside Ray workers: a trial (``trainable``) and the sweep's clean model
(``train_clean``).

Kept apart from the driver so that a worker imports only Ray Tune and trainers/: not
Optuna, MLflow or the driver's analysis code (a new trial actor starts seconds sooner), and
trainers' torch and open_clip only when it trains (``tests/test_layering.py``).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray
import yaml
from ray import tune

import trainers  # its names import on first use: a worker imports torch when it trains, not before
from poison import load_dataset
from sweeps._files import CONFIG_FILE, METRICS_FILE, PLAN_FILE, epoch_result, final_result
from sweeps.config import ResourcesConfig, resolve
from trainers import TrialConfig  # the schema alone


class TuneCheckpointer:
    """The training loop's state kept in Tune's checkpoints: saved with the epoch's report, so
    a trial that Tune restarts (a lost worker, a retried error) goes on from its last epoch."""

    def __init__(self, every: int, kept: list[str] | None = None) -> None:
        self.every, self.pending, self.kept = every, None, kept

    def load(self) -> dict[str, Any] | None:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        from trainers.resume import read_state

        with checkpoint.as_directory() as folder:
            return read_state(folder)

    def save(self, state: dict[str, Any]) -> None:
        self.pending = state

    def report(self, metrics: dict[str, float]) -> None:
        if self.pending is None:
            tune.report(epoch_result(metrics, self.kept))
            return
        from trainers.resume import write_state

        with tempfile.TemporaryDirectory() as folder:
            write_state(folder, self.pending)
            self.pending = None
            tune.report(epoch_result(metrics, self.kept), checkpoint=tune.Checkpoint.from_directory(folder))


def trainable(values: dict[str, Any], *, raw: dict[str, Any], dims: dict, cache_dir: str,
               threads: int, objectives: list[str], every: int = 1, workers: int = 1,
               worker_resources: dict[str, float] | None = None, clean_seeds: list[int] | None = None,
               kept: list[str] | None = None) -> None:
    """One Tune trial: resolve the config, train (on from its last checkpoint when Tune
    restarted it), report epochs with their checkpoints, then the final metrics.

    ``clean_seeds``: only trials of these seeds are measured against a clean model of their
    own (``clean_*`` and ``utility_drop``); None: every trial is.

    ``kept``: the metrics Tune's scheduler and searcher read, the only numbers its results carry
    (:func:`sweeps._files.epoch_result`); every metric is in the epoch's ``epoch_report`` and
    the final checkpoint's metrics file. None: every metric is a number to Tune.

    With ``workers`` > 1 (``resources.workers``), the trial trains data-parallel through Ray
    Train on that many workers of ``worker_resources`` each (:func:`data_parallel`), and this
    function only drives them; it reports to Tune exactly as one process would.

    A trial Tune restores from its final checkpoint (its worker lost after the final report,
    before Tune completed it) reports that checkpoint again instead of training again."""
    if report_final_again(kept):
        return
    config = resolve(raw, dims, values)
    baseline = clean_seeds is None or config.seed in clean_seeds
    if workers > 1:
        metrics, plan = data_parallel(config, workers=workers, worker_resources=worker_resources or {"CPU": 1},
                                      cache_dir=cache_dir, threads=threads, every=every, baseline=baseline,
                                      kept=kept)
    else:
        config = for_worker(config, threads)
        saver = TuneCheckpointer(every, kept)
        result = trainers.run_trial(config, cache_dir=cache_dir, on_epoch=saver.report,
                                    checkpointer=saver if every else None, baseline=baseline)
        metrics, plan = result.metrics, result.plan
    bad = [k for k in objectives if not finite(metrics.get(k))]
    if bad:  # Optuna must be told FAIL, not given a NaN
        raise FloatingPointError(f"objective(s) {', '.join(bad)} not finite: "
                                 f"{ {k: metrics.get(k) for k in bad} }")
    with tempfile.TemporaryDirectory() as folder:
        pq.write_table(plan, Path(folder) / PLAN_FILE)
        (Path(folder) / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
        (Path(folder) / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        tune.report(final_result(metrics, kept), checkpoint=tune.Checkpoint.from_directory(folder))


def report_final_again(kept: list[str] | None = None) -> bool:
    """When Tune restored this trial from its final checkpoint (the one holding METRICS_FILE),
    reports its metrics and that checkpoint again and returns True; else False."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as folder:
        if not (Path(folder) / METRICS_FILE).is_file():
            return False
        metrics = json.loads((Path(folder) / METRICS_FILE).read_text())
    tune.report(final_result(metrics, kept), checkpoint=checkpoint)
    return True


# --- data-parallel trials: Ray Train inside the Tune trial ---

#: What the Tune trial of a data-parallel trial reserves for itself: it only drives Ray Train,
#: whose workers reserve their own resources (Train V2 places them in a placement group of its
#: own); a trial holding a CPU besides would leave a 2-CPU machine unable to place 2 workers.
DRIVER_RESOURCES = {"cpu": 0, "memory": 2**20}


def trial_resources(resources: ResourcesConfig) -> dict[str, float]:
    """``tune.with_resources``' request for one trial of ``resources``."""
    if resources.workers > 1:
        return dict(DRIVER_RESOURCES)
    return {"cpu": resources.cpu, "gpu": resources.gpu}


def trial_parameters(resources: ResourcesConfig) -> dict[str, Any]:
    """:func:`trainable`'s keyword arguments for ``resources.workers`` (none for one worker)."""
    if resources.workers == 1:
        return {}
    return {"workers": resources.workers,
            "worker_resources": {k: v for k, v in (("CPU", resources.cpu), ("GPU", resources.gpu)) if v}}


def data_parallel(config: TrialConfig, *, workers: int, worker_resources: dict[str, float], cache_dir: str,
                  threads: int, every: int, baseline: bool = True,
                  kept: list[str] | None = None) -> tuple[dict[str, float], Any]:
    """Runs the trial on ``workers`` Ray Train workers (gloo on CPU, nccl on GPU), each running
    :func:`run_trial` as one rank of a torch process group (``trainers.distributed``); returns
    rank 0's final metrics and poison plan.

    Rank 0 hands each epoch's report and loop state to this Tune trial through a queue, and the
    trial reports them to Tune as a one-process trial does (:class:`TuneCheckpointer`); a trial
    Tune restarts hands its last checkpoint's state to every rank. Train's own retries are off:
    a failed worker fails the trial, and Tune retries it (``search.max_failures``) from there."""
    # Imported here: a one-worker trial never pays for Ray Train. Train V2 is asked for by name
    # (the driver switches V2 off for its own processes, to quiet Tune's migration warnings).
    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
    from ray.train.torch.config import TorchConfig
    from ray.train.v2.api.config import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer
    from ray.util.queue import Empty, Queue

    from trainers.resume import read_state

    checkpoint = tune.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = read_state(folder)
    queue = Queue(actor_options={"num_cpus": 0})
    use_gpu = bool(worker_resources.get("GPU"))
    context = tune.get_context()
    trainer = TorchTrainer(
        _rank_main,
        train_loop_config={"config": config.model_dump(mode="json"), "cache_dir": cache_dir, "threads": threads,
                           "every": every, "baseline": baseline,
                           "state": ray.put(state) if state is not None else None,
                           "queue": queue},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=worker_resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"train-{context.get_trial_id()}", storage_path=context.get_trial_dir(),
                             failure_config=FailureConfig(max_failures=0)),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # raised in this trial's thread below
            outcome["error"] = err

    runner = threading.Thread(target=fit, name="ray-train-driver", daemon=True)
    runner.start()
    saver = TuneCheckpointer(every, kept)
    try:
        while True:
            try:
                kind, *item = queue.get(timeout=0.5)
            except Empty:
                if runner.is_alive():
                    continue
                if queue.empty():
                    break
                continue
            if kind == "epoch":
                report, state = item
                if state is not None:
                    saver.save(state)
                saver.report(report)
            else:
                outcome["final"] = item
    finally:
        runner.join()
        ray.kill(queue.actor)
    if "error" in outcome:
        raise outcome["error"]
    if "final" not in outcome:
        raise RuntimeError("Ray Train finished without rank 0's final metrics")
    metrics, plan = outcome["final"]
    return metrics, plan


class RankCheckpointer:
    """The loop's checkpointer on one rank of a data-parallel trial: every rank loads the state
    the Tune trial handed over; rank 0's saves and reports go back to it through ``queue``."""

    def __init__(self, every: int, state: Any, queue: Any, lead: bool) -> None:
        self.every, self.state, self.queue, self.lead, self.pending = every, state, queue, lead, None

    def load(self) -> dict[str, Any] | None:
        return ray.get(self.state) if self.state is not None else None

    def save(self, state: dict[str, Any]) -> None:
        self.pending = {k: _to_cpu(v) for k, v in state.items()}

    def report(self, metrics: dict[str, float]) -> None:
        if self.lead:
            self.queue.put(("epoch", {**metrics, "train_workers": _world_size()}, self.pending))
        self.pending = None


def _rank_main(args: dict[str, Any]) -> None:
    """One Ray Train worker: its rank of the trial (the process group is Ray Train's)."""
    import torch
    import torch.distributed as dist

    config = TrialConfig.model_validate(args["config"])
    if ray.get_gpu_ids():  # Ray Train shows a node's workers all their GPUs: use this rank's
        from ray.train.torch import get_device

        torch.cuda.set_device(get_device())
    config = for_worker(config, args["threads"])
    lead = dist.get_rank() == 0
    saver = RankCheckpointer(args["every"], args["state"], args["queue"], lead)
    result = trainers.run_trial(config, cache_dir=args["cache_dir"], on_epoch=saver.report,
                                checkpointer=saver if args["every"] else None, baseline=args["baseline"])
    if lead:
        args["queue"].put(("final", {**result.metrics, "train_workers": float(dist.get_world_size())}, result.plan))


def _world_size() -> float:
    import torch.distributed as dist

    return float(dist.get_world_size()) if dist.is_initialized() else 1.0


def _to_cpu(value: Any) -> Any:
    """Tensors (nested in dicts and lists) on the CPU, to travel through Ray's object store."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


@ray.remote
def train_clean(config: dict[str, Any], cache_dir: str, threads: int) -> dict[str, Any]:
    model = trainers.clean_model(for_worker(TrialConfig.model_validate(config), threads), cache_dir=cache_dir)
    return {"utility": model.metrics["utility"], "cached": model.cached}


@ray.remote
def train_reference(config: dict[str, Any], cache_dir: str, threads: int) -> dict[str, Any]:
    """The offline reference model a data-side filter of ``config`` embeds with, trained once on
    trusted pairs and cached (``trainers.trial.reference_model``), as its trials would train it."""
    from trainers.trial import reference_model

    trial = for_worker(TrialConfig.model_validate(config), threads)
    pairs = trial.defense.reference_pairs or load_dataset(trial.data_spec(cache_dir)).num_train
    model = reference_model(trial, pairs, cache_dir=cache_dir)
    return {"utility": model.metrics["utility"], "cached": model.cached, "pairs": pairs}


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
