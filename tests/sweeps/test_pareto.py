"""Pareto fronts: hand-worked cases, an independent brute-force check, and the CLI over MLflow."""
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from poison import ConfigError
from sweeps.analysis._pareto import pareto_front, parse_objectives
from sweeps.cli import main


def runs(rows):
    """rows: (run_id, seed, x, defense, attack_success, utility)."""
    return pd.DataFrame([{"run_id": r, "params.seed": str(s), "params.x": str(x), "tags.defense": d,
                          "metrics.attack_success": a, "metrics.utility": u} for r, s, x, d, a, u in rows])


OBJ = {"attack_success": "max", "utility": "max"}


def test_replicates_are_averaged_before_the_front():
    front = pareto_front(runs([
        ("a1", 0, 1, "none", 0.9, 0.5), ("a2", 1, 1, "none", 0.7, 0.7),   # config 1: mean (0.8, 0.6)
        ("b1", 0, 2, "none", 0.85, 0.55),                                 # config 2: (0.85, 0.55)
        ("c1", 0, 3, "none", 0.5, 0.5),                                   # config 3: dominated by both
    ]), OBJ).table.set_index("run_id")
    assert front.loc["a1,a2", "attack_success"] == pytest.approx(0.8)
    assert front.loc["a1,a2", "replicates"] == 2
    # Student's t with 1 degree of freedom (12.706): two seeds say little
    assert front.loc["a1,a2", "attack_success_ci95"] == pytest.approx(12.7062 * np.std([0.9, 0.7], ddof=1) / np.sqrt(2),
                                                                      rel=1e-4)
    assert front["pareto"].to_dict() == {"a1,a2": True, "b1": True, "c1": False}


def test_a_success_rate_over_runs_gets_wilsons_interval():
    """Carlini & Terzis's protocol: one target per run, a run succeeds or not; 7 of 20 runs succeed.
    Wilson's score interval by hand (z = 1.96): centre (0.35 + z²/40) / (1 + z²/20) = 0.37417,
    half-width z·√(0.35·0.65/20 + z²/1600) / (1 + z²/20) = 0.19298: [0.1812, 0.5672]. A metric
    with values between 0 and 1 keeps the t-interval."""
    from sweeps.analysis._pareto import format_front, replicate_stats

    frame = pd.DataFrame({"run_id": [f"r{i:02d}" for i in range(20)], "k": 1,
                          "targeted_success": [1.0] * 7 + [0.0] * 13, "utility": np.linspace(0.5, 0.7, 20)})
    row = replicate_stats(frame, ["k"], ["targeted_success", "utility"], per_run={"targeted_success"}).iloc[0]
    assert row["targeted_success"] == pytest.approx(0.35) and row["targeted_success_interval"] == "wilson"
    assert (row["targeted_success_low"], row["targeted_success_high"]) == (pytest.approx(0.1812, abs=1e-4),
                                                                          pytest.approx(0.5672, abs=1e-4))
    assert row["utility_interval"] == "t"
    assert row["utility_low"] == pytest.approx(row["utility"] - row["utility_ci95"])
    assert replicate_stats(frame, ["k"], ["targeted_success"]).iloc[0]["targeted_success_interval"] == "t"
    table = runs([(f"r{i:02d}", i, 1, "none", 1.0 if i < 7 else 0.0, 0.5) for i in range(20)])
    assert "of 20" not in format_front(pareto_front(table, OBJ))  # not a targeted attack: Student's t
    table["params.attack.kind"], table["params.attack.targets"] = "targeted", "1"  # one target per run
    assert "0.35 [0.18, 0.57] of 20" in format_front(pareto_front(table, OBJ))


def test_directions_and_hypervolume_by_hand():
    table = runs([("p", 0, 1, "n", 0.9, 0.2), ("q", 0, 2, "n", 0.5, 0.6), ("r", 0, 3, "n", 0.4, 0.1)])
    table["metrics.poison_count"] = [100.0, 10.0, 50.0]
    front = pareto_front(table, {"attack_success": "max", "poison_count": "min"})
    assert front.table.set_index("run_id")["pareto"].to_dict() == {"p": True, "q": True, "r": False}
    # reference = worst of each, a tenth of the range further: attack_success 0.4 - 0.05 = 0.35,
    # poison_count 100 + 9 = 109. p: (0.9-0.35)*(109-100) = 4.95; q: (0.5-0.35)*(109-10) = 14.85;
    # their overlap (0.5-0.35)*(109-100) = 1.35 → the union is 18.45
    assert front.hypervolume == {"all": pytest.approx(18.45)}


def test_one_front_per_group_on_a_common_scale():
    front = pareto_front(runs([
        ("n1", 0, 1, "none", 0.9, 0.8), ("n2", 0, 2, "none", 0.95, 0.7),
        ("f1", 0, 1, "filter", 0.1, 0.78), ("f2", 0, 2, "filter", 0.2, 0.6),
    ]), OBJ, group_by="defense")
    flags = front.table.set_index("run_id")["pareto"].to_dict()
    assert flags == {"n1": True, "n2": True, "f1": True, "f2": True}  # within its own group, each is optimal
    assert set(front.hypervolume) == {"none", "filter"} and front.hypervolume["none"] > front.hypervolume["filter"]


