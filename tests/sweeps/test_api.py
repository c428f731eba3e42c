"""The Python API (``sweeps.api``, re-exported by ``sweeps``): a hand-made MLflow store read back as
DataFrames, every number worked out by hand; bad input; and docs/api.md's notebook run for real."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

import sweeps
from poison import ConfigError
from sweeps.tracking import TrialRow
from tests.support import TINY, write_sweep

ROOT = Path(__file__).resolve().parents[2]
BOTH = {"attack_success": "max", "poison_count": "min"}


def add_run(client, exp, parent, name, params, metrics, *, tags=None, status="FINISHED"):
    tags = {"poisonsweep.role": "trial", "mlflow.parentRunId": parent, **(tags or {})}
    run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
    client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 1) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Experiment ``swp``: a first launch with configurations x=1 (two seeds), 2, 3 and a failed
    trial, a second launch with x=5; experiment ``def``: a backdoor without and with a filter."""
    folder = tmp_path_factory.mktemp("api")
    uri = f"sqlite:///{folder / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("swp", artifact_location=(folder / "art").as_uri())
    first = client.create_run(exp, run_name="swp-sweep", tags={"poisonsweep.role": "sweep"}).info.run_id
    ids = {}
    for name, seed, x, a, u, c in [("x1-s0", 0, 1, 0.9, 0.8, 100), ("x1-s1", 1, 1, 0.7, 0.8, 100),
                                   ("x2", 0, 2, 0.5, 0.8, 10), ("x3", 0, 3, 0.4, 0.7, 100)]:
        ids[name] = add_run(client, exp, first, name, {"seed": seed, "x": x},
                            {"attack_success": a, "utility": u, "poison_count": c}, tags={"attack": "backdoor"})
    ids["broken"] = add_run(client, exp, first, "broken", {"seed": 0, "x": 4},
                            {"attack_success": 0.99, "utility": 0.99, "poison_count": 1}, status="FAILED")
    second = client.create_run(exp, run_name="swp-sweep", tags={"poisonsweep.role": "sweep"}).info.run_id
    ids["x5"] = add_run(client, exp, second, "x5", {"seed": 0, "x": 5},
                        {"attack_success": 0.95, "utility": 0.9, "poison_count": 5})
    dexp = client.create_experiment("def", artifact_location=(folder / "art-d").as_uri())
    dparent = client.create_run(dexp, tags={"poisonsweep.role": "sweep"}).info.run_id
    for defense, a, u, extra in [("none", 0.9, 0.8, {}), ("similarity-filter", 0.1, 0.7, {"defense_seconds": 5})]:
        add_run(client, dexp, dparent, defense, {"seed": 0, "attack.kind": "backdoor", "defense.kind": defense},
                {"attack_success": a, "utility": u, "train_seconds": 10, **extra})
    client.create_run(client.create_experiment("idle", artifact_location=(folder / "art-i").as_uri()),
                      tags={"poisonsweep.role": "sweep"})  # a launch without trials
    return uri, client, first, second, ids


def test_trials_is_one_row_per_trial_run_with_its_params_metrics_and_tags(store):
    uri, client, first, second, ids = store
    table = sweeps.trials("swp", tracking_uri=uri)
    assert sorted(table["run_name"]) == ["broken", "x1-s0", "x1-s1", "x2", "x3", "x5"]  # no parent runs
    assert list(table.columns[:5]) == ["run_id", "run_name", "status", "start_time", "end_time"]
    row = table.set_index("run_name").loc["x2"]
    assert (row["run_id"], row["status"], row["params.x"], row["metrics.poison_count"]) == (ids["x2"], "FINISHED",
                                                                                          "2", 10.0)
    assert row["tags.attack"] == "backdoor" and row["tags.mlflow.parentRunId"] == first
    assert row["end_time"] >= row["start_time"] and str(row["start_time"].tz) == "UTC"
    assert table.set_index("run_name").loc["broken", "status"] == "FAILED"
    assert sorted(sweeps.trials("swp", tracking_uri=uri, finished=True)["run_name"]) == ["x1-s0", "x1-s1", "x2",
                                                                                          "x3", "x5"]
    assert sorted(sweeps.trials("swp", tracking_uri=uri, parent=second)["run_name"]) == ["x5"]
    idle = sweeps.trials("idle", tracking_uri=uri)
    assert idle.empty and list(idle.columns) == ["run_id", "run_name", "status", "start_time", "end_time"]


