"""poisonsweep's Python API, for notebooks and scripts: run a sweep, read its trials, its Pareto
front and its defense table back from MLflow as pandas DataFrames. The ``poisonsweep`` command is
a layer over these functions; ``import sweeps`` makes them available as ``sweeps.run``,
``sweeps.trials`` and so on.

- :func:`run` validates a config (a YAML file, its content as a dict, or a
  :class:`~sweeps.config.SweepConfig`) and runs the sweep through Ray Tune and Optuna into MLflow,
  returning a :class:`SweepResult`;
- :func:`minimal_budget` runs the minimal poison budget's sequential search;
- :func:`trials`, :func:`pareto` and :func:`defenses` read an experiment (a sweep's ``name``)
  from MLflow. They import neither torch nor Ray, and change nothing in MLflow unless asked (``log``).

Bad input raises :class:`poison.ConfigError` with one line naming the key, argument or file, before
Ray starts or anything is written.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from poison import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from sweeps.budget import BudgetOutcome
    from sweeps.config import SweepConfig
    from sweeps.tracking import TrialRow

@dataclass
class SweepResult:
    """What :func:`run` returns: where the sweep's results are, each trial's outcome as Ray Tune
    saw it, and methods reading the launch's trials back from MLflow."""

    experiment: str
    """The MLflow experiment (the config's ``tracking.experiment``, else its ``name``)."""
    parent_run_id: str
    """The launch's parent run; every trial run of the launch is its child."""
    tracking_uri: str = field(repr=False)
    """The MLflow tracking store the sweep wrote to."""
    config: SweepConfig = field(repr=False)
    """The validated config that ran."""
    rows: list[TrialRow] = field(repr=False)
    """One per trial: ``trial_id``, ``status`` (``FINISHED`` or ``FAILED``), the drawn ``values``,
    the final ``metrics``, the MLflow ``run_id`` and the ``error``."""
    synced: bool = True
    """Whether MLflow has every trial; when not (the tracking store failed), ``poisonsweep sync
    FOLDER`` writes them there later."""
    folder: str = field(default="", repr=False)
    """The launch's folder in Ray Tune's storage (``storage.path``)."""
    experiment_id: str = field(default="", repr=False)
    """The MLflow experiment's id."""
    launch: str = field(default="", repr=False)
    """The launch's name (``NAME-YYYYmmdd-HHMMSS``): its folder's name, its Optuna study, and the
    ``launch`` tag of its parent and trial runs."""

    @property
    def finished(self) -> int:
        """How many trials finished."""
        return sum(r.status == "FINISHED" for r in self.rows)

    @property
    def failed(self) -> int:
        """How many trials failed."""
        return len(self.rows) - self.finished

    def trials(self, *, finished: bool = False) -> pd.DataFrame:
        """This launch's trial runs: :func:`trials` with ``parent`` this launch's run."""
        return trials(self.experiment, tracking_uri=self.tracking_uri, parent=self.parent_run_id, finished=finished)

    def pareto(self, *, objectives: str | Mapping[str, str] | None = None, group_by: str | None = None,
               log: bool = False) -> pd.DataFrame:
        """This launch's Pareto front: :func:`pareto` over its trials, on the config's
        ``search.objectives`` unless ``objectives`` are given."""
        return pareto(self.experiment, objectives=objectives or self.config.search.objectives, group_by=group_by,
                      tracking_uri=self.tracking_uri, parent=self.parent_run_id, log=log)

    def defenses(self, *, log: bool = False) -> pd.DataFrame:
        """This launch's defense table: :func:`defenses` over its trials."""
        return defenses(self.experiment, tracking_uri=self.tracking_uri, parent=self.parent_run_id, log=log)


def load(config: str | Path | Mapping[str, Any] | SweepConfig, *,
         overrides: Iterable[str] | Mapping[str, Any] = ()) -> SweepConfig:
    """``config`` validated, with ``overrides`` applied first; what :func:`run` runs.

    ``config`` is the path of a sweep YAML, its content as a mapping (left unchanged), or a
    :class:`~sweeps.config.SweepConfig` (overrides apply to the YAML it was validated from).
    ``overrides`` are ``"key.path=value"`` strings, the value read as YAML (``--set``'s syntax),
    or a mapping such as ``{"search.num_samples": 4, "attack.trigger.size": {"choices": [3, 6]}}``.
    """
    from sweeps.config import SweepConfig, apply_override, load_config, validate_config

    items = _override_items(overrides)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config, items)
    if isinstance(config, SweepConfig):
        if not items:
            return config
        raw = copy.deepcopy(config.raw_full)
    elif isinstance(config, Mapping):
        raw = copy.deepcopy(dict(config))
    else:
        raise ConfigError(f"config: expected a file path, a mapping or a SweepConfig, not {type(config).__name__}")
    for item in items:
        apply_override(raw, item)
    return validate_config(raw)


