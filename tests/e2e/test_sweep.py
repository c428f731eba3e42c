"""A real 4-trial sweep through Ray Tune + Optuna + MLflow (SQLite), and the CLI around it."""
import json

import optuna
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sweeps.cli import main
from tests.support import backdoor, launch_runs

SWEEP = {
    "name": "e2e",
    "seed": 0,
    "data": {"size": 600, "test_size": 96},
    "train": {"epochs": 1, "batch_size": 64, "lr": {"choices": [2.0e-3, 1.0e30], "default": 2.0e-3}},
    "attack": {**backdoor(), "poison_count": {"low": 10, "high": 120, "log": True, "default": 40}},
    # the lr of 1e30 makes the loss NaN: those trials must fail (after one retry each) without
    # stopping the sweep; each configuration runs with two seeds (replicates)
    "search": {"num_samples": 2, "replicates": 2, "max_concurrent": 2, "points": [{"train.lr": 1.0e30}],
               "max_failures": 1},
    "resources": {"cpu": 1},
}


@pytest.mark.slow
def test_four_trial_sweep_lands_in_mlflow(tmp_path, ray_local, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "storage": {"path": str(tmp_path / "results")}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(path), "--tracking-uri", uri]) == 0  # the user's path, end to end

    client, parent, children = launch_runs(uri, "e2e", "sweep")
    assert len(children) == 4 and parent.info.status == "FINISHED"
    assert {"config.yaml", "trials.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    finished = [c for c in children if c.info.status == "FINISHED"]
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(finished) == len(failed) == 2
    # exactly the trials drawn with the NaN-making lr failed, each with its reason; each
    # configuration ran as two replicates: seeds 0 and 1, everything else equal
    assert all(c.data.params["train.lr"] == "1e+30" for c in failed)
    assert all(c.data.params["train.lr"] == "0.002" for c in finished)
    for pair in (finished, failed):
        assert sorted(c.data.params["seed"] for c in pair) == ["0", "1"]
        assert sorted(c.data.params["search.replicate"] for c in pair) == ["0", "1"]
        assert len({c.data.params["attack.poison_count"] for c in pair}) == 1
    assert all("training loss became nan" in c.data.tags["error"] for c in failed)
    for child in finished:
        m, p, t = child.data.metrics, child.data.params, child.data.tags
        for name in ("attack_success", "utility", "poison_count", "poison_rate", "clean_utility",
                     "utility_drop", "clean_attack_success", "backdoor_asr", "zeroshot_top1", "t2i_r5"):
            assert name in m, name
        assert m["poison_count"] == int(p["attack.poison_count"])
        assert 10 <= m["poison_count"] <= 120
        assert {t[k] for k in ("attack", "trigger", "modality", "defense", "dataset", "model")} == {
            "backdoor", "patch", "image", "none", "synthetic", "tiny-rn"}
        history = client.get_metric_history(child.info.run_id, "utility")
        assert [h.step for h in history] == [1]  # one epoch, logged once
        plan_file = client.download_artifacts(child.info.run_id, "poison_plan.parquet", str(tmp_path))
        assert pq.read_table(plan_file).num_rows == m["poison_count"]
    # each replicate was judged against the clean model of its own seed
    assert all(c.data.metrics["utility_drop"] == pytest.approx(c.data.metrics["clean_utility"] - c.data.metrics["utility"])
               for c in finished)

    # Optuna was told one configuration per pair of replicates: the complete one with the mean
    # of its two replicates' objectives, the failed one as a failure with no values
    study_name, _, study_url = parent.data.params["optuna.study"].partition(" in ")
    study = optuna.load_study(study_name=study_name, storage=study_url)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "FAIL"]
    for fail in (t for t in study.trials if t.state.name == "FAIL"):
        assert fail.values is None and fail.params["train.lr"] == 1e30
    complete = next(t.values for t in study.trials if t.state.name == "COMPLETE")
    objectives = ("attack_success", "utility", "poison_count")
    assert complete == pytest.approx([sum(c.data.metrics[k] for c in finished) / 2 for k in objectives])
    out = capsys.readouterr().out
    assert "FAILED" in out and "clean model" in out and "Pareto front" in out
    # each failing trial was retried once (search.max_failures), then failed; one run each
    retried = [line for line in out.splitlines() if "retrying from its last checkpoint" in line]
    assert len(retried) == len(failed) and all("training loss became nan" in r for r in retried)
    assert "poisonsweep ui --tracking-uri " + uri in out
    # the run ended with its Pareto front: every finished trial tagged, the front logged to the parent
    assert {client.get_run(c.info.run_id).data.tags.get("pareto") for c in finished} <= {"true", "false"}
    assert any(client.get_run(c.info.run_id).data.tags["pareto"] == "true" for c in finished)
    assert "analysis/pareto.csv" in {a.path for a in client.list_artifacts(parent.info.run_id, "analysis")}
    front = client.download_artifacts(parent.info.run_id, "analysis/pareto.csv", str(tmp_path))
    assert pd.read_csv(front)["replicates"].tolist() == [2]  # the two seeds, averaged


