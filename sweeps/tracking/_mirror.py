"""MLflow as a mirror of Tune's record of a sweep.

Ray Tune's storage (``storage.path/<launch>/``) is where a sweep's results are kept for
good: every trial's config, its per-epoch reports (``result.json``) and its final
checkpoint (metrics, poison plan, resolved config). MLflow is written from it, live while
the sweep runs, and :class:`Mirror` can bring MLflow up to that record at any time,
idempotently: it finds each trial's child run by its ``trial_id`` tag, creates only the
runs that are missing, logs only the epochs whose steps are missing, and finishes or fails
only the runs still open. So a tracking server that was down for a while, a driver killed
between a trial's end and its MLflow write, or a resumed launch end with exactly one
complete child run per trial (``poisonsweep sync`` runs it by hand).
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from mlflow.exceptions import MlflowException

from poison import plan_hash
from poison.config import ConfigError
from poison.manifest import atomic_write
from sweeps._files import CONFIG_FILE, DECISION_KEY, LAUNCH_FILE, METRICS_FILE, PLAN_FILE, reported_epoch
from sweeps.config import SweepConfig
from sweeps.tracking._client import FINAL_TAG, LOST_TAG, NUMBER_TAG, Tracker

#: what an unreachable or failing tracking store raises through MlflowClient
TRACKING_ERRORS = (MlflowException, OSError)


@dataclass
class Launch:
    """What a launch's Tune folder says about its MLflow side (``poisonsweep.json``)."""

    run_name: str
    experiment: str
    parent_run_id: str
    study_url: str
    config_yaml: str
    finished: bool = False  # the launch ended with every trial in MLflow
    # the tracking store the launch wrote to, without credentials (which MLflow then takes from
    # MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD); None in launch files older than it
    tracking_uri: str | None = None

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(asdict(self), indent=1)
        atomic_write(folder / LAUNCH_FILE, lambda fh: fh.write(text.encode()))

    @classmethod
    def read(cls, folder: Path) -> Launch:
        """The launch file of ``folder``; a ConfigError names the file when it is not one (cut
        short, edited, another tool's)."""
        path = folder / LAUNCH_FILE
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
            return cls(**data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not a poisonsweep launch file ({type(err).__name__}: "
                              f"{str(err)[:120]}); it was cut short or edited") from None
        except TypeError:
            fields = ", ".join(f.name for f in dataclasses.fields(cls))
            raise ConfigError(f"{path}: not a poisonsweep launch file (expected a JSON object with "
                              f"{fields})") from None


@dataclass
class _Run:
    run_id: str
    number: int
    status: str = "RUNNING"
    steps: set[int] = field(default_factory=set)  # epochs already in MLflow
    logged: dict[int, dict[str, Any]] = field(default_factory=dict)  # the last epoch this process logged
    final: bool = False  # its final metrics are in MLflow (the run has FINAL_TAG)
    decisions: list[dict[str, Any]] = field(default_factory=list)  # the scheduler's, as tagged
    lost: bool = False  # marked as a trial Tune never recorded (LOST_TAG)


class Mirror:
    """Keeps one launch's child runs in MLflow equal to Tune's record of its trials."""

    def __init__(self, sweep: SweepConfig, tracker: Tracker) -> None:
        self.sweep, self.tracker = sweep, tracker
        self.runs: dict[str, _Run] = {}

    def load_existing(self) -> None:
        """Finds the child runs already in MLflow under the tracker's parent run (a resumed launch)."""
        client, query = self.tracker.client, f"tags.`mlflow.parentRunId` = '{self.tracker.parent_id}'"
        token = None
        while True:
            page = client.search_runs([self.tracker.experiment_id], filter_string=query, max_results=1000,
                                      page_token=token)
            for run in page:
                trial_id = run.data.tags.get("trial_id")
                if trial_id:
                    number = _run_number(run.data.tags.get(NUMBER_TAG), run.info.run_name or "", len(self.runs) + 1)
                    steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
                    self.runs[trial_id] = _Run(run.info.run_id, number, run.info.status, steps,
                                               final=FINAL_TAG in run.data.tags, lost=LOST_TAG in run.data.tags)
            token = page.token
            if not token:
                return

    # --- the live path: one call per Tune event ---

    def start(self, trial_id: str, values: dict[str, Any], number: int) -> _Run:
        if trial_id in self.runs:
            return self.runs[trial_id]
        run_id = self.tracker.start_trial(trial_id, self.sweep.resolve(values), values, number=number)
        self.runs[trial_id] = _Run(run_id, number)
        return self.runs[trial_id]

    def epoch(self, trial_id: str, metrics: dict[str, Any]) -> None:
        run, step = self.runs[trial_id], int(metrics["epoch"])
        if step in run.steps:
            return  # a restarted trial reports no epoch twice, but a resumed mirror may see one again
        self.tracker.log_metrics(run.run_id, metrics, step=step)
        run.steps.add(step)
        run.logged = {step: metrics}  # only the last epoch is needed (complete)

    def complete(self, trial_id: str, folder: Path, last_step: int, trial_dir: Path) -> dict[str, float]:
        """Logs a finished trial's final metrics (those its last epoch did not already log),
        plan and config from its final checkpoint ``folder``; returns the metrics."""
        run = self.runs[trial_id]
        metrics = json.loads((folder / METRICS_FILE).read_text())
        if run.status == "FINISHED":
            return metrics
        if run.status == "KILLED":  # shown stopped by a decision a killed driver lost: the trial went on
            self.tracker.unstop_trial(run.run_id)
        seen = self._last_epoch(trial_id, trial_dir, last_step)
        new = {k: v for k, v in metrics.items() if seen.get(k) != v}
        plan = pq.read_table(folder / PLAN_FILE)
        if not run.final:  # once, even when what follows fails and is replayed
            self.tracker.log_final(run.run_id, new, last_step, tags={"plan_hash": plan_hash(plan)})
            run.final = True
        self.tracker.finish_trial(run.run_id, [folder / PLAN_FILE, folder / CONFIG_FILE])
        run.status = "FINISHED"
        return metrics

    def rungs(self, trial_id: str, decisions: list[dict[str, Any]]) -> None:
        """The scheduler's decisions on the trial so far, as a tag of its run."""
        run = self.runs[trial_id]
        if run.status == "RUNNING" and decisions and decisions != run.decisions:
            self.tracker.rung_decisions(run.run_id, decisions)
            run.decisions = list(decisions)

    def stop(self, trial_id: str, decisions: list[dict[str, Any]]) -> None:
        """A trial the scheduler stopped (its last decision): KILLED, tagged with the rung's epoch."""
        run = self.runs[trial_id]
        if run.status != "RUNNING":
            return
        self.tracker.stop_trial(run.run_id, int(decisions[-1]["epoch"]), decisions)
        run.status, run.decisions = "KILLED", list(decisions)

    def fail(self, trial_id: str, error: str) -> None:
        run = self.runs.get(trial_id)
        if run is None or run.status == "FAILED":
            return
        self.tracker.fail_trial(run.run_id, error)
        run.status = "FAILED"

    # --- catching up from Tune's storage ---

    def close_lost(self, known: set[str]) -> int:
        """Marks lost (KILLED, :data:`LOST_TAG`) every unfinished run whose trial is not among
        ``known`` (Tune's record of the launch): a trial started just before the driver was
        killed, which Tune's saved state never held, also one the scheduler stopped in that time
        (its run already KILLED). Returns how many."""
        lost = [r for t, r in self.runs.items() if t not in known and not r.lost and r.status in ("RUNNING", "KILLED")]
        for run in lost:
            self.tracker.abandon_trial(run.run_id)
            run.status, run.lost = "KILLED", True
        return len(lost)

    def catch_up(self, trial: Any, number: int, last_step: int, error: Callable[[Any], str]) -> dict[str, float] | None:
        """Brings one Tune trial's run up to Tune's record (creating it if missing); returns its
        final metrics when it finished."""
        run = self.start(trial.trial_id, dict(trial.config), number)
        for metrics in epoch_reports(trial_folder(trial)):
            self.epoch(trial.trial_id, metrics)
        decisions = rung_decisions(trial)
        self.rungs(trial.trial_id, decisions)
        if trial.status == "TERMINATED" and trial.checkpoint is not None:
            with trial.checkpoint.as_directory() as folder:
                if (Path(folder) / METRICS_FILE).is_file():
                    return self.complete(trial.trial_id, Path(folder), last_step, trial_folder(trial))
        if trial.status == "TERMINATED" and stopped(decisions):  # the scheduler stopped it: no final metrics
            self.stop(trial.trial_id, decisions)
            return None
        if trial.status == "ERROR":
            self.fail(trial.trial_id, error(trial))
        return None if run.status != "FINISHED" else {}

    def _last_epoch(self, trial_id: str, trial_dir: Path, last_step: int) -> dict[str, Any]:
        """The metrics the trial's last epoch reported (already in MLflow at ``last_step``): as this
        process logged them, else (a run an earlier driver logged) from Tune's ``result.json``,
        which Tune may not have flushed yet when the trial completes."""
        run = self.runs[trial_id]
        if last_step not in run.steps:
            return {}
        if last_step in run.logged:
            return run.logged[last_step]
        reports = [m for m in epoch_reports(trial_dir) if int(m["epoch"]) == last_step]
        return reports[-1] if reports else {}


def _run_number(tag: str | None, name: str, fallback: int) -> int:
    """A trial run's number: its tag, else from its name (``007 backdoor...``, or ``trial-007`` as
    older launches named it), else ``fallback``."""
    for text in (tag or "", name.split(" ", 1)[0], name.rsplit("-", 1)[-1]):
        if text.isdigit():
            return int(text)
    return fallback


def trial_folder(trial: Any) -> Path:
    return Path(trial.storage.trial_fs_path)


def epoch_reports(trial_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch reports a trial made, from Tune's ``result.json`` (complete lines only)."""
    path = Path(trial_dir) / "result.json"
    if not path.is_file():
        return []
    reports = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line still being written
            continue
        epoch = reported_epoch(row)
        if epoch:
            reports.append(epoch)
    return reports


def rung_decisions(trial: Any, live: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The scheduler's decisions on ``trial``, by epoch: from Tune's ``result.json``, its last
    result (which Tune may not have flushed to the file yet) and ``live`` (those seen as they came)."""
    found: dict[int, dict[str, Any]] = {}
    path = trial_folder(trial) / "result.json"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line still being written
                continue
    rows.append(getattr(trial, "last_result", None) or {})
    for row in rows:
        decision = row.get(DECISION_KEY) if isinstance(row, dict) else None
        if isinstance(decision, dict) and "epoch" in decision:
            found.setdefault(int(decision["epoch"]), decision)
    for decision in live or []:
        found.setdefault(int(decision["epoch"]), decision)
    return [found[e] for e in sorted(found)]


def stopped(decisions: list[dict[str, Any]]) -> bool:
    return bool(decisions) and decisions[-1].get("decision") == "stopped"


def has_final(trial: Any) -> bool:
    """Whether the trial's checkpoint is its final one (it finished, whatever a lost decision said)."""
    if trial.checkpoint is None:
        return False
    with trial.checkpoint.as_directory() as folder:
        return (Path(folder) / METRICS_FILE).is_file()


class Backoff:
    """After a tracking error, live writes pause for ``seconds`` (Tune's event loop must not
    wait on a dead server); the trials' records stay in Tune's storage meanwhile."""

    def __init__(self, seconds: float = 15.0) -> None:
        self.seconds, self.until, self.failures = seconds, 0.0, 0

    def ready(self) -> bool:
        return time.monotonic() >= self.until

    def failed(self) -> None:
        self.failures += 1
        self.until = time.monotonic() + self.seconds


__all__ = ["Backoff", "Launch", "Mirror", "TRACKING_ERRORS", "epoch_reports", "has_final", "rung_decisions", "stopped"]