def _override_items(overrides: Iterable[str] | Mapping[str, Any]) -> list[str]:
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]  # JSON is YAML
    if isinstance(overrides, str):
        return [overrides]
    items = list(overrides)
    bad = [item for item in items if not isinstance(item, str)]
    if bad:
        raise ConfigError(f"overrides: {bad[0]!r} is not a 'key.path=value' string")
    return items


def run(config: str | Path | Mapping[str, Any] | SweepConfig, *, overrides: Iterable[str] | Mapping[str, Any] = (),
        tracking_uri: str | None = None, address: str | None = None, resume: bool = False,
        printer: Callable[[str], None] | None = None) -> SweepResult:
    """Runs a sweep to the end, as ``poisonsweep run`` does, and returns where its results are.

    Args:
        config: the path of a sweep YAML, its content as a mapping, or a SweepConfig (see :func:`load`).
        overrides: ``"key.path=value"`` strings or a mapping of key paths to values, applied first.
        tracking_uri: the MLflow store; default ``$MLFLOW_TRACKING_URI``, then the config's
            ``tracking.uri``, then SQLite in ``storage.path``.
        address: a Ray cluster's address; default: start Ray on this machine (or join ``$RAY_ADDRESS``).
        resume: go on with the sweep's last interrupted launch (same config).
        printer: called with each progress line (a trial's epoch, a failure); default ``print``.

    The whole config is checked before Ray starts: bad input raises ConfigError. A failed trial is
    recorded as failed (``SweepResult.rows``, MLflow), never raised.
    """
    from sweeps.tracking import tracking_uri as resolve_uri

    sweep = load(config, overrides=overrides)
    uri = resolve_uri(tracking_uri, sweep)
    from sweeps.launch import run_sweep  # Ray: only for a config that is valid

    outcome = run_sweep(sweep, tracking_uri=uri, address=address, resume=resume,
                        printer=printer or (lambda line: print(line, flush=True)))
    return SweepResult(experiment=sweep.tracking.experiment or sweep.name, parent_run_id=outcome.parent_run_id,
                       tracking_uri=uri, config=sweep, rows=outcome.rows, synced=outcome.synced, folder=outcome.folder,
                       experiment_id=outcome.experiment_id, launch=outcome.study_name)


def minimal_budget(config: str | Path | Mapping[str, Any] | SweepConfig, *, threshold: float,
                   confidence: float = 0.95, max_trials: int = 60, replicates: int = 3, rel_width: float = 0.5,
                   low: int | None = None, high: int | None = None, overrides: Iterable[str] | Mapping[str, Any] = (),
                   tracking_uri: str | None = None, address: str | None = None,
                   printer: Callable[[str], None] | None = None) -> BudgetOutcome:
    """The minimal ``poison_count`` whose mean ``attack_success`` reaches ``threshold``, with a
    confidence interval: the sequential search of real trials of ``poisonsweep budget`` (same
    options; the config's default point gives the attack, data and recipe; ``low`` and ``high``
    default to ``attack.poison_count``'s bracket).

    Returns the search's outcome: ``estimate`` (``count``, ``low``, ``high``, ``status``: ``ok``,
    ``wide``, ``not-reached`` or ``below-low``, ``trials``), ``rate`` (the same as a
    poison_rate: estimate, low, high), ``rows`` (each trial), ``parent_run_id`` and
    ``tracking_uri``; ``sweeps.budget.summary(outcome)`` is the text the command prints. The
    first line ``printer`` gets names the bracket and the store. Bad input raises ConfigError
    before Ray starts.
    """
    from sweeps.budget import BudgetOptions, prepare_budget, run_budget
    from sweeps.tracking import redact
    from sweeps.tracking import tracking_uri as resolve_uri

    options = BudgetOptions(threshold=threshold, confidence=confidence, max_trials=max_trials,
                            replicates=replicates, rel_width=rel_width, low=low, high=high)
    sweep, search = prepare_budget(load(config, overrides=overrides), options)
    uri = resolve_uri(tracking_uri, sweep)
    say = printer or (lambda line: print(line, flush=True))
    say(f"budget {sweep.name}: poison_count in [{search.low}, {search.high}] reaching attack_success "
        f">= {search.threshold}, at most {search.max_trials} trials, tracking {redact(uri)}")
    return run_budget(sweep, search, tracking_uri=uri, address=address, printer=say)


def trials(experiment: str, *, tracking_uri: str | None = None, parent: str | None = None,
           finished: bool = False) -> pd.DataFrame:
    """The experiment's trial runs, one row each, as MLflow holds them, in the order they started.

    Columns: ``run_id``, ``run_name``, ``status`` (``FINISHED``, ``FAILED``, ``RUNNING``, or
    ``KILLED``), ``start_time`` and ``end_time`` (UTC), then ``params.<key>`` (the trial's resolved
    config, flattened, as strings: ``params.attack.poison_count``), ``metrics.<name>`` (each
    metric's final value: ``metrics.attack_success``) and ``tags.<name>`` (``tags.attack``,
    ``tags.defense``, ``tags.pareto`` once analysed). The parent runs of launches are not rows.

    Args:
        experiment: the MLflow experiment, the sweep's ``name``.
        tracking_uri: the MLflow store (default as for :func:`run`, without a config).
        parent: only the trials of this launch (its parent run's id).
        finished: only the finished trials.
    """
    from sweeps.analysis import load_trials

    runs = load_trials(_client(tracking_uri), experiment, parent, finished=finished)[1]
    return runs.sort_values(["start_time", "run_name"], kind="stable").reset_index(drop=True)


