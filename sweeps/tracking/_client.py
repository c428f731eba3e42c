"""MLflow logging from the driver: one parent run per launch, one child run per trial.

Only the driver talks to MLflow, through one long-lived client and batched
writes, so a SQLite store sees a single writer and trials pay no logging cost.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from poison.config import ConfigError
from sweeps.config import REPLICATE, SweepConfig, flatten
from trainers.config import TrialConfig

ROLE_TAG = "poisonsweep.role"
MAX_PARAMS_PER_BATCH = 100


#: A trial run's tag, logged in the same batch as its final metrics: they are in MLflow.
FINAL_TAG = "poisonsweep.final_metrics"
#: Marks a trial run left by a killed driver whose trial Tune never recorded (see Tracker.abandon_trial).
LOST_TAG = "poisonsweep.lost"
#: The experiment tag by which MLflow 3's UI chooses an experiment's page, and the value (its
#: ``ExperimentKind.CUSTOM_MODEL_DEVELOPMENT``) that opens on the runs table, not the GenAI overview.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
#: Tags every run of one launch (parent and trials) with the launch's name: one search filter finds them all.
LAUNCH_TAG = "launch"
#: The tag MLflow's UI shows as a run's description (Markdown).
NOTE_TAG = "mlflow.note.content"
#: A trial run's number within its launch (its run name starts with it, zero-padded).
NUMBER_TAG = "trial_number"
#: A trial the early-stopping scheduler stopped: the rung's epoch (its metrics are that epoch's, not final).
STOPPED_TAG = "stopped_at_epoch"
#: Every rung decision of a trial, as JSON: [{"epoch", "decision", "place", "of", "kept", "front", "feasible"}].
RUNGS_TAG = "rung_decisions"
#: The tracking URI schemes MLflow 3 keeps runs in: a database (SQLAlchemy's dialects, with or
#: without ``+driver``), a tracking server, Databricks.
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def check_tracking_uri(uri: str, source: str) -> str:
    """``uri`` when MLflow 3 can keep runs there; else a ConfigError naming ``source`` (the flag,
    variable or key it came from), raised before Ray or MLflow starts.

    >>> check_tracking_uri("postgresql+psycopg2://u@db/mlflow", "--tracking-uri")
    'postgresql+psycopg2://u@db/mlflow'
    """
    scheme = urlsplit(uri).scheme.split("+")[0].lower()
    if scheme in TRACKING_SCHEMES:
        return uri
    if scheme in ("", "file") or len(scheme) == 1:  # a path (C: is a drive letter)
        raise ConfigError(f"{source}: {redact(uri)!r} is a file store, which MLflow 3 no longer writes; "
                          f"use a database (sqlite:///path/mlflow.db) or a tracking server (http://host:5000)")
    raise ConfigError(f"{source}: {redact(uri)!r}: MLflow cannot keep runs at a {scheme}:// URI; "
                      f"use one of {', '.join(s + '://' for s in TRACKING_SCHEMES)}")


def tracking_uri(cli_uri: str | None, sweep: SweepConfig | None, storage_path: str | None = None) -> str:
    """``--tracking-uri``, then ``MLFLOW_TRACKING_URI``, then the config's, then SQLite in storage;
    an unsupported one is refused naming where it came from (:func:`check_tracking_uri`)."""
    if cli_uri:
        return check_tracking_uri(cli_uri, "--tracking-uri")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return check_tracking_uri(os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI")
    if sweep is not None and sweep.tracking.uri:
        return check_tracking_uri(sweep.tracking.uri, "tracking.uri")
    folder = Path(storage_path or (sweep.storage.path if sweep else "poisonsweep_results")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def without_credentials(uri: str) -> str:
    """``uri`` without ``user:password@``: what may be written to a file.

    >>> without_credentials("https://ana:hunter2@mlflow.example.org:8443/x")
    'https://mlflow.example.org:8443/x'
    """
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def redact(uri: str) -> str:
    """``uri`` as it may be printed: a password in it (``https://user:pw@host``) replaced by ``***``."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def trial_tags(config: TrialConfig) -> dict[str, str]:
    """The DESIGN.md tags of a trial run."""
    return {
        "attack": config.attack.kind, "trigger": config.attack.trigger_name,
        "modality": config.attack.modality_tag, "defense": config.defense.kind,
        "dataset": config.data.dataset, "model": config.model.arch, "seed": str(config.seed),
    }


def trial_name(number: int, config: TrialConfig) -> str:
    """A trial run's name: its number (unique within the launch), attack·trigger, poison count,
    defense and seed; no quote, so a search filter can name it.

    >>> from sweeps.config import validate_config
    >>> sweep = validate_config({"attack": {"kind": "backdoor", "target": "blue circle", "poison_count": 12,
    ...                          "trigger": {"kind": "patch"}}}, check_data=False)
    >>> trial_name(7, sweep.default_trial)
    '007 backdoor·patch n=12 none s0'
    """
    attack = config.attack
    trigger = "" if attack.trigger_name == "none" else f"·{attack.trigger_name}"
    return f"{number:03d} {attack.kind}{trigger} n={attack.poison_count} {config.defense.kind} s{config.seed}"


def runs_path(experiment_id: str, *, launch: str | None = None, parent_id: str | None = None,
              objective: tuple[str, str] | None = None) -> str:
    """The MLflow UI's page (the part after the server's address) of an experiment's runs, filtered
    to one launch: its parent and trials by their ``launch`` tag, else the trials under ``parent_id``;
    sorted by ``objective`` (a metric and ``max`` or ``min``: best first), which also lists the
    trials in the table itself rather than folded under their parent.
    ``workflowType=machine_learning`` picks the UI's "Model training" side, which MLflow 3.17 takes
    from the address (else from the browser's last choice, at first "GenAI"), not from the
    experiment's kind.

    >>> runs_path("3", launch="demo-20261206-101500")
    '#/experiments/3/runs?workflowType=machine_learning&searchFilter=tags.launch%20%3D%20%27demo-20261206-101500%27'
    >>> runs_path("3", parent_id="ab12", objective=("attack_success", "max")).split("&", 2)[2]
    'orderByKey=metrics.%60attack_success%60&orderByAsc=false'
    """
    query = (f"tags.{LAUNCH_TAG} = '{launch}'" if launch
             else f"tags.mlflow.parentRunId = '{parent_id}'" if parent_id else "")
    order = (f"&orderByKey={quote(f'metrics.`{objective[0]}`', safe='')}&orderByAsc={str(objective[1] == 'min').lower()}"
             if objective else "")
    return (f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            + (f"&searchFilter={quote(query, safe='')}" if query else "") + order)


def latest_launch_path(client: MlflowClient, experiment: str | None) -> str | None:
    """:func:`runs_path` of the latest launch in ``experiment`` (default: of any experiment);
    the experiment's runs page when it has no launch; None when the store has no such experiment
    or (no ``experiment`` given) no launch."""
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return None
        ids = [found.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(ids, filter_string=f"tags.`{ROLE_TAG}` != 'trial'",
                                 order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if not parents:
        return runs_path(ids[0]) if experiment else None
    parent = parents[0]
    first = parent.data.params.get("search.objectives", "").split(",")[0].split(":")  # the sweep's first objective
    return runs_path(parent.info.experiment_id, launch=parent.data.tags.get(LAUNCH_TAG), parent_id=parent.info.run_id,
                     objective=(first[0], first[1]) if len(first) == 2 else None)


class Tracker:
    """Writes a sweep into MLflow; every call is a single batched request."""

    def __init__(self, uri: str, sweep: SweepConfig) -> None:
        self.uri, self.sweep = uri, sweep
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_name = sweep.tracking.experiment or sweep.name
        self.experiment_id = self._experiment(self.experiment_name)
        self.parent_id: str | None = None
        self.launch: str | None = None

    def _experiment(self, name: str) -> str:
        """The sweep's experiment (created on the first launch), tagged to open on its runs."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # keep artifacts beside the local database
            location = (Path(self.uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / name).as_uri()
        return self.client.create_experiment(name, artifact_location=location,
                                             tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})

    def start_parent(self, *, role: str = "sweep", params: dict[str, Any] | None = None,
                     launch: str | None = None) -> str:
        """The launch's parent run, named ``<name>-<role>``: its config YAML and ``params``
        (default: the search settings); ``launch`` (the launch's name) tags it and its trials."""
        self.launch = launch
        run = self.client.create_run(self.experiment_id, run_name=f"{self.sweep.name}-{role}",
                                     tags={ROLE_TAG: role, **({LAUNCH_TAG: launch} if launch else {})})
        self.parent_id = run.info.run_id
        self._batch(self.parent_id, params=self._search_params() if params is None else params)
        self.client.log_text(self.parent_id, self.sweep.to_yaml(), "config.yaml")
        return self.parent_id

    def reopen_parent(self, run_id: str) -> None:
        """Continues a launch's parent run (``run --resume``, ``sync``)."""
        self.parent_id = run_id
        run = self.client.get_run(run_id)
        self.launch = run.data.tags.get(LAUNCH_TAG)
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    def _search_params(self) -> dict[str, Any]:
        search = self.sweep.search
        return {"search.sampler": search.sampler, "search.num_samples": search.num_samples,
                "search.max_concurrent": search.max_concurrent,
                "search.objectives": ",".join(f"{k}:{v}" for k, v in search.objectives.items()),
                "search.dimensions": ",".join(self.sweep.dimensions) or "none",
                "search.scheduler": search.scheduler, "search.constraints": "; ".join(search.constraints) or "none",
                "resources.cpu": self.sweep.resources.cpu, "resources.gpu": self.sweep.resources.gpu}

    def start_trial(self, trial_id: str, config: TrialConfig, values: dict[str, Any], *,
                    number: int | None = None) -> str:
        """A trial's run under the parent, named by :func:`trial_name` when it has a ``number``."""
        tags = {ROLE_TAG: "trial", "trial_id": trial_id, **trial_tags(config)}
        if self.parent_id:
            tags["mlflow.parentRunId"] = self.parent_id
        if self.launch:
            tags[LAUNCH_TAG] = self.launch
        if number is not None:
            tags[NUMBER_TAG] = str(number)
        name = trial_name(number, config) if number is not None else trial_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        params = flatten(config.to_dict())
        # a drawn value as the config holds it, in its field's type (an integer drawn for a float
        # field is logged 4.0 in both places)
        params.update({f"search.{'replicate' if k == REPLICATE else k}": params.get(k, v) for k, v in values.items()})
        self._batch(run.info.run_id, params=params)
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int, tags: dict[str, str] | None = None) -> None:
        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
        labels = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        if rows or labels:
            self.client.log_batch(run_id, metrics=rows, tags=labels)

    def log_final(self, run_id: str, metrics: dict[str, Any], step: int, tags: dict[str, str] | None = None) -> None:
        """A finished trial's final metrics and tags in one batch (one request), marked by
        :data:`FINAL_TAG` in that same batch: a replay after a crash that finds the tag logs none
        of them again."""
        self.log_metrics(run_id, metrics, step, {**(tags or {}), FINAL_TAG: "1"})

    def finish_trial(self, run_id: str, artifacts: list[Path]) -> None:
        """After :meth:`log_final`: the trial's artifacts (the same paths again on a replay) and its status."""
        for path in artifacts:
            self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, "FINISHED")

    def fail_trial(self, run_id: str, error: str) -> None:
        self.client.set_tag(run_id, "error", error.strip().splitlines()[-1][:500] if error.strip() else "error")
        if error:
            self.client.log_text(run_id, error, "error.txt")
        self.client.set_terminated(run_id, "FAILED")

    def abandon_trial(self, run_id: str) -> None:
        """A run whose trial Tune never recorded (the driver was killed just after it started):
        KILLED, with :data:`LOST_TAG` saying why; Tune drew that point again as another trial."""
        self.client.set_tag(run_id, LOST_TAG, "the driver was killed before Tune recorded this trial; "
                                              "the resumed launch drew its point again as another trial")
        self.client.set_terminated(run_id, "KILLED")

    def rung_decisions(self, run_id: str, decisions: list[dict[str, Any]]) -> None:
        self.client.set_tag(run_id, RUNGS_TAG, json.dumps(decisions))

    def stop_trial(self, run_id: str, epoch: int, decisions: list[dict[str, Any]]) -> None:
        """A trial the scheduler stopped at rung ``epoch``: KILLED (it did not finish; its metrics
        are its epochs'), with :data:`STOPPED_TAG` and its decisions."""
        self.client.log_batch(run_id, tags=[RunTag(STOPPED_TAG, str(epoch)), RunTag(RUNGS_TAG, json.dumps(decisions))])
        self.client.set_terminated(run_id, "KILLED")

    def unstop_trial(self, run_id: str) -> None:
        """A run marked stopped whose trial then went on (the decision was lost with a killed
        driver; the resumed trial finished): no longer tagged stopped."""
        if STOPPED_TAG in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, STOPPED_TAG)

    def finish_parent(self, summary_csv: str | None, status: str = "FINISHED", note: str | None = None) -> None:
        """Ends the parent run: its ``trials.csv`` and ``note`` (Markdown, the run's description)."""
        if self.parent_id is None:
            return
        if summary_csv:
            self.client.log_text(self.parent_id, summary_csv, "trials.csv")
        if note:
            self.client.set_tag(self.parent_id, NOTE_TAG, note)
        self.client.set_terminated(self.parent_id, status)

    def _batch(self, run_id: str, *, params: dict[str, Any]) -> None:
        items = [Param(k, param_value(v)) for k, v in params.items()]
        for s in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[s : s + MAX_PARAMS_PER_BATCH])


def param_value(value: Any) -> str:
    """``value`` as an MLflow param: cut to MLflow's limit with a note where it is longer (a
    ``data.classes`` list of ImageNet's 1,000 names runs to 12,000 characters); the whole config
    is the parent run's ``config.yaml``.

    Example:
        >>> len(param_value("x" * 7000)) == MAX_PARAM_VAL_LENGTH, param_value(["dog", "cat"])
        (True, "['dog', 'cat']")
    """
    text = str(value)
    if len(text) <= MAX_PARAM_VAL_LENGTH:
        return text
    note = f" ... ({len(text):,} characters; all in the parent run's config.yaml)"
    return text[: MAX_PARAM_VAL_LENGTH - len(note)] + note


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["Tracker", "latest_launch_path", "redact", "runs_path", "tracking_uri", "trial_name", "trial_tags"]