def test_front_equals_an_independent_brute_force_computation():
    rng = np.random.default_rng(7)
    n = 400
    values = np.round(rng.random((n, 3)), 2)  # ties included
    table = pd.DataFrame({"run_id": [f"r{i}" for i in range(n)], "params.x": [str(i) for i in range(n)],
                          "metrics.a": values[:, 0], "metrics.b": values[:, 1], "metrics.c": values[:, 2]})
    got = pareto_front(table, {"a": "max", "b": "max", "c": "min"}).table.set_index("run_id")["pareto"]
    signed = values * np.array([1, 1, -1])  # all to maximise
    expected = [not any((signed[j] >= signed[i]).all() and (signed[j] > signed[i]).any() for j in range(n))
                for i in range(n)]
    assert got[[f"r{i}" for i in range(n)]].tolist() == expected


def test_bad_objectives_are_clear():
    with pytest.raises(ConfigError, match="--objectives: 'utility:up' is not NAME:max or NAME:min"):
        parse_objectives("attack_success:max,utility:up")
    with pytest.raises(ConfigError, match="--objectives: no finished trial reports speed"):
        pareto_front(runs([("a", 0, 1, "n", 0.1, 0.2)]), {"speed": "max"})


def test_cli_tags_runs_and_logs_the_front(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("swp", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"poisonsweep.role": "sweep"}).info.run_id
    ids = {}
    for name, (a, u, c) in {"good": (0.9, 0.8, 100), "cheap": (0.5, 0.8, 10), "bad": (0.4, 0.7, 100)}.items():
        run = client.create_run(exp, run_name=name, tags={"poisonsweep.role": "trial", "mlflow.parentRunId": parent})
        client.log_param(run.info.run_id, "name", name)
        for k, v in {"attack_success": a, "utility": u, "poison_count": c}.items():
            client.log_metric(run.info.run_id, k, v)
        client.set_terminated(run.info.run_id)
        ids[name] = run.info.run_id
    assert main(["pareto", "--experiment", "swp", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "Pareto front (2 of 3 configurations" in out
    tags = {n: client.get_run(i).data.tags["pareto"] for n, i in ids.items()}
    assert tags == {"good": "true", "cheap": "true", "bad": "false"}
    logged = {a.path for a in client.list_artifacts(parent, "analysis")}
    assert "analysis/pareto.csv" in logged and "analysis/pareto_attack_success_vs_utility.png" in logged
    html = client.download_artifacts(parent, "analysis/pareto_3d.html", str(tmp_path))
    assert "plotly" in open(html).read()[:5000].lower()
    assert "hypervolume" in client.get_run(parent).data.metrics
    assert main(["pareto", "--experiment", "nope", "--tracking-uri", uri]) == 2


def test_the_front_is_of_the_feasible_configurations_first():
    """Three configurations, none dominating another: a (0.9, 0.5), b (0.7, 0.7), c (0.5, 0.9), with
    utility_drop 0.05, 0.01 and 0.03 (a's two replicates: 0.04 and 0.06). Under utility_drop <= 0.02
    only b is feasible: the front is b alone, though a and c are not dominated by it. Under
    utility_drop <= 0.1 every one is feasible and on the front; when none is, the front is of all."""
    from sweeps.config import Constraint

    frame = runs([("a1", 0, 1, "none", 0.9, 0.5), ("a2", 1, 1, "none", 0.9, 0.5),
                  ("b1", 0, 2, "none", 0.7, 0.7), ("c1", 0, 3, "none", 0.5, 0.9)])
    frame["metrics.utility_drop"] = [0.04, 0.06, 0.01, 0.03]

    def front(text):
        table = pareto_front(frame, OBJ, constraints=[Constraint.parse(text, "k")]).table.set_index("run_id")
        return table["pareto"].to_dict(), table["feasible"].to_dict()

    assert front("utility_drop <= 0.02") == ({"a1,a2": False, "b1": True, "c1": False},
                                             {"a1,a2": False, "b1": True, "c1": False})
    assert front("utility_drop <= 0.1")[0] == {"a1,a2": True, "b1": True, "c1": True}
    assert front("utility_drop <= 0.0") == ({"a1,a2": True, "b1": True, "c1": True},
                                            {"a1,a2": False, "b1": False, "c1": False})
    # a dominated feasible configuration is still behind the front: c with b's success
    frame.loc[3, "metrics.attack_success"], frame.loc[3, "metrics.utility"] = 0.7, 0.6
    assert front("utility_drop <= 0.04")[0] == {"a1,a2": False, "b1": True, "c1": False}
    with pytest.raises(ConfigError, match="^--constraint: no finished trial reports poison_rate"):
        pareto_front(frame, OBJ, constraints=[Constraint.parse("poison_rate <= 0.1", "k")])