def test_pareto_of_one_launch_by_hand(store):
    uri, client, first, _, ids = store
    front = sweeps.pareto("swp", objectives=BOTH, tracking_uri=uri, parent=first)
    # x=1: the seeds' mean (0.8, 100); x=2 (0.5, 10) is cheaper; x=3 (0.4, 100) is beaten by x=1
    assert len(front) == 3  # the failed trial is not a configuration
    by_runs = front.set_index("run_id")
    x1 = ",".join(sorted([ids["x1-s0"], ids["x1-s1"]]))
    assert by_runs["pareto"].to_dict() == {x1: True, ids["x2"]: True, ids["x3"]: False}
    assert by_runs.loc[x1, "attack_success"] == pytest.approx(0.8) and by_runs.loc[x1, "replicates"] == 2
    # reference: 0.4 - 0.04 = 0.36 and 100 + 9 = 109; x1 0.44 * 9 = 3.96, x2 0.14 * 99 = 13.86, overlap 0.14 * 9
    assert front.attrs["hypervolume"] == {"all": pytest.approx(3.96 + 13.86 - 1.26)}
    assert front.attrs["objectives"] == BOTH
    text = sweeps.pareto("swp", objectives="attack_success:max,poison_count:min", tracking_uri=uri, parent=first)
    assert text["pareto"].tolist() == front["pareto"].tolist()
    assert "pareto" not in client.get_run(ids["x2"]).data.tags  # reading writes nothing


def test_pareto_of_every_launch_with_the_default_objectives_and_logging(store):
    uri, client, _, second, ids = store
    front = sweeps.pareto("swp", tracking_uri=uri, log=True)
    assert front[front["pareto"]]["run_id"].tolist() == [ids["x5"]]  # (0.95, 0.9, 5) beats every other
    assert len(front) == 4 and list(front.attrs["objectives"]) == ["attack_success", "utility", "poison_count"]
    assert client.get_run(ids["x5"]).data.tags["pareto"] == "true"
    assert client.get_run(ids["x3"]).data.tags["pareto"] == "false"
    assert "analysis/pareto.csv" in {a.path for a in client.list_artifacts(second, "analysis")}  # the latest launch


def test_defenses_by_hand(store):
    uri, client, *_ = store
    table = sweeps.defenses("def", tracking_uri=uri).set_index("defense")
    assert table.loc["similarity-filter", "attack_success_without"] == pytest.approx(0.9)
    assert table.loc["similarity-filter", "attack_success_removed"] == pytest.approx(0.8)
    assert table.loc["similarity-filter", "cost_ratio"] == pytest.approx(1.5)  # (10 + 5) s against 10 s
    assert table["pareto"].to_dict() == {"none": True, "similarity-filter": True}  # more utility; less success
    assert table.attrs == {"trials": 2, "logged_to": None}


def test_a_sweep_result_reads_its_own_launch(store):
    uri, _, first, _, ids = store
    config = sweeps.load({**TINY, "name": "swp"}, overrides={"search.objectives": BOTH})
    rows = [TrialRow("a", "FINISHED", {}, {}, ids["x2"]), TrialRow("b", "FAILED", {}, {}, ids["broken"])]
    result = sweeps.SweepResult("swp", first, uri, config, rows)
    assert (result.finished, result.failed) == (1, 1)
    assert len(result.trials()) == 5 and len(result.trials(finished=True)) == 4
    assert result.pareto()["pareto"].sum() == 2  # the config's objectives, this launch only
    assert uri not in repr(result) and first in repr(result)


@pytest.mark.parametrize("call, message", [
    (lambda uri: sweeps.trials("nope", tracking_uri=uri), "--experiment: no MLflow experiment 'nope'; experiments: "),
    (lambda uri: sweeps.pareto("swp", objectives={"utility": "up"}, tracking_uri=uri),
     "objectives: 'utility': 'up' is not 'max' or 'min'"),
    (lambda uri: sweeps.pareto("swp", objectives="utility:up", tracking_uri=uri),
     "--objectives: 'utility:up' is not NAME:max or NAME:min"),
    (lambda uri: sweeps.defenses("swp", tracking_uri="file:///tmp/x"), "--tracking-uri: "),
    (lambda uri: sweeps.run(42), "config: expected a file path, a mapping or a SweepConfig, not int"),
    (lambda uri: sweeps.run({**TINY, "name": "x", "bogus": 1}), "bogus: unknown key"),
    (lambda uri: sweeps.run({**TINY, "name": "x"}, overrides=[3]), "overrides: 3 is not a 'key.path=value' string"),
    (lambda uri: sweeps.run("missing.yaml"), "missing.yaml: config file not found"),
    (lambda uri: sweeps.minimal_budget({**TINY, "name": "b"}, threshold=1.0),
     "--threshold: must lie strictly between 0 and 1"),
])
def test_bad_input_is_one_clear_line(store, call, message):
    with pytest.raises(ConfigError) as err:
        call(store[0])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_package_gives_the_api_whatever_subpackages_are_imported():
    """``sweeps.<name>`` is the API's function, not a subpackage of that name (a subpackage, once
    imported, would shadow a lazily exported name)."""
    import importlib
    import pkgutil

    from sweeps import api

    for module in pkgutil.iter_modules(sweeps.__path__):
        importlib.import_module(f"sweeps.{module.name}")
    assert sweeps.__all__ and all(getattr(sweeps, name) is getattr(api, name) for name in sweeps.__all__)