def pareto(experiment: str, *, objectives: str | Mapping[str, str] | None = None, group_by: str | None = None,
           tracking_uri: str | None = None, parent: str | None = None, constraints: Iterable[str] | None = None,
           log: bool = False) -> pd.DataFrame:
    """The Pareto front of the experiment's finished trials, as ``poisonsweep pareto`` computes it.

    One row per configuration (trials with equal params but their ``seed``: replicates, averaged),
    the front's rows marked in the ``pareto`` column. Columns: ``group``, ``config`` (its params'
    values joined), per objective its mean (``attack_success``), ``_std``, ``_ci95`` (half-width
    of the mean's 95% interval), ``_low``, ``_high`` and ``_interval`` (``t``, or ``wilson`` for a
    success rate over runs), then ``replicates``, ``run_id`` (the runs, comma-separated) and
    ``pareto``. ``attrs["hypervolume"]`` holds each group's hypervolume, ``attrs["objectives"]``
    the objectives.

    Args:
        objectives: ``{"attack_success": "max", "utility": "max"}`` or ``"attack_success:max,utility:max"``;
            default attack_success max, utility max, poison_count min.
        group_by: a tag or param (``defense``): one front per value of it.
        tracking_uri: the MLflow store (default as for :func:`run`, without a config).
        parent: only the trials of this launch (its parent run's id).
        constraints: ``search.constraints`` entries (``"utility_drop <= 0.02"``): the front is then
            that of the configurations meeting them all (``feasible`` column); default: the
            launch's own (``parent``'s, else the latest launch's), ``[]`` for none.
        log: also tag every trial run ``pareto=true/false`` and log the front's CSV, plots and
            hypervolume to ``parent`` (default: the latest launch's run), as the command does.
    """
    from sweeps.analysis import latest_sweep_run, load_trials, pareto_front, record, sweep_constraints
    from sweeps.config import Constraint

    wanted = _objectives(objectives)
    client = _client(tracking_uri)
    experiment_id, runs = load_trials(client, experiment, parent)
    launch = parent or latest_sweep_run(client, experiment_id)
    texts = list(constraints) if constraints is not None else sweep_constraints(client, launch)
    front = pareto_front(runs, wanted, group_by, [Constraint.parse(text, f"--constraint {text!r}") for text in texts])
    if log:
        record(client, launch, front)
    front.table.attrs.update(hypervolume=front.hypervolume, objectives=front.objectives)
    return front.table


def _objectives(objectives: str | Mapping[str, str] | None) -> dict[str, str]:
    from sweeps.analysis import parse_objectives

    if objectives is None or isinstance(objectives, str):
        return parse_objectives(objectives)
    if not isinstance(objectives, Mapping) or not objectives:
        raise ConfigError(f"objectives: expected a mapping of metric names to 'max' or 'min', not {objectives!r}")
    for name, direction in objectives.items():
        if direction not in ("max", "min") or not isinstance(name, str) or not name:
            raise ConfigError(f"objectives: {name!r}: {direction!r} is not 'max' or 'min'")
    return dict(objectives)


def defenses(experiment: str, *, tracking_uri: str | None = None, parent: str | None = None,
             log: bool = False) -> pd.DataFrame:
    """Each attack configuration × defense configuration of the experiment's finished trials, as
    ``poisonsweep defenses`` prints it (replicate seeds averaged; see the analysis docs).

    Columns: ``attack``, ``attack_params`` and ``defense``, ``defense_params`` (the params that
    vary, as ``poison_count=250``), ``replicates``, ``run_id``; per metric (``attack_success``,
    ``utility``, ``utility_drop``, ``cost_seconds``, ...) its mean, ``_std``, ``_ci95``, ``_low``,
    ``_high``; ``attack_success_without`` and ``utility_without`` (with ``_ci95``: without the
    defense), ``baseline`` (``none`` or ``predefense``: where those come from),
    ``attack_success_removed``, ``cost_ratio`` (cost over the undefended training's) and
    ``pareto`` (on the attack_success min, utility max front among that attack configuration's
    defenses).

    Args:
        tracking_uri: the MLflow store (default as for :func:`run`, without a config).
        parent: only the trials of this launch (its parent run's id).
        log: also log the table's CSV and plot to ``parent`` (default: the latest launch's run).
    """
    from sweeps.analysis import load_defenses

    return load_defenses(_client(tracking_uri), experiment, parent, log=log)


def _client(uri: str | None) -> Any:
    from mlflow.tracking import MlflowClient

    from sweeps.tracking import tracking_uri

    return MlflowClient(tracking_uri(uri, None))