MIXED = {
    "name": "mixed",
    "seed": 0,
    "data": {"size": 600, "test_size": 96},
    "train": {"epochs": 1, "batch_size": 64},
    "attack": {
        "kind": {"choices": ["backdoor", "text-backdoor", "dual-backdoor"], "default": "dual-backdoor"},
        "target": "blue circle",
        "poison_count": {"low": 10, "high": 60, "log": True, "default": 30},
        "modality": {"choices": ["image", "text", "both"], "default": "both"},
        "trigger": {"kind": {"choices": ["patch", "sig"], "default": "patch"}, "size": 4},
        "text_trigger": {"kind": "phrase", "text": "cf"},
    },
    # the default point (dual-backdoor, both, patch) and these three run first: every kind is covered
    "search": {"num_samples": 4, "max_concurrent": 2, "sampler": "random", "max_failures": 0, "points": [
        {"attack.kind": "text-backdoor"}, {"attack.kind": "backdoor", "attack.trigger.kind": "sig"},
        {"attack.kind": "dual-backdoor", "attack.modality": "image", "attack.trigger.kind": "sig"}]},
    "resources": {"cpu": 1},
}


@pytest.mark.slow
def test_a_sweep_over_attack_kind_trigger_and_modality_is_tagged_for_grouping(tmp_path, ray_local):
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump({**MIXED, "storage": {"path": str(tmp_path / "results")}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(path), "--tracking-uri", uri]) == 0

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mixed")
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("poisonsweep.role") == "trial"]
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials)
    seen = set()
    for run in trials:
        p, t, m = run.data.params, run.data.tags, run.data.metrics
        kind = p["attack.kind"]
        trigger = {"backdoor": p.get("attack.trigger.kind"), "text-backdoor": "phrase",
                   "dual-backdoor": {"image": p.get("attack.trigger.kind"), "text": "phrase",
                                     "both": f"{p.get('attack.trigger.kind')}+phrase"}.get(p.get("attack.modality"))}[kind]
        modality = {"backdoor": "image", "text-backdoor": "text"}.get(kind, p.get("attack.modality"))
        assert (t["attack"], t["trigger"], t["modality"]) == (kind, trigger, modality)
        seen.add((t["attack"], t["trigger"], t["modality"]))
        # each trial's params are its own kind's keys only, and its metrics its attack's
        assert ("attack.trigger.kind" in p) == (kind != "text-backdoor")
        assert ("attack.modality" in p) == (kind == "dual-backdoor")
        assert ("backdoor_asr" in m) == (kind != "text-backdoor") and ("hit_at_1" in m) == (kind != "backdoor")
        assert "clean_attack_success" in m and m["poison_count"] == int(p["attack.poison_count"])
    assert {("dual-backdoor", "patch+phrase", "both"), ("text-backdoor", "phrase", "text"),
            ("backdoor", "sig", "image"), ("dual-backdoor", "sig", "image")} == seen


