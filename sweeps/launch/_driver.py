"""The Ray Tune driver: Optuna draws each trial's parameters, MLflow records them.

``run_sweep`` validates nothing itself (the config arrives validated), starts or
joins Ray, trains the sweep's clean model once as a Ray task beside the trials,
and runs a ``Tuner`` whose trials call :func:`trainers.run_trial`.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.search import ConcurrencyLimiter, Repeater, SearchAlgorithm, Searcher
from ray.tune.search.optuna import OptunaSearch

from poison import ConfigError
from sweeps import _local_ray as local_ray
from sweeps._files import LAUNCH_FILE
from sweeps.config import Constraint, SweepConfig, define_by_run, make_sampler, read_yaml
from sweeps.launch._moasha import DECISION, EPOCH, MOASHA, RungState
from sweeps.launch._trainable import finite, train_clean, train_reference, trial_parameters, trial_resources
from sweeps.launch._trainable import trainable as trial_trainable
from sweeps.launch._tune_fixes import defer_checkpoint_deletion, mend_torn_state, repair_reset_failures
from sweeps.tracking import TRACKING_ERRORS, Launch, Tracker, without_credentials
from sweeps.tracking._logger import Printer, TrialLogger, TrialRow, restoring, summary_csv, sweep_note, trial_count
from trainers import TrialConfig
from trainers.cache import model_key
from trainers.trial import reference_config

#: a stopped trial's last result (as Tune flattens it) holds its rung's decision (RungState)
STOPPED_KEY = f"{DECISION}/decision"
Trainable = Callable[..., None]  # a trial function with sweeps.launch.trainable's signature
QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
             "RAY_TRAIN_V2_ENABLED": "0",
             # a tracking server that is down must not hold Tune's event loop for minutes
             # (MLflow's default: 7 retries with exponential back-off); the Mirror catches up later
             "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
             # MLflow prints a link to each run it ends on a tracking server: one line per trial,
             # among ours; `poisonsweep run` says once, at the end, how to open them
             "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
             # Tune saves its experiment state at least this often (its "auto": every >= 10 s), and
             # less often where a save takes long (defer_checkpoint_deletion); a launch killed and
             # resumed reruns the trials that finished since the last save
             "TUNE_GLOBAL_CHECKPOINT_S": "1"}


@dataclass
class SweepOutcome:
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    rows: list[TrialRow]
    study_name: str
    study_url: str
    synced: bool = True  # every trial is in MLflow as Tune recorded it
    folder: str = ""     # the launch's folder in Tune's storage


def optuna_storage(sweep: SweepConfig) -> str:
    """Where the sweep's Optuna study lives (one study per launch, named like the Tune run)."""
    folder = Path(sweep.storage.path).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def run_sweep(sweep: SweepConfig, *, tracking_uri: str, address: str | None = None,
              printer: Printer = print, resume: bool = False, trainable: Trainable | None = None) -> SweepOutcome:
    """Runs the sweep to the end; failed trials are recorded as failed, never fatal.

    With ``resume``, the sweep's last interrupted launch goes on where it stopped (Tune
    restores its trials and search state; finished trials are not run again, unfinished
    ones go on from their last checkpoint) under its own parent run.

    ``trainable`` replaces :func:`sweeps.launch.trainable` as each trial's function (same
    signature and reports); only for measuring the sweep machinery with trials of known
    cost (``benchmarks/sweep_overhead.py``) and for a fault a real trial does not have on cue
    (``tests/e2e/test_faults.py``: running out of memory).
    """
    found = find_launch(sweep) if resume else None  # before Ray starts: nothing to resume is bad input
    start_driver(sweep, address, printer)  # before any MLflow run exists: a bad address leaves nothing behind
    tracker = Tracker(tracking_uri, sweep)
    if found is not None:
        folder, launch = found
        tracker.reopen_parent(launch.parent_run_id)
    else:
        run_name = f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder = Path(sweep.storage.path).resolve() / run_name
        launch = Launch(run_name, tracker.experiment_name, tracker.start_parent(launch=run_name), optuna_storage(sweep),
                        sweep.to_yaml(), tracking_uri=without_credentials(tracking_uri))
    try:  # from here a failure finishes the parent run FAILED: none is left RUNNING by a failed start
        logger = TrialLogger(sweep, tracker, printer)
        if found is None:
            launch.write(folder)  # resumable from now on (below: before Tune's state exists too)
            tracker.client.log_param(launch.parent_run_id, "optuna.study", f"{launch.run_name} in {launch.study_url}")
        else:
            logger.reattach()
            logger.say(f"resuming {launch.run_name}: {len(logger.mirror.runs)} trials already in MLflow")
            for line in mend_torn_state(folder):  # a launch killed while Tune copied its state
                logger.say(line)
        base = sweep.default_trial.seed  # one clean model per replicate seed
        for seed, clean in zip(range(base, base + sweep.search.replicates),
                               clean_first(sweep, seeds=list(range(base, base + sweep.search.replicates)))):
            logger.say(f"clean model{f' (seed {seed})' if sweep.search.replicates > 1 else ''}: utility "
                       f"{clean['utility']:.3f} ({'from the cache' if clean['cached'] else 'trained'})")
        for reference in references_first(sweep):
            logger.say(f"filters' reference model ({reference['pairs']:,} trusted pairs): utility "
                       f"{reference['utility']:.3f} ({'from the cache' if reference['cached'] else 'trained'})")
        objectives = list(sweep.search.objectives)
        if found is None or not tune.Tuner.can_restore(str(folder)):
            # a new launch, or one stopped before Tune wrote its state: Tune starts afresh under the
            # launch's own parent run and study
            tuner(sweep, _searcher(sweep, launch.run_name, launch.study_url), trial_count(sweep), logger,
                  launch.run_name, objectives, trainable=trainable).fit()
        else:
            restore(sweep, folder, logger, objectives, trainable=trainable).fit()
    except BaseException:
        tracker.finish_parent(None, status="FAILED")
        raise
    synced = logger.catch_up(folder)
    rows = logger.rows()  # the logger recorded every trial's outcome as it happened
    if synced:
        try:
            tracker.finish_parent(summary_csv(rows, sweep), note=sweep_note(sweep, rows, launch.run_name))
        except TRACKING_ERRORS:
            synced = False
    if not synced:
        printer(f"MLflow is unreachable: the results are kept in {folder}; when it is back, run\n"
                f"  poisonsweep sync {folder}")
    launch.finished = synced
    launch.write(folder)
    return SweepOutcome(tracker.experiment_id, launch.parent_run_id, tracking_uri, rows, launch.run_name,
                        launch.study_url, synced, str(folder))


