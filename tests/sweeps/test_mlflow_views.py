"""What a sweep looks like in MLflow, on a SQLite store without Ray: the experiment's kind, the
trial runs' names, the parent run's description, the address of a launch's runs, and every search
filter docs/ui.md gives, run against the store."""
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from mlflow.tracking import MlflowClient

from sweeps.config import validate_config
from sweeps.tracking import Tracker, TrialRow, latest_launch_path, runs_path, sweep_note, trial_name
from sweeps.tracking._mirror import _run_number
from tests.support import backdoor

DOC = Path(__file__).resolve().parents[2] / "docs" / "ui.md"
LAUNCH = "demo-backdoor-20261206-144528"  # the launch docs/ui.md's filters name
DOC_PARENT = "0f3c9a8e5b7d4e21a6c4d2b19e8f7a60"  # the parent run id docs/ui.md's filter names
SWEEP = {"name": "views", "data": {"size": 300, "test_size": 30},
         "attack": {**backdoor(), "poison_count": {"low": 5, "high": 50, "default": 12}}}


def _sweep(**changes):
    return validate_config({**SWEEP, **changes}, check_data=False)


@pytest.fixture
def store(tmp_path):
    """A launch of four trials: 1 and 2 without a defense, 3 (failed) and 4 with clean fine-tuning;
    1 and 4 on the front (tagged as ``poisonsweep pareto`` tags them)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep, defended = _sweep(), _sweep(defense={"kind": "clean-finetune"})
    tracker = Tracker(uri, sweep)
    parent = tracker.start_parent(launch=LAUNCH)
    outcomes = {1: (sweep, 12, {"attack_success": 0.95, "utility": 0.8}, "true"),
                2: (sweep, 40, {"attack_success": 0.5, "utility": 0.85}, "false"),
                3: (defended, 40, None, None),
                4: (defended, 40, {"attack_success": 0.92, "utility": 0.7}, "true")}
    runs, rows = {}, []
    for number, (config, count, metrics, pareto) in outcomes.items():
        values = {"attack.poison_count": count}
        trial = config.resolve(values)
        run_id = tracker.start_trial(f"t{number}", trial, values, number=number)
        runs[number] = run_id
        if metrics is None:
            tracker.fail_trial(run_id, "Traceback ...\nRuntimeError: out of memory")
            rows.append(TrialRow(f"t{number}", "FAILED", values, {}, run_id, "out of memory", trial_name(number, trial)))
            continue
        metrics = {**metrics, "poison_count": count}
        tracker.log_final(run_id, metrics, 1, tags={"pareto": pareto})
        tracker.finish_trial(run_id, [])
        rows.append(TrialRow(f"t{number}", "FINISHED", values, metrics, run_id, name=trial_name(number, trial)))
    tracker.finish_parent("trial_id\n", note=sweep_note(sweep, rows, LAUNCH))
    return MlflowClient(uri), tracker, parent, runs


def test_the_experiment_opens_on_its_runs_table_when_created_and_when_reused(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    older = client.create_experiment("views")  # made by a poisonsweep without the tag
    assert "mlflow.experimentKind" not in client.get_experiment(older).tags
    assert Tracker(uri, _sweep()).experiment_id == older
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    fresh = Tracker(uri, _sweep(name="fresh")).experiment_id
    assert client.get_experiment(fresh).tags["mlflow.experimentKind"] == "custom_model_development"


def test_trial_runs_are_named_after_what_they_are_and_carry_their_number_and_launch(store):
    client, tracker, parent, runs = store
    names = {n: client.get_run(r).info.run_name for n, r in runs.items()}
    assert names == {1: "001 backdoor·patch n=12 none s0", 2: "002 backdoor·patch n=40 none s0",
                     3: "003 backdoor·patch n=40 clean-finetune s0", 4: "004 backdoor·patch n=40 clean-finetune s0"}
    for number, run_id in runs.items():
        tags = client.get_run(run_id).data.tags
        assert tags["trial_number"] == str(number) and tags["launch"] == LAUNCH
        found = client.search_runs([tracker.experiment_id], filter_string=f"attributes.run_name = '{names[number]}'")
        assert [r.info.run_id for r in found] == [run_id]  # the name works in a filter
    assert client.get_run(parent).data.tags["launch"] == LAUNCH


def test_a_targeted_trial_has_no_trigger_in_its_name():
    sweep = _sweep(attack={"kind": "targeted", "target": "blue circle", "poison_count": 3}, seed=1)
    assert trial_name(3, sweep.default_trial) == "003 targeted n=3 none s1"


def test_a_resumed_launch_reads_each_runs_number_from_its_tag_or_its_name():
    assert _run_number("7", "anything", 99) == 7
    assert _run_number(None, "012 backdoor·patch n=12 none s0", 99) == 12
    assert _run_number(None, "trial-005", 99) == 5  # launches from before the readable names
    assert _run_number(None, "odd", 99) == 99


def test_the_parent_run_describes_the_sweep_and_its_non_dominated_trials(store):
    client, _, parent, _ = store
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert note.startswith(f"**views**, launch `{LAUNCH}`: attack backdoor; dimensions `attack.poison_count`.")
    assert "3 trials finished, 1 failed; objectives attack_success (max), utility (max), poison_count (min)." in note
    table = [line for line in note.splitlines() if line.startswith("| 00")]
    # 2 has a larger budget than 1 but a higher utility than both others: no trial dominates it;
    # 4 is dominated by 1 (less success, less utility, more poison)
    assert table == ["| 001 backdoor·patch n=12 none s0 | 0.95 | 0.8 | 12 |",
                     "| 002 backdoor·patch n=40 none s0 | 0.5 | 0.85 | 40 |"]
    assert f"`tags.launch = '{LAUNCH}'`" in note


def test_the_ui_address_shows_the_latest_launch_of_the_experiment_asked_for(store, tmp_path):
    client, tracker, parent, runs = store
    path = latest_launch_path(client, None)
    assert path == latest_launch_path(client, "views")
    page, query = path.split("?")
    assert page == f"#/experiments/{tracker.experiment_id}/runs"
    assert parse_qs(query)["workflowType"] == ["machine_learning"]  # the UI's "Model training" side
    found = client.search_runs([tracker.experiment_id], filter_string=parse_qs(query)["searchFilter"][0])
    assert {r.info.run_id for r in found} == {parent, *runs.values()}
    assert latest_launch_path(client, "no-such-sweep") is None
    assert latest_launch_path(MlflowClient(f"sqlite:///{tmp_path / 'empty.db'}"), None) is None


def test_every_filter_in_the_docs_finds_what_it_says(store):
    client, tracker, parent, runs = store
    expected = {  # the filter as docs/ui.md gives it -> the runs it must find
        f"tags.launch = '{LAUNCH}'": {"parent", 1, 2, 3, 4},
        f"tags.mlflow.parentRunId = '{DOC_PARENT}'": {1, 2, 3, 4},
        "tags.pareto = 'true'": {1, 4},
        "tags.defense = 'clean-finetune'": {3, 4},
        "params.defense.kind = 'clean-finetune'": {3, 4},
        "metrics.attack_success > 0.9": {1, 4},
        "metrics.attack_success > 0.9 and tags.defense != 'none'": {4},
        "metrics.poison_count <= 20": {1},
        "attributes.status = 'FAILED'": {3},
        "attributes.run_name LIKE '001 %'": {1},
    }
    documented = re.findall(r"^\| [^|]+ \| `([^`]+)` \|$", DOC.read_text(encoding="utf-8"), re.M)
    assert documented == list(expected)
    ids = {"parent": parent, **runs}
    for text, names in expected.items():
        found = client.search_runs([tracker.experiment_id], filter_string=text.replace(DOC_PARENT, parent))
        assert {r.info.run_id for r in found} == {ids[n] for n in names}, text


def test_a_launch_without_a_launch_tag_is_shown_by_its_parent_run():
    query = urlsplit(runs_path("3", parent_id="abc")).fragment.split("?")[1]
    assert parse_qs(query)["searchFilter"] == ["tags.mlflow.parentRunId = 'abc'"]


def test_poisonsweep_ui_prints_the_address_of_the_latest_launch(store, monkeypatch, capsys):
    import sweeps.cli

    client, tracker, _, _ = store
    started = []
    monkeypatch.setattr(sweeps.cli.subprocess, "call", lambda cmd, env: started.append(cmd) or 0)
    uri = tracker.uri
    assert sweeps.cli.main(["ui", "--tracking-uri", uri, "--experiment", "views", "--port", "5123"]) == 0
    out = capsys.readouterr().out
    assert f"the latest launch of views: http://127.0.0.1:5123/{latest_launch_path(client, 'views')}\n" in out
    assert started and started[0][started[0].index("--port") + 1] == "5123"
    assert sweeps.cli.main(["ui", "--tracking-uri", uri, "--experiment", "nope"]) == 2  # one line, no server
    assert capsys.readouterr().err == f"poisonsweep: error: --experiment: no experiment 'nope' in {uri}\n"
    assert len(started) == 1


def test_the_status_line_is_redrawn_on_a_terminal_and_a_plain_line_elsewhere():
    import io

    from sweeps.tracking import Console

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream in (Terminal(), io.StringIO()):
        console = Console(stream)
        console.status("0/2 trials done, 1 running, 0 failed")
        console.status("0/2 trials done, 1 running, 0 failed")
        console("[00:05] trial 1/2 epoch 1/1")
        console.status("1/2 trials done, 0 running, 0 failed, about 0:05 left")
        console.close()
        if isinstance(stream, Terminal):
            assert stream.getvalue() == (
                "\r\x1b[K0/2 trials done, 1 running, 0 failed" * 2
                + "\r\x1b[K[00:05] trial 1/2 epoch 1/1\n0/2 trials done, 1 running, 0 failed"
                + "\r\x1b[K1/2 trials done, 0 running, 0 failed, about 0:05 left\n")
        else:  # each status once, when it changes
            assert stream.getvalue() == ("0/2 trials done, 1 running, 0 failed\n[00:05] trial 1/2 epoch 1/1\n"
                                         "1/2 trials done, 0 running, 0 failed, about 0:05 left\n")


def test_the_status_line_counts_trials_and_estimates_the_time_left_at_the_pace_so_far(monkeypatch):
    from sweeps.tracking import TrialLogger, _logger

    logger = TrialLogger(_sweep(search={"num_samples": 4}), tracker=None, printer=print)
    assert logger.progress() == "0/4 trials done, 0 running, 0 failed"
    logger.first_start, logger.running, logger.ended = 1000.0, {"c"}, 2
    logger.finished = {"a": TrialRow("a", "FINISHED", {}, {}, None), "b": TrialRow("b", "FAILED", {}, {}, None)}
    monkeypatch.setattr(_logger.time, "monotonic", lambda: 1100.0)  # two ended in 100 s: 50 s each
    assert logger.progress() == "1/4 trials done, 1 running, 1 failed, about 1:40 left"
    logger.finished["d"] = TrialRow("d", "STOPPED", {}, {}, None, "stopped at epoch 1")
    logger.ended = 4  # one more ended early and the pace doubles: 25 s each, one trial left
    assert logger.progress() == "1/4 trials done, 1 stopped early, 1 running, 1 failed, about 0:25 left"