def test_load_applies_overrides_to_a_copy(tmp_path):
    raw = {**TINY, "name": "o"}
    sweep = sweeps.load(raw, overrides={"search.num_samples": 3, "attack.trigger": {"kind": "patch", "size": 6}})
    assert sweep.search.num_samples == 3 and sweep.default_trial.attack.trigger.size == 6
    assert raw["search"]["num_samples"] == 2 and raw["attack"]["trigger"]["size"] == 4  # the caller's dict as it was
    again = sweeps.load(sweep, overrides=["search.num_samples=5"])
    assert again.search.num_samples == 5 and sweep.search.num_samples == 3
    assert sweeps.load(sweep) is sweep
    from_file = sweeps.load(write_sweep(tmp_path, "file"), overrides="search.num_samples=7")  # a Path, one string
    assert (from_file.name, from_file.search.num_samples) == ("file", 7)


def test_reading_imports_neither_torch_nor_ray_and_bad_input_starts_no_ray(store):
    """A notebook that only reads (trials, pareto, defenses) never imports torch, open_clip or Ray;
    a config refused by ``run`` is refused before Ray is imported."""
    uri = store[0]
    script = (f"import sys, sweeps\nuri = {uri!r}\n"
              "n = [len(sweeps.trials('swp', tracking_uri=uri)), len(sweeps.pareto('swp', tracking_uri=uri)), "
              "len(sweeps.defenses('def', tracking_uri=uri))]\n"
              "try:\n    sweeps.run({'name': 'x', 'bogus': 1})\nexcept sweeps.ConfigError as err:\n    n.append(str(err))\n"
              "print('GOT', n, 'HEAVY', sorted(m for m in ('torch', 'torchvision', 'open_clip', 'ray') "
              "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT).stdout
    assert "GOT [6, 4, 2, 'bogus: unknown key; valid:" in out and out.rstrip().endswith("HEAVY []"), out[-2000:]


@pytest.mark.slow
def test_the_notebook_on_docs_api_page_runs_a_sweep_and_gets_its_front(tmp_path):
    """docs/api.md's cells, in order, as one script in a fresh process: only ``import sweeps``'s
    public API, a two-trial sweep of one epoch (Ray started locally, the clean model first, then the
    trials into SQLite in the working directory), its trials, front and defense table as DataFrames.
    The front has one row per finished configuration (Tune's drawn values) and a ``pareto`` column
    with at least one true. Measured: 37 s alone on 2 CPU cores, 47-78 s with the cores shared
    (load average 5-9), mostly Ray's start and the clean model."""
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    cells = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(cells) >= 4
    assert re.findall(r"^\s*(?:import|from)\s+(\S+)", "\n".join(cells), re.M) == ["sweeps"]  # its public API only
    check = ("\nimport json\n"
             "configs = {json.dumps(r.values, sort_keys=True) for r in result.rows if r.status == 'FINISHED'}\n"
             "print('CHECK', json.dumps({'configs': len(configs), 'rows': len(front), "
             "'pareto': [bool(p) for p in front['pareto']], 'trials': len(trials)}))\n")
    script = tmp_path / "notebook.py"
    script.write_text("\n".join(cells) + check)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = proc.stdout
    got = json.loads(out.split("CHECK ", 1)[1].splitlines()[0])
    assert got["trials"] == 2 and got["configs"] >= 1
    assert got["rows"] == got["configs"] and any(got["pareto"]), got
    header = next(line for line in out.splitlines() if line.split()[:2] == ["attack_success", "utility"])
    assert header.split() == ["attack_success", "utility", "poison_count", "replicates", "pareto"]
    assert "train.epochs: expected greater than or equal to 1, got 0" in out  # the page's bad-input cell
    assert (tmp_path / "poisonsweep_results" / "mlflow.db").is_file()  # the default store, where the page says
