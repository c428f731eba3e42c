"""The MLflow mirror's live path without Ray: a finished trial's final metrics are logged once,
beside what its last epoch already logged, whether or not Tune has flushed ``result.json``."""
import json

import pyarrow as pa
import pyarrow.parquet as pq

from sweeps._files import CONFIG_FILE, METRICS_FILE, PLAN_FILE
from sweeps.config._schema import validate_config
from sweeps.tracking._mirror import Mirror


class Recorder:
    """A Tracker that records what would go to MLflow."""

    def __init__(self) -> None:
        self.logged: list[tuple[str, int, dict]] = []

    def start_trial(self, trial_id, config, values, number):
        return f"run-{trial_id}"

    def log_metrics(self, run_id, metrics, step, tags=None):
        self.logged.append((run_id, step, dict(metrics)))

    def log_final(self, run_id, metrics, step, tags=None):
        self.logged.append((run_id, step, dict(metrics)))

    def finish_trial(self, run_id, artifacts):
        pass


def test_final_metrics_skip_what_the_last_epoch_logged_even_before_tune_writes_its_record(tmp_path):
    # under load a trial can complete before Tune has flushed its result.json; the mirror used to
    # read the last epoch from there, found nothing, and logged `utility` at step 1 a second time
    sweep = validate_config({"data": {"size": 64}, "search": {"objectives": {"utility": "max"}}}, check_data=False)
    tracker = Recorder()
    mirror = Mirror(sweep, tracker)
    mirror.start("t1", {}, 1)
    mirror.epoch("t1", {"epoch": 1, "loss": 4.7, "utility": 0.25, "attack_success": 0.5})
    final = tmp_path / "checkpoint"
    final.mkdir()
    (final / METRICS_FILE).write_text(json.dumps({"utility": 0.25, "attack_success": 0.5, "poison_count": 40,
                                                  "utility_drop": 0.01}))
    pq.write_table(pa.table({"index": [1, 2]}), final / PLAN_FILE)
    (final / CONFIG_FILE).write_text("seed: 0\n")
    trial_dir = tmp_path / "trial"  # no result.json in it yet
    trial_dir.mkdir()
    mirror.complete("t1", final, 1, trial_dir)
    at_step_1 = [name for _, step, metrics in tracker.logged if step == 1 for name in metrics]
    assert sorted(at_step_1) == sorted(["epoch", "loss", "utility", "attack_success", "poison_count", "utility_drop"])