def find_launch(sweep: SweepConfig) -> tuple[Path, Launch]:
    """The sweep's latest launch in ``storage.path`` that did not finish, for ``--resume``."""
    storage = Path(sweep.storage.path).resolve()
    # a launch folder is "<name>-YYYYmmdd-HHMMSS": sweep "demo" must not take "demo-backdoor"'s launches
    own = re.compile(re.escape(sweep.name) + r"-\d{8}-\d{6}")
    launches = sorted(p for p in storage.glob(f"*/{LAUNCH_FILE}") if own.fullmatch(p.parent.name)) \
        if storage.is_dir() else []
    if not launches:
        raise ConfigError(f"--resume: no launch of sweep {sweep.name!r} in storage.path {storage}")
    folder = launches[-1].parent
    launch = Launch.read(folder)
    if launch.finished:
        raise ConfigError(f"--resume: the last launch of {sweep.name!r} ({folder.name}) finished; "
                          f"nothing to resume (run without --resume for a new launch)")
    if launch.config_yaml != sweep.to_yaml():
        changed = _changed_key(read_yaml(launch.config_yaml, str(folder / LAUNCH_FILE)), sweep.raw_full)
        raise ConfigError(f"--resume: {changed}: the config differs from the interrupted launch's "
                          f"({folder.name}); resume with the same config, or start a new launch")
    return folder, launch