@pytest.mark.slow
def test_cli_train_writes_flat_metrics_json(tmp_path):
    path = tmp_path / "one.yaml"
    cfg = {**SWEEP, "train": {"epochs": 1, "batch_size": 64}, "search": {}, "storage": {"path": str(tmp_path / "r")}}
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "metrics.json"
    assert main(["train", str(path), "--set", "attack.poison_count=25", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["poison_count"] == 25 and "clean_utility" in metrics and "attack_success" in metrics
    assert all(isinstance(v, (int, float)) for v in metrics.values())


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "attack": {**backdoor(), "poison_count": 10**9}}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("poisonsweep: error: attack.poison_count: 1,000,000,000 exceeds the")
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "poisonsweep_results").exists()  # nothing started


@pytest.mark.slow
@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_fashion_mnist_backdoor_preset_learns_and_the_attack_works(tmp_path):
    from importlib import resources

    preset = resources.files("sweeps.presets") / "fashion-mnist-backdoor.yaml"
    out = tmp_path / "metrics.json"
    code = main(["train", str(preset), "--set", "data.size=5000", "--set", "data.test_size=2000",
                 "--set", f"storage.path={tmp_path}", "--output", str(out)])
    assert code == 0
    m = json.loads(out.read_text())
    assert m["clean_utility"] > 0.5 and m["utility"] > 0.5  # chance is 0.1
    # the preset's 4 epochs: attack success 0.999, 1.0, 0.998 at seeds 0-2 (at 3 epochs 0.726, 1.0, 0.992)
    assert m["attack_success"] > 0.8 and m["clean_attack_success"] < 0.2


def test_replicates_tell_the_searcher_each_objectives_mean_over_the_seeds_that_finished():
    from ray.tune.search import Searcher

    from sweeps.config._schema import REPLICATE, validate_config
    from sweeps.launch._driver import Replicates

    class Recorder(Searcher):
        def __init__(self):
            super().__init__(metric=["attack_success", "utility"], mode=["max", "max"])
            self.told, self.n = [], 0

        def suggest(self, trial_id):
            self.n += 1
            return {"attack.poison_count": 10 * self.n}

        def on_trial_complete(self, trial_id, result=None, error=False):
            self.told.append((trial_id, result, error))

    inner = Recorder()
    searcher = Replicates(inner, repeat=3)
    configs = [searcher.suggest(f"t{i}") for i in range(6)]
    assert configs[:3] == [{"attack.poison_count": 10, REPLICATE: r} for r in range(3)]
    assert configs[3][REPLICATE] == 0 and configs[3]["attack.poison_count"] == 20
    searcher.on_trial_complete("t0", {"attack_success": 0.5, "utility": 0.9})
    searcher.on_trial_complete("t1", {"attack_success": 1.0, "utility": 0.6})
    assert inner.told == []  # not before every replicate reported
    searcher.on_trial_complete("t2", None, error=True)  # a failed replicate does not count
    assert inner.told == [("t0", {"attack_success": 0.75, "utility": 0.75}, False)]
    for trial in ("t3", "t4", "t5"):
        searcher.on_trial_complete(trial, None, error=True)
    assert inner.told[-1] == ("t3", None, True)  # no replicate finished: a failure

    # replicate r of a configuration runs with seed + r, its drawn values otherwise the same
    sweep = validate_config({"seed": 7, "data": {"size": 400, "test_size": 40}, "attack": {
        "kind": "backdoor", "target": "blue circle", "poison_count": {"low": 10, "high": 40},
        "trigger": {"kind": "patch", "size": 4}}}, check_data=False)
    second = sweep.resolve({"attack.poison_count": 20, REPLICATE: 2})
    assert second.seed == 9 and second.attack.poison_count == 20
    assert sweep.resolve({"attack.poison_count": 20}).seed == 7


@pytest.mark.slow
def test_a_trial_no_node_can_hold_is_refused_before_any_mlflow_run(tmp_path, ray_local, capsys):
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "resources": {"cpu": 64},
                                    "storage": {"path": str(tmp_path / "results")}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["run", str(path), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("poisonsweep: error: resources.cpu: no node can hold a trial of 64 CPU and 0 GPU")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "mlflow.db").exists()  # refused before the tracking store was touched