def test_a_final_write_replayed_after_a_crash_logs_no_metric_twice(tmp_path):
    """The driver dies after a trial's final metrics are in MLflow but before the run is marked
    FINISHED; the resumed driver (a new mirror over the same parent run) completes it without
    logging any final metric again: they went in one batch with the tag that says so."""
    from mlflow.tracking import MlflowClient

    from sweeps.tracking._client import FINAL_TAG, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = validate_config({"name": "replay", "data": {"size": 64}, "search": {"objectives": {"utility": "max"}}},
                            check_data=False)
    final = tmp_path / "checkpoint"
    final.mkdir()
    (final / METRICS_FILE).write_text(json.dumps({"utility": 0.25, "poison_count": 40, "utility_drop": 0.01}))
    pq.write_table(pa.table({"index": [1, 2]}), final / PLAN_FILE)
    (final / CONFIG_FILE).write_text("seed: 0\n")
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()

    class Dies(Tracker):
        def finish_trial(self, run_id, artifacts):
            raise ConnectionError("the driver died here")

    first = Dies(uri, sweep)
    parent = first.start_parent()
    mirror = Mirror(sweep, first)
    mirror.start("t1", {}, 1)
    mirror.epoch("t1", {"epoch": 1, "loss": 4.7, "utility": 0.25})
    try:
        mirror.complete("t1", final, 1, trial_dir)
    except ConnectionError:
        pass
    again = Tracker(uri, sweep)
    again.reopen_parent(parent)
    resumed = Mirror(sweep, again)
    resumed.load_existing()
    assert resumed.runs["t1"].final and resumed.runs["t1"].status == "RUNNING"
    resumed.complete("t1", final, 1, trial_dir)
    client = MlflowClient(uri)
    run = client.get_run(resumed.runs["t1"].run_id)
    assert run.info.status == "FINISHED" and run.data.tags[FINAL_TAG] == "1"
    for name in ("poison_count", "utility_drop", "utility"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 1, name


def test_catching_up_a_stopped_trial_marks_it_stopped_not_finished(tmp_path):
    """``poisonsweep sync`` (or the end-of-launch catch-up) over a trial the scheduler stopped at
    epoch 1 of 3, whose MLflow run missed everything: its epoch goes in, the run ends KILLED with
    ``stopped_at_epoch`` and the decisions from Tune's result.json, and no final metrics."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from sweeps.tracking._client import FINAL_TAG, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = validate_config({"name": "stopped", "data": {"size": 64}, "search": {"objectives": {"utility": "max"}}},
                            check_data=False)
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    decision = {"epoch": 1, "decision": "stopped", "place": 2, "of": 2, "kept": 1, "front": 1, "feasible": True}
    (trial_dir / "result.json").write_text(json.dumps(
        {"epoch_metrics": {"epoch": 1, "loss": 4.7, "utility": 0.25}, "rung_decision": decision}) + "\n")
    trial = SimpleNamespace(trial_id="t1", config={}, status="TERMINATED", checkpoint=None, last_result={},
                            storage=SimpleNamespace(trial_fs_path=str(trial_dir)))
    tracker = Tracker(uri, sweep)
    tracker.start_parent()
    mirror = Mirror(sweep, tracker)
    assert mirror.catch_up(trial, 1, 3, lambda t: "") is None  # no final metrics
    run = MlflowClient(uri).get_run(mirror.runs["t1"].run_id)
    assert run.info.status == "KILLED" and run.data.tags["stopped_at_epoch"] == "1"
    assert json.loads(run.data.tags["rung_decisions"]) == [decision] and FINAL_TAG not in run.data.tags
    assert run.data.metrics == {"epoch": 1, "loss": 4.7, "utility": 0.25}
    # caught up again (a second sync): nothing changes
    mirror.catch_up(trial, 1, 3, lambda t: "")
    assert MlflowClient(uri).get_run(run.info.run_id).info.status == "KILLED"


def _lost_launch(tmp_path):
    """A launch's store, sweep, tracker, parent run and mirror, for the resume tests below."""
    from sweeps.tracking._client import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = validate_config({"name": "lost", "data": {"size": 64}, "search": {"objectives": {"utility": "max"}}},
                            check_data=False)
    tracker = Tracker(uri, sweep)
    return uri, sweep, tracker, tracker.start_parent(), Mirror(sweep, tracker)


def test_a_run_shown_stopped_whose_trial_went_on_ends_finished_and_untagged(tmp_path):
    """A driver killed in the second after a trial's stop decision (before Tune saved it): MLflow
    shows the run stopped, the resumed launch restores the trial as running and it finishes."""
    from mlflow.tracking import MlflowClient

    from sweeps.tracking._client import STOPPED_TAG, Tracker

    uri, sweep, tracker, parent, mirror = _lost_launch(tmp_path)
    mirror.start("t1", {}, 1)
    mirror.epoch("t1", {"epoch": 1, "loss": 4.7, "utility": 0.25})
    mirror.stop("t1", [{"epoch": 1, "decision": "stopped", "place": 2, "of": 2, "kept": 1}])
    resumed = Tracker(uri, sweep)
    resumed.reopen_parent(parent)
    again = Mirror(sweep, resumed)
    again.load_existing()
    assert again.runs["t1"].status == "KILLED"
    final = tmp_path / "checkpoint"
    final.mkdir()
    (final / METRICS_FILE).write_text(json.dumps({"utility": 0.3, "poison_count": 40}))
    pq.write_table(pa.table({"index": [1, 2]}), final / PLAN_FILE)
    (final / CONFIG_FILE).write_text("seed: 0\n")
    (tmp_path / "trial").mkdir()
    again.complete("t1", final, 3, tmp_path / "trial")
    run = MlflowClient(uri).get_run(again.runs["t1"].run_id)
    assert run.info.status == "FINISHED" and STOPPED_TAG not in run.data.tags and run.data.metrics["utility"] == 0.3


def test_a_trial_with_a_final_checkpoint_is_finished_whatever_a_lost_decision_said(tmp_path):
    """result.json holds a stop decision that a killed driver lost (Tune's state still had the trial
    running, and the resumed trial finished): the final checkpoint decides, the run ends FINISHED."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from sweeps.tracking._client import STOPPED_TAG, Tracker
    from sweeps.tracking._mirror import has_final

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = validate_config({"name": "late", "data": {"size": 64}, "search": {"objectives": {"utility": "max"}}},
                            check_data=False)
    trial_dir, final = tmp_path / "trial", tmp_path / "checkpoint"
    trial_dir.mkdir(), final.mkdir()
    stop = {"epoch": 1, "decision": "stopped", "place": 2, "of": 2, "kept": 1}
    (trial_dir / "result.json").write_text(json.dumps(
        {"epoch_metrics": {"epoch": 1, "loss": 4.7, "utility": 0.25}, "rung_decision": stop}) + "\n")
    (final / METRICS_FILE).write_text(json.dumps({"utility": 0.3, "poison_count": 40}))
    pq.write_table(pa.table({"index": [1, 2]}), final / PLAN_FILE)
    (final / CONFIG_FILE).write_text("seed: 0\n")

    @contextmanager
    def as_directory():
        yield str(final)

    trial = SimpleNamespace(trial_id="t1", config={}, status="TERMINATED", last_result={},
                            checkpoint=SimpleNamespace(as_directory=as_directory),
                            storage=SimpleNamespace(trial_fs_path=str(trial_dir)))
    assert has_final(trial)
    tracker = Tracker(uri, sweep)
    tracker.start_parent()
    mirror = Mirror(sweep, tracker)
    assert mirror.catch_up(trial, 1, 3, lambda t: "") == {"utility": 0.3, "poison_count": 40}
    run = MlflowClient(uri).get_run(mirror.runs["t1"].run_id)
    assert run.info.status == "FINISHED" and STOPPED_TAG not in run.data.tags


def test_a_resumed_logger_numbers_new_trials_after_the_highest_in_mlflow(tmp_path):
    """Trial numbers (the first part of the run names, ``007 ...``) go on after the highest an interrupted launch left
    in MLflow, even where MLflow lacks some (the server was down): none is reused."""
    from sweeps.tracking._client import Tracker
    from sweeps.tracking._logger import TrialLogger

    sweep = validate_config({"data": {"size": 64}, "search": {"objectives": {"utility": "max"}}}, check_data=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(uri, sweep)
    parent = first.start_parent()
    mirror = Mirror(sweep, first)
    mirror.start("a", {}, 1)
    mirror.start("c", {}, 3)  # trial 2 never reached MLflow
    again = Tracker(uri, sweep)
    again.reopen_parent(parent)
    logger = TrialLogger(sweep, again, lambda line: None)
    logger.reattach()
    assert [logger.number(t) for t in ("a", "c", "new", "newer", "new")] == [1, 3, 4, 5, 4]
    fresh = TrialLogger(sweep, again, lambda line: None)
    assert [fresh.number(t) for t in ("x", "y", "x")] == [1, 2, 1]


def test_tune_gets_only_the_numbers_it_compares_and_every_metric_reaches_the_mirror(tmp_path):
    """An epoch's report holds as numbers only the epoch and the metrics Tune's scheduler and
    searcher read (Tune keeps running statistics of every number, per trial, in the experiment
    state it rewrites at each save); all of the epoch's metrics travel as JSON text, which the
    mirror reads back from ``result.json`` as from a live result, as it reads an older launch's rows."""
    from ray.tune.utils import flatten_dict

    from sweeps._files import epoch_result, final_result, reported_epoch
    from sweeps.launch._driver import tune_metrics
    from sweeps.tracking._mirror import epoch_reports
    from tests.support import TINY

    sweep = validate_config({**TINY, "search": {**TINY["search"], "scheduler": "moasha", "constraints": [
        "utility_drop <= 0.02"], "rung_metrics": {"attack_success": "target_margin"}}}, check_data=False)
    kept = tune_metrics(sweep, list(sweep.search.objectives))
    assert kept == ["attack_success", "utility", "poison_count", "target_margin", "utility_drop"]
    metrics = {"epoch": 2, "loss": 1.5, "utility": 0.4, "attack_success": 0.1, "target_margin": -0.2,
               "poison_count": 40, "utility_drop": 0.01, "zeroshot_top5": 0.9, "i2t_r1": 0.3, "epoch_seconds": 4.0}
    result = epoch_result(metrics, kept)
    numbers = {k for k, v in flatten_dict(result).items() if isinstance(v, (int, float))}
    assert numbers == {f"epoch_metrics/{k}" for k in ("epoch", *kept)}
    assert reported_epoch(result) == metrics
    old = {"epoch_metrics": metrics}  # a row of a launch written before
    (tmp_path / "result.json").write_text(json.dumps(old) + "\n" + json.dumps(result) + "\n"
                                          + json.dumps(final_result({**metrics, "i2t_r5": 0.5}, kept)) + "\n")
    assert epoch_reports(tmp_path) == [metrics, metrics]
    assert final_result({**metrics, "i2t_r5": 0.5}, kept) == {k: metrics[k] for k in kept}
    assert epoch_result(metrics, None) == old and final_result(metrics, None) == metrics


def test_runs_of_trials_tune_never_recorded_are_marked_lost_once_also_a_stopped_one(tmp_path):
    """A driver killed within one state save of trials starting (and one of them being stopped at
    its rung): the resumed launch's record lacks them and draws their points again, so their runs
    are marked lost, the stopped one too; a finished or recorded run is left as it is."""
    from mlflow.tracking import MlflowClient

    from sweeps.tracking._client import LOST_TAG, STOPPED_TAG, Tracker

    uri, sweep, tracker, parent, mirror = _lost_launch(tmp_path)
    for number, trial in enumerate(("recorded", "running", "stopped", "finished"), 1):
        mirror.start(trial, {}, number)
        mirror.epoch(trial, {"epoch": 1, "loss": 4.7, "utility": 0.25})
    mirror.stop("stopped", [{"epoch": 1, "decision": "stopped", "place": 2, "of": 2, "kept": 1}])
    tracker.finish_trial(mirror.runs["finished"].run_id, [])
    resumed = Tracker(uri, sweep)
    resumed.reopen_parent(parent)
    again = Mirror(sweep, resumed)
    again.load_existing()
    assert again.close_lost({"recorded"}) == 2
    assert again.close_lost({"recorded"}) == 0  # once
    runs = {t: MlflowClient(uri).get_run(r.run_id) for t, r in again.runs.items()}
    assert {t: (r.info.status, LOST_TAG in r.data.tags) for t, r in runs.items()} == {
        "recorded": ("RUNNING", False), "running": ("KILLED", True), "stopped": ("KILLED", True),
        "finished": ("FINISHED", False)}
    assert runs["stopped"].data.tags[STOPPED_TAG] == "1"
    third = Mirror(sweep, Tracker(uri, sweep))
    third.tracker.reopen_parent(parent)
    third.load_existing()
    assert third.close_lost({"recorded"}) == 0  # the tag is read back: not marked again