def _changed_key(old: Any, new: Any, path: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return _changed_key(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    return path or "config"


def start_driver(sweep: SweepConfig, address: str | None, printer: Printer) -> None:
    """What every launch does first: quiet Tune and Optuna, start or join Ray, and refuse a
    trial no node can hold."""
    # Epoch results deliberately omit the objectives: a trial that fails after some
    # epochs must reach Optuna as FAIL, not as COMPLETE with its last epoch's values.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    for key, value in QUIET_ENV.items():  # our own progress lines replace Tune's reporter
        os.environ.setdefault(key, value)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    address = address or os.environ.get("RAY_ADDRESS")  # set inside `ray job submit` and on cluster nodes
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
        local_ray.init()


def _check_resources(sweep: SweepConfig, *, local: bool, printer: Printer) -> None:
    """A trial no node can hold would wait forever: refuse it locally, warn on a cluster
    (whose autoscaler may still add such a node)."""
    want = {"CPU": sweep.resources.cpu, "GPU": sweep.resources.gpu}
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if sweep.resources.fits(nodes):  # one process, or all of resources.workers
        return
    have = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes) or "no nodes"
    key = "resources.gpu" if want["GPU"] and not any(n.get("GPU", 0) >= want["GPU"] for n in nodes) else "resources.cpu"
    message = (f"{key}: no node can hold a trial of {want['CPU']:g} CPU and {want['GPU']:g} GPU "
               f"(nodes: {have})")
    if sweep.resources.workers > 1:
        message = (f"resources.workers: the nodes cannot hold the {sweep.resources.workers} workers of a trial, "
                   f"{want['CPU']:g} CPU and {want['GPU']:g} GPU each (nodes: {have})")
    if local:
        raise ConfigError(message)
    printer(f"warning: {message}; trials wait until the autoscaler adds such a node")


def _searcher(sweep: SweepConfig, run_name: str, study_url: str) -> BudgetLimiter:
    objectives = sweep.search.objectives
    seed = sweep.search.seed if sweep.search.seed is not None else sweep.default_trial.seed
    constraints = sweep.search.parsed_constraints
    searcher: Searcher = StudySearch(
        storage=optuna.storages.RDBStorage(study_url), study_name=run_name,
        space=define_by_run(sweep.dimensions), metric=list(objectives), mode=list(objectives.values()),
        sampler=make_sampler(sweep.search.sampler, seed),
        points_to_evaluate=sweep.initial_points() or None,
    )
    searcher.constraints = constraints
    if sweep.search.replicates > 1:
        searcher = Replicates(searcher, repeat=sweep.search.replicates, extra=[c.metric for c in constraints])
    return BudgetLimiter(searcher, max_concurrent=sweep.search.max_concurrent, epoch_budget=sweep.search.epoch_budget)


class BudgetLimiter(ConcurrencyLimiter):
    """Ray Tune's :class:`ConcurrencyLimiter`, which also suggests no trial once the sweep's trials
    have reached ``epoch_budget`` epochs in all (``search.epoch_budget``; 0: no budget): Tune then
    ends the sweep when the running trials end. A trial counts the last epoch it reported (a
    retried one does not count its epochs twice): Tune tells the searcher each result of a trial
    that goes on and, when a trial ends, its last (a stopped trial's: the rung's epoch). The
    counts are saved with the searcher's state (beside its file), so a resumed launch goes on
    counting."""

    def __init__(self, searcher: Searcher, max_concurrent: int, epoch_budget: int = 0) -> None:
        super().__init__(searcher, max_concurrent=max_concurrent)
        self.epoch_budget = epoch_budget
        self.epochs: dict[str, int] = {}  # trial id -> the last epoch it reported
        self.epochs_spent = 0             # their sum, kept as they change (suggest is called often)

    def _seen(self, trial_id: str, result: dict | None) -> None:
        result = result or {}
        epoch = result.get(EPOCH, (result.get("epoch_metrics") or {}).get("epoch"))
        if epoch is not None and int(epoch) > self.epochs.get(trial_id, 0):  # an epoch's report (a final one has none)
            self.epochs_spent += int(epoch) - self.epochs.get(trial_id, 0)
            self.epochs[trial_id] = int(epoch)

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.epoch_budget and self.epochs_spent >= self.epoch_budget:
            return Searcher.FINISHED
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._seen(trial_id, result)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self._seen(trial_id, result)
        super().on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        super().save(checkpoint_path)
        Path(f"{checkpoint_path}.epochs").write_text(json.dumps(self.epochs))

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        spent = Path(f"{checkpoint_path}.epochs")
        if spent.is_file():
            self.epochs = {k: int(v) for k, v in json.loads(spent.read_text()).items()}
            self.epochs_spent = sum(self.epochs.values())


class StudySearch(OptunaSearch):
    """Ray Tune's :class:`OptunaSearch`, which tells Optuna a trial whose last result lacks the
    objectives (one the scheduler stopped: its epoch reports do not hold them at the top level)
    as PRUNED, with no values, and a failed one as FAIL; and which gives Optuna each trial's
    ``search.constraints`` before telling it (``Trial.set_constraint``, named like the constraint,
    e.g. ``utility_drop <= 0.02``, stored in the trial's system attrs, where every constrained
    sampler reads them): from a finished trial's final metrics, a stopped one's last epoch; a metric
    the trial did not report counts as an infinite violation."""

    constraints: list[Constraint] = []

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self.constraints and trial_id in self._ot_trials and trial_id not in self._completed_trials and not error:
            for c in self.constraints:
                value = _metric(result or {}, c.metric)
                self._ot_trials[trial_id].set_constraint(str(c), c.value(float(value)) if finite(value) else math.inf)
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if result and not error and any(result.get(m) is None for m in metrics):
            # Ray's would tell [None, ...] as COMPLETE, which Optuna refuses (the trial stays RUNNING)
            result = None
        super().on_trial_complete(trial_id, result=result, error=error)


def _metric(result: dict, name: str) -> Any:
    """``name`` from a final result, else from an epoch's (flattened) report."""
    return result.get(name, result.get(f"epoch_metrics/{name}"))


class Replicates(Repeater):
    """Ray Tune's :class:`~ray.tune.search.Repeater` (each suggestion run ``repeat`` times,
    ``__trial_index__`` telling the replicate, which ``resolve`` adds to the seed) for several
    objectives: Ray's averages one metric (a list of them fails its ``metric in result``).

    The searcher is told the mean of each objective (and of each ``extra`` metric: the
    constraints') over the replicates that finished; the configuration as stopped (a result
    without the objectives: PRUNED) when the scheduler stopped a replicate, since the others'
    mean alone would stand for it; and a failure when none finished.
    """

    def __init__(self, searcher: Searcher, repeat: int = 1, extra: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(searcher, repeat=repeat, **kwargs)
        self.extra = list(extra or [])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False, **kwargs: Any) -> None:
        group = self._trial_id_to_group[trial_id]
        objectives = self.searcher.metric if isinstance(self.searcher.metric, list) else [self.searcher.metric]
        metrics = objectives + [m for m in getattr(self, "extra", []) if m not in objectives]
        ok = not error and result is not None and all(finite(result.get(m)) for m in metrics)
        stopped = not error and result is not None and result.get(STOPPED_KEY) == "stopped"
        group.report(trial_id, [float(result[m]) for m in metrics] if ok else "stopped" if stopped else math.nan)
        if not group.finished_reporting():
            return
        done = [s for s in group.scores() if isinstance(s, list)]
        if "stopped" in group.scores():
            self.searcher.on_trial_complete(group.primary_trial_id, result=None)  # PRUNED
        elif done:
            means = [float(sum(col) / len(col)) for col in zip(*done)]
            self.searcher.on_trial_complete(group.primary_trial_id, result=dict(zip(metrics, means)))
        else:
            self.searcher.on_trial_complete(group.primary_trial_id, result=None, error=True)


def tuner(sweep: SweepConfig, search_alg: Searcher | SearchAlgorithm, num_samples: int, logger: TrialLogger,
          run_name: str, objectives: list[str], param_space: dict[str, Any] | None = None, *,
          trainable: Trainable | None = None, clean_seeds: list[int] | None = None) -> tune.Tuner:
    """The Tuner of ``num_samples`` trials drawn by ``search_alg``, each a :func:`sweeps.launch.trainable`
    (with the sweep's resources, its CPU share as torch threads) mirrored into MLflow by ``logger``.
    ``clean_seeds``: the seeds whose trials are measured against a clean model (default: all).

    A trial that fails (an error, a lost worker or node) is retried ``search.max_failures``
    times, from its last per-epoch checkpoint (also one whose reused worker dies as it switches
    trials: :mod:`sweeps.launch._tune_fixes`)."""
    storage = Path(sweep.storage.path).resolve()
    scheduler = moasha(sweep, objectives)
    repair_reset_failures()
    defer_checkpoint_deletion()
    return tune.Tuner(
        _resourced_trainable(sweep, objectives, trainable, clean_seeds),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            reuse_actors=True,  # a new actor re-imports torch and open_clip: seconds per trial
        ),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=str(storage),
            # RungState first: it adds the scheduler's decision to the result the logger then sees
            callbacks=[RungState(scheduler), logger] if scheduler is not None else [logger],
            failure_config=tune.FailureConfig(max_failures=sweep.search.max_failures),
            # a trial's latest checkpoint; the one it supersedes is deleted once a state naming
            # the newer one is in storage (defer_checkpoint_deletion), so a resumed trial finds it
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )


def moasha(sweep: SweepConfig, objectives: list[str]) -> MOASHA | None:
    """The sweep's early-stopping scheduler (``search.scheduler``), or None (Tune's FIFO)."""
    if sweep.search.scheduler != "moasha":
        return None
    return MOASHA({k: sweep.search.objectives[k] for k in objectives}, grace_period=sweep.search.grace_period,
                  reduction_factor=sweep.search.reduction_factor, max_t=sweep.default_trial.train.epochs,
                  constraints=sweep.search.parsed_constraints, rung_metrics=sweep.search.rung_metrics)


def restore(sweep: SweepConfig, folder: Path, logger: TrialLogger, objectives: list[str], *,
            trainable: Trainable | None = None) -> tune.Tuner:
    """The interrupted launch in ``folder``, restored by Tune with its searcher's state: finished
    trials stay finished, unfinished ones go on from their last checkpoint, failed ones stay failed."""
    repair_reset_failures()
    defer_checkpoint_deletion()
    with restoring(logger):  # the pickled Tuner's callback unpickles as this launch's logger
        return tune.Tuner.restore(str(folder), trainable=_resourced_trainable(sweep, objectives, trainable),
                                  resume_unfinished=True, resume_errored=False, restart_errored=False)


def _resourced_trainable(sweep: SweepConfig, objectives: list[str], trainable: Trainable | None = None,
                         clean_seeds: list[int] | None = None) -> Any:
    cache_dir, threads = sweep.storage.cache_dir(), max(1, int(sweep.resources.cpu))
    extra = {"clean_seeds": clean_seeds} if clean_seeds is not None else {}
    return tune.with_resources(
        tune.with_parameters(trainable or trial_trainable, raw=sweep.raw, dims=sweep.dimensions, cache_dir=cache_dir,
                             threads=threads, objectives=objectives, every=sweep.search.checkpoint_every,
                             kept=tune_metrics(sweep, objectives), **trial_parameters(sweep.resources), **extra),
        trial_resources(sweep.resources),
    )


