"""A real sweep under ``search.scheduler: moasha``: stopped trials are tagged in MLflow, left out
of the Pareto front, and Optuna holds no partial values of theirs."""
import json
import pickle
import time

import numpy as np
import optuna
import pytest
import yaml

from sweeps.cli import main
from sweeps.launch._moasha import promotion_order
from sweeps.tracking import LOST_TAG
from tests.support import TINY, launch_runs

OBJECTIVES = {"attack_success": "max", "utility": "max", "poison_count": "min"}


@pytest.mark.slow
def test_moasha_stops_trials_at_the_rung_and_nothing_takes_their_partial_values(tmp_path, ray_local, capsys):
    """6 trials of 3 epochs, one at a time (so they reach the rung at epoch 1 in the order they
    started), keeping 1 in 3 there. 42 to 62 s measured on 2 shared cores (plus 6 to 19 s starting Ray)."""
    sweep = {**TINY, "name": "moasha", "train": {**TINY["train"], "epochs": 3},
             "search": {**TINY["search"], "num_samples": 6, "objectives": OBJECTIVES, "scheduler": "moasha",
                        "grace_period": 1, "reduction_factor": 3, "seed": 3,
                        "constraints": ["utility_drop <= 0.5"]},
             "storage": {"path": str(tmp_path / "results")}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(path), "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out

    client, parent, children = launch_runs(uri, "moasha", "sweep")
    children = sorted(children, key=lambda c: c.info.run_name)  # "001 ...", "002 ...": the order they reached the rung
    assert len(children) == 6
    decisions = [json.loads(c.data.tags["rung_decisions"]) for c in children]
    assert all([d["epoch"] for d in ds] == [1] for ds in decisions)  # rf 3 below 3 epochs: one rung, at epoch 1

    # every decision is the rule's on the epoch-1 values of the trials at the rung by then
    rung, violations = [], []
    for child, (decision,) in zip(children, decisions):
        rung.append([client.get_metric_history(child.info.run_id, k)[0].value for k in OBJECTIVES])
        (drop,) = client.get_metric_history(child.info.run_id, "utility_drop")[:1]
        assert drop.step == 1 and client.get_metric_history(child.info.run_id, "utility")[0].step == 1
        violations.append(max(0.0, drop.value - 0.5))
        assert decision["feasible"] == (violations[-1] == 0)
        order, _ = promotion_order(np.array(rung), list(OBJECTIVES.values()), violations)
        place, kept = order.index(len(rung) - 1) + 1, -(-len(rung) // 3)
        assert (decision["place"], decision["of"], decision["kept"]) == (place, len(rung), kept)
        assert decision["decision"] == ("promoted" if place <= kept else "stopped")

    stopped = [c for c, (d,) in zip(children, decisions) if d["decision"] == "stopped"]
    promoted = [c for c, (d,) in zip(children, decisions) if d["decision"] == "promoted"]
    assert stopped and promoted and children[0] in promoted  # the first at a rung always goes on
    assert f"{len(promoted)} trials finished, 0 failed, {len(stopped)} stopped early." in out
    for child in stopped:  # KILLED, tagged, its metrics those of epoch 1 only, no final metrics
        assert child.info.status == "KILLED" and child.data.tags["stopped_at_epoch"] == "1"
        assert "poisonsweep.final_metrics" not in child.data.tags
        assert [h.step for h in client.get_metric_history(child.info.run_id, "utility")] == [1]
    for child in promoted:
        assert child.info.status == "FINISHED" and "stopped_at_epoch" not in child.data.tags
        assert [h.step for h in client.get_metric_history(child.info.run_id, "loss")] == [1, 2, 3]

    # Optuna: the stopped trials are PRUNED without values, the others COMPLETE with their final metrics
    study_name, _, study_url = parent.data.params["optuna.study"].partition(" in ")
    study = optuna.load_study(study_name=study_name, storage=study_url)
    states = sorted(t.state.name for t in study.trials)
    assert states == sorted(["PRUNED"] * len(stopped) + ["COMPLETE"] * len(promoted))
    assert all(t.values is None for t in study.trials if t.state.name == "PRUNED")
    # every trial's constraint reached the study (Trial.set_constraint): the final utility_drop of a
    # finished trial, the epoch-1 one of a stopped trial
    told_drops = sorted(t.constraints["utility_drop <= 0.5"] + 0.5 for t in study.trials)
    drops = sorted([c.data.metrics["utility_drop"] for c in promoted]
                   + [client.get_metric_history(c.info.run_id, "utility_drop")[0].value for c in stopped])
    assert np.allclose(told_drops, drops)
    told_as = [item.partition(":")[0] for item in parent.data.params["search.objectives"].split(",")]
    finals = sorted(tuple(c.data.metrics[k] for k in told_as) for c in promoted)
    told = sorted(tuple(t.values) for t in study.trials if t.state.name == "COMPLETE")
    assert np.allclose(told, finals)

    # poisonsweep pareto: only finished trials are on the front or in its table
    assert main(["pareto", "--experiment", "moasha", "--tracking-uri", uri, "--all",
                 "--objectives", ",".join(f"{k}:{v}" for k, v in OBJECTIVES.items())]) == 0
    tagged = {c.info.run_id: client.get_run(c.info.run_id).data.tags.get("pareto") for c in children}
    assert all(tagged[c.info.run_id] is None for c in stopped)
    assert all(tagged[c.info.run_id] in ("true", "false") for c in promoted)

    # --resume keeps the rungs: Tune restores the Tuner from tuner.pkl (the scheduler, empty, and its
    # RungState callback in one pickle), then its callbacks' state from the experiment state
    from ray.tune.callback import CallbackList

    folder = next((tmp_path / "results").glob("moasha-*"))
    tuner = pickle.loads((folder / "tuner.pkl").read_bytes())
    scheduler, callbacks = tuner["_tune_config"].scheduler, tuner["_run_config"].callbacks
    assert callbacks[0].scheduler is scheduler and scheduler.recorded == {1: {}}
    (saved,) = folder.glob("callback-states-*.pkl")
    CallbackList(callbacks).set_state(pickle.loads(saved.read_bytes()))
    assert len(scheduler.recorded[1]) == 6
    assert sorted(json.dumps(d, sort_keys=True) for ds in scheduler.decisions.values() for d in ds) == \
        sorted(json.dumps(d, sort_keys=True) for ds in decisions for d in ds)


@pytest.mark.slow
def test_moasha_with_replicates_and_a_kind_switch(tmp_path, ray_local, capsys):
    """3 configurations × 2 replicates, attack.kind backdoor or text-backdoor, one rung at epoch 1
    keeping 1 in 3: replicates and kinds meet at the same rung, and a configuration with a stopped
    replicate reaches Optuna as PRUNED, never as the mean of its finished replicates. 69 s
    measured on 2 shared cores (plus 10 to 20 s starting Ray)."""
    # 96 test images: with 48, seed 1's synthetic test split has no 'blue circle' for text-backdoor
    sweep = {**TINY, "name": "mixed", "data": {"size": 256, "test_size": 96}, "train": {**TINY["train"], "epochs": 3},
             "attack": {"kind": {"choices": ["backdoor", "text-backdoor"], "default": "backdoor"},
                        "target": "blue circle", "poison_count": {"low": 10, "high": 40, "default": 20},
                        "trigger": {"kind": "patch", "size": 4}, "text_trigger": {"kind": "phrase", "text": "cf"}},
             "search": {**TINY["search"], "num_samples": 3, "replicates": 2, "scheduler": "moasha", "grace_period": 1,
                        "reduction_factor": 3, "points": [{"attack.kind": "text-backdoor"}]},
             "storage": {"path": str(tmp_path / "results")}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(path), "--tracking-uri", uri]) == 0

    client, parent, children = launch_runs(uri, "mixed", "sweep")
    assert len(children) == 6 and {c.data.tags["attack"] for c in children} == {"backdoor", "text-backdoor"}
    decisions = {c.info.run_id: json.loads(c.data.tags["rung_decisions"])[0] for c in children}
    assert sorted(d["of"] for d in decisions.values()) == [1, 2, 3, 4, 5, 6]  # every trial at the one rung
    # replicates of a configuration: same drawn values, seeds 0 and 1
    groups: dict[tuple, list] = {}
    for c in children:
        groups.setdefault((c.data.params["attack.kind"], c.data.params["attack.poison_count"]), []).append(c)
    assert sorted(len(g) for g in groups.values()) == [2, 2, 2]
    study_name, _, study_url = parent.data.params["optuna.study"].partition(" in ")
    study = optuna.load_study(study_name=study_name, storage=study_url)
    told_as = [item.partition(":")[0] for item in parent.data.params["search.objectives"].split(",")]
    expected = []
    for group in groups.values():
        if any(decisions[c.info.run_id]["decision"] == "stopped" for c in group):
            assert any(c.info.status == "KILLED" for c in group)
            expected.append(("PRUNED", None))
        else:
            means = [float(np.mean([c.data.metrics[k] for c in group])) for k in told_as]
            expected.append(("COMPLETE", means))
    told = [(t.state.name, t.values) for t in study.trials]
    assert sorted(s for s, _ in told) == sorted(s for s, _ in expected)
    assert all(v is None for s, v in told if s == "PRUNED")
    assert np.allclose(sorted(v for s, v in told if s == "COMPLETE"), sorted(v for s, v in expected if s == "COMPLETE"))


@pytest.mark.slow
def test_a_resumed_moasha_launch_keeps_its_rungs(tmp_path, ray_local, capsys):
    """The launch is SIGKILLed 1.5 s after trial 2 reported the rung (Tune saves its experiment state,
    with the rungs, every second), then ``run --resume``d. Trial 5 can only reach the rung after the
    resume (trials 3 and 4 come first, one at a time, each over a second to its first epoch); the
    rung it meets holds trials 1 and 2 from before the kill, so it is placed among at least 4 (with
    the rungs lost it would meet at most 3: trials 3, 4 and itself: with RungState's set_state
    made a no-op, it meets 2). 56 s measured on 2 shared cores (plus 4 s starting Ray)."""
    from tests.support import LaunchProcess

    sweep = {**TINY, "name": "resumed", "train": {**TINY["train"], "epochs": 3},
             "search": {**TINY["search"], "num_samples": 5, "scheduler": "moasha", "grace_period": 1,
                        "reduction_factor": 3},
             "storage": {"path": str(tmp_path / "results")}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = LaunchProcess(str(path), "--tracking-uri", uri)
    try:
        first.wait_for("trial 2/5 epoch 1/3")
        time.sleep(1.5)
    finally:
        first.kill_all()
    assert "trial 5/5" not in "".join(first.lines)
    assert main(["run", str(path), "--tracking-uri", uri, "--resume"]) == 0
    assert "resuming resumed-" in capsys.readouterr().out

    _, _, children = launch_runs(uri, "resumed", "sweep")
    # a trial started in the kill's second but never recorded by Tune is a KILLED run tagged lost
    # (its point drawn again, under the next number): the launch's trials are the others
    by_number = {int(c.data.tags["trial_number"]): c for c in children if LOST_TAG not in c.data.tags}
    assert len(by_number) == 5
    decisions = {n: json.loads(c.data.tags["rung_decisions"]) for n, c in by_number.items() if "rung_decisions" in c.data.tags}
    first, second, *_, last = sorted(by_number)
    assert (first, second) == (1, 2)
    assert [d["of"] for d in decisions[1]] == [1] and [d["of"] for d in decisions[2]] == [2]
    (fifth,) = decisions[last]
    assert fifth["epoch"] == 1 and fifth["of"] >= 4


@pytest.mark.slow
def test_an_epoch_budget_ends_a_moasha_sweep_once_its_trials_reached_it(tmp_path, ray_local):
    """``search.epoch_budget`` under the scheduler: trials of fixed, short work, one at a time, 3
    epochs each unless stopped at the rung (epoch 1). Tune tells the searcher no result of a trial
    its scheduler stops; the budget must count the stopped trials' epochs all the same. The
    sweep starts trials while fewer than 12 epochs are spent and none after. 20 to 40 s."""
    from sweeps.config._schema import load_config
    from sweeps.launch._driver import run_sweep
    from tests.support import write_sweep

    def fixed_work(values, *, raw, dims, kept=None, **_) -> None:  # nested: Ray's workers get it by value
        import json
        import tempfile
        from pathlib import Path

        import pyarrow.parquet as pq
        import yaml
        from ray import tune

        from poison.attacks import empty_plan
        from sweeps._files import CONFIG_FILE, METRICS_FILE, PLAN_FILE, epoch_result, final_result
        from sweeps.config import resolve

        config = resolve(raw, dims, values)
        count = config.attack.poison_count
        metrics = {"attack_success": count / 40, "utility": 1 - count / 80, "poison_count": count}
        for epoch in range(1, config.train.epochs + 1):
            tune.report(epoch_result({"epoch": epoch, "loss": 1.0 / epoch, **metrics}, kept))
        with tempfile.TemporaryDirectory() as folder:
            pq.write_table(empty_plan(), Path(folder) / PLAN_FILE)
            (Path(folder) / METRICS_FILE).write_text(json.dumps(metrics))
            (Path(folder) / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict()))
            tune.report(final_result(metrics, kept), checkpoint=tune.Checkpoint.from_directory(folder))

    sweep = load_config(write_sweep(tmp_path, "budget", train={**TINY["train"], "epochs": 3}, search={
        **TINY["search"], "num_samples": 30, "objectives": OBJECTIVES, "scheduler": "moasha", "grace_period": 1,
        "reduction_factor": 3, "epoch_budget": 12}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_sweep(sweep, tracking_uri=uri, printer=lambda line: None, trainable=fixed_work)
    client, parent, children = launch_runs(uri, "budget", "sweep")
    epochs = [len(client.get_metric_history(c.info.run_id, "loss")) for c in
              sorted(children, key=lambda c: c.info.run_name)]  # in the order they started, one at a time
    assert any(e == 1 for e in epochs) and any(e == 3 for e in epochs)  # some stopped at the rung, some finished
    assert sum(epochs[:-1]) < 12 <= sum(epochs) and len(epochs) < 30, epochs
    assert {r.status for r in outcome.rows} == {"FINISHED", "STOPPED"} and parent.info.status == "FINISHED"