def tune_metrics(sweep: SweepConfig, objectives: list[str]) -> list[str]:
    """The metrics Tune's scheduler and searcher read from a trial's results, the only numbers the
    trial reports to Tune (:func:`sweeps._files.epoch_result`): the objectives, the metrics that rank
    them at rungs, the constraints' metrics."""
    search = sweep.search
    return list(dict.fromkeys([*objectives, *search.objectives, *search.rung_metrics.values(),
                               *(c.metric for c in search.parsed_constraints)]))


def clean_first(sweep: SweepConfig, seeds: list[int] | None = None) -> list[dict[str, Any]]:
    """Trains (or finds in the cache) the sweep's clean model before the trials start: the
    default point's, or one per seed of ``seeds``.

    Each runs as one Ray task with the CPUs of all concurrent trials (a running task
    beside the Tuner starves Tune's placement groups), so trials only load it.
    """
    largest_node = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
    cpus = max(sweep.resources.cpu, min(sweep.resources.cpu * sweep.search.max_concurrent, largest_node))
    task = train_clean.options(num_cpus=cpus, num_gpus=min(sweep.resources.gpu, 1) if sweep.resources.gpu else 0)
    default = sweep.default_trial
    configs = [default] if seeds is None else [default.model_copy(update={"seed": s}) for s in seeds]
    cache_dir, threads = sweep.storage.cache_dir(), max(1, int(cpus))
    return ray.get([task.remote(c.model_dump(mode="json"), cache_dir, threads) for c in configs])


def reference_configs(sweep: SweepConfig) -> list[TrialConfig]:
    """The trial configs whose data-side filter needs an offline reference model (no
    ``model.pretrained``), one per distinct model: the default point, every ``search.points``
    entry, and the default point under each data-side kind ``defense.kind`` may draw."""
    kinds = getattr(sweep.dimensions.get("defense.kind"), "choices", None) or []
    candidates = [sweep.resolve(point) for point in sweep.initial_points() or [{}]]
    candidates += [sweep.resolve({"defense.kind": kind}) for kind in kinds]
    found: dict[str, TrialConfig] = {}
    for config in candidates:
        if config.defense.stage == "data" and config.model.pretrained is None:  # the reference cache's key
            key = model_key(reference_config(config), trusted=getattr(config.defense, "reference_pairs", None))
            found.setdefault(key, config)
    return list(found.values())


def references_first(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Trains (or finds in the cache) the filters' reference models before the trials start, like
    :func:`clean_first` but with one trial's resources: otherwise the first filter trial trains
    one inside its own budget while the others wait on the cache's lock."""
    configs = reference_configs(sweep)
    if not configs:
        return []
    # with a trial's own CPUs and threads: the model is then the one a trial would have trained
    # (thread counts change float summation order, and the cache key leaves them out)
    task = train_reference.options(num_cpus=sweep.resources.cpu, num_gpus=min(sweep.resources.gpu, 1))
    threads = max(1, int(sweep.resources.cpu))
    return [ray.get(task.remote(c.model_dump(mode="json"), sweep.storage.cache_dir(), threads)) for c in configs]


