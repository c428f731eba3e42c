"""poisonsweep defenses: a hand-made MLflow store, every number worked out by hand."""
import math

import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from poison import ConfigError
from sweeps.analysis._defenses import defense_table
from sweeps.cli import main

T2 = 4.302652729911275   # scipy.stats.t.ppf(0.975, 2): three seeds
T1 = 12.706204736174696  # scipy.stats.t.ppf(0.975, 1): two seeds

# (attack, poison_count, defense, seed) → metrics; defense_seconds / predefense_* only where logged
TRIALS = {
    ("backdoor", 250, "none", 0): dict(attack_success=0.90, utility=0.80, clean_utility=0.82, train_seconds=10),
    ("backdoor", 250, "none", 1): dict(attack_success=1.00, utility=0.82, clean_utility=0.82, train_seconds=12),
    ("backdoor", 250, "none", 2): dict(attack_success=0.95, utility=0.84, clean_utility=0.82, train_seconds=14),
    ("backdoor", 250, "similarity-filter", 0): dict(attack_success=0.10, utility=0.78, clean_utility=0.82,
                                                    train_seconds=9, defense_seconds=2),
    ("backdoor", 250, "similarity-filter", 1): dict(attack_success=0.30, utility=0.80, clean_utility=0.82,
                                                    train_seconds=11, defense_seconds=4),
    ("backdoor", 250, "clean-finetune", 0): dict(attack_success=0.02, utility=0.78, clean_utility=0.82,
                                                 train_seconds=10, defense_seconds=6,
                                                 predefense_attack_success=0.90, predefense_utility=0.80),
    ("backdoor", 250, "clean-finetune", 1): dict(attack_success=0.04, utility=0.80, clean_utility=0.82,
                                                 train_seconds=12, defense_seconds=6,
                                                 predefense_attack_success=1.00, predefense_utility=0.82),
    ("backdoor", 250, "clean-finetune", 2): dict(attack_success=0.06, utility=0.82, clean_utility=0.82,
                                                 train_seconds=14, defense_seconds=6,
                                                 predefense_attack_success=0.95, predefense_utility=0.84),
    ("mm-single-label", 150, "none", 0): dict(attack_success=0.6, utility=0.50, clean_utility=0.55, train_seconds=20),
    ("mm-single-label", 150, "none", 1): dict(attack_success=0.8, utility=0.60, clean_utility=0.55, train_seconds=22),
    ("mm-single-label", 150, "similarity-filter", 0): dict(attack_success=0.1, utility=0.56, clean_utility=0.55,
                                                           train_seconds=20, defense_seconds=1),
    ("mm-single-label", 150, "similarity-filter", 1): dict(attack_success=0.1, utility=0.58, clean_utility=0.55,
                                                           train_seconds=20, defense_seconds=1),
    ("mm-single-label", 150, "clean-finetune", 0): dict(attack_success=0.05, utility=0.50, clean_utility=0.55,
                                                        train_seconds=20, defense_seconds=5,
                                                        predefense_attack_success=0.6, predefense_utility=0.5),
    ("mm-single-label", 150, "clean-finetune", 1): dict(attack_success=0.15, utility=0.54, clean_utility=0.55,
                                                        train_seconds=22, defense_seconds=5,
                                                        predefense_attack_success=0.8, predefense_utility=0.6),
}
DEFENSE_PARAMS = {"none": {}, "similarity-filter": {"fraction": 0.1}, "clean-finetune": {"epochs": 2}}


def add_trial(client, exp, parent, attack, count, defense, seed, metrics, *, status="FINISHED"):
    tags = {"poisonsweep.role": "trial", "mlflow.parentRunId": parent, "attack": attack, "defense": defense,
            "seed": str(seed)}
    run_id = client.create_run(exp, tags=tags).info.run_id
    params = {"name": "swp", "seed": seed, "attack.kind": attack, "attack.poison_count": count,
              "defense.kind": defense, **{f"defense.{k}": v for k, v in DEFENSE_PARAMS[defense].items()},
              "search.attack.poison_count": count}
    metrics = dict(metrics)
    if "clean_utility" in metrics:
        metrics["utility_drop"] = metrics["clean_utility"] - metrics["utility"]
    client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 6) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The SQLite store: experiment ``swp`` (the trials above and one failed run), ``empty`` (only a
    failed trial), ``lonely`` (an attack with a filter and no undefended trials)."""
    folder = tmp_path_factory.mktemp("defenses")
    uri = f"sqlite:///{folder / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("swp", artifact_location=(folder / "art").as_uri())
    parent = client.create_run(exp, tags={"poisonsweep.role": "sweep"}).info.run_id
    for (attack, count, defense, seed), metrics in TRIALS.items():
        add_trial(client, exp, parent, attack, count, defense, seed, metrics)
    add_trial(client, exp, parent, "mm-single-label", 150, "similarity-filter", 2,  # would break the front
              dict(attack_success=0.99, utility=0.1, train_seconds=999), status="FAILED")
    empty = client.create_experiment("empty", artifact_location=(folder / "art-e").as_uri())
    add_trial(client, empty, client.create_run(empty).info.run_id, "backdoor", 250, "none", 0,
              dict(attack_success=0.9, utility=0.8), status="FAILED")
    lonely = client.create_experiment("lonely", artifact_location=(folder / "art-l").as_uri())
    lonely_parent = client.create_run(lonely, tags={"poisonsweep.role": "sweep"}).info.run_id
    add_trial(client, lonely, lonely_parent, "backdoor", 250, "none", 0, dict(attack_success=0.9, utility=0.8))
    add_trial(client, lonely, lonely_parent, "targeted", 4, "similarity-filter", 0,
              dict(attack_success=0.5, utility=0.8, train_seconds=3, defense_seconds=1))
    return uri, client, parent


@pytest.fixture(scope="module")
def cli_run(store):
    """The CLI over ``swp`` once: its exit code, its printed output and the logged CSV."""
    uri, client, parent = store
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["defenses", "--experiment", "swp", "--tracking-uri", uri])
    return code, out.getvalue()


def row(table, attack, defense):
    match = table[(table["attack"] == attack) & (table["defense"] == defense)]
    assert len(match) == 1, match
    return match.iloc[0]


def test_cli_prints_the_table_and_exits_0(cli_run):
    code, out = cli_run
    assert code == 0
    assert "Defenses of swp (14 trials, 6 attack × defense configurations" in out
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["attack", "config", "defense", "defense"]
    body = [line.split() for line in lines[2:8]]
    assert [(b[0], b[2]) for b in body] == [  # undefended first within an attack
        ("backdoor", "none"), ("backdoor", "clean-finetune"), ("backdoor", "similarity-filter"),
        ("mm-single-label", "none"), ("mm-single-label", "clean-finetune"), ("mm-single-label", "similarity-filter")]
    assert "0.95 ± 0.12" in lines[2] and "1.5×" in lines[3] and "(pre)" in lines[3] and "1.08×" in lines[4]


def test_numbers_by_hand(cli_run, store):
    uri, client, parent = store
    path = client.download_artifacts(parent, "analysis/defenses.csv")
    table = pd.read_csv(path)
    none = row(table, "backdoor", "none")
    assert none["replicates"] == 3 and none["attack_success"] == pytest.approx(0.95)
    assert none["attack_success_ci95"] == pytest.approx(T2 * 0.05 / math.sqrt(3))  # std of .9, 1, .95 is .05
    assert none["utility_drop"] == pytest.approx(0.0) and none["cost_ratio"] == pytest.approx(1.0)
    filt = row(table, "backdoor", "similarity-filter")
    assert filt["baseline"] == "none" and filt["attack_success_without"] == pytest.approx(0.95)
    assert filt["attack_success_without_ci95"] == pytest.approx(none["attack_success_ci95"])
    assert filt["attack_success"] == pytest.approx(0.2)
    assert filt["attack_success_ci95"] == pytest.approx(T1 * math.sqrt(0.02) / math.sqrt(2))  # std of .1, .3
    assert filt["attack_success_removed"] == pytest.approx(0.75)
    assert filt["utility_drop"] == pytest.approx(0.82 - 0.79)
    assert filt["cost_seconds"] == pytest.approx(13.0)  # (9+2 + 11+4) / 2
    assert filt["cost_ratio"] == pytest.approx(13 / 12)  # against the undefended trials' 12 s
    tune = row(table, "backdoor", "clean-finetune")
    assert tune["baseline"] == "predefense" and tune["attack_success_without"] == pytest.approx(0.95)
    assert tune["attack_success"] == pytest.approx(0.04) and tune["utility"] == pytest.approx(0.80)
    assert tune["attack_success_ci95"] == pytest.approx(T2 * 0.02 / math.sqrt(3))
    assert tune["cost_ratio"] == pytest.approx(18 / 12)  # (16 + 18 + 20) / 3 against its own 12 s of training
    mm_filter = row(table, "mm-single-label", "similarity-filter")
    assert mm_filter["replicates"] == 2  # the failed run is not one of them
    assert mm_filter["attack_success_ci95"] == 0 and mm_filter["cost_ratio"] == pytest.approx(21 / 21)
    assert mm_filter["attack_success_without"] == pytest.approx(0.7)
    # backdoor: none (.95, .82) has the best utility, clean-finetune (.04, .80) the lowest success,
    # the filter (.2, .79) is beaten by clean-finetune on both. mm: the filter (.1, .57) beats none
    # (.7, .55) on both and clean-finetune (.1, .52) on utility at equal success.
    front = {(r.attack, r.defense): r.pareto for r in table.itertuples()}
    assert front == {("backdoor", "none"): True, ("backdoor", "clean-finetune"): True,
                     ("backdoor", "similarity-filter"): False, ("mm-single-label", "none"): False,
                     ("mm-single-label", "similarity-filter"): True, ("mm-single-label", "clean-finetune"): False}


def test_artifacts_on_the_parent_run(cli_run, store):
    uri, client, parent = store
    logged = {a.path for a in client.list_artifacts(parent, "analysis")}
    assert logged == {"analysis/defenses.csv", "analysis/defenses.png"}
    png = client.download_artifacts(parent, "analysis/defenses.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_parent_option_reads_and_logs_one_launch(store, capsys):
    uri, client, parent = store
    assert main(["defenses", "--experiment", "swp", "--tracking-uri", uri, "--parent", parent]) == 0
    assert f"to run {parent}" in capsys.readouterr().out
    assert main(["defenses", "--experiment", "swp", "--tracking-uri", uri, "--parent", "0" * 32]) == 2
    assert f"'swp' has no finished trial runs of parent run {'0' * 32}" in capsys.readouterr().err


@pytest.mark.parametrize("experiment, message", [
    ("nope", "poisonsweep: error: --experiment: no MLflow experiment 'nope'; experiments: "),
    ("empty", "poisonsweep: error: --experiment: 'empty' has no finished trial runs\n"),
    ("lonely", "poisonsweep: error: no defense=none baseline for attack 'targeted' (one configuration of it has "
               "trials of similarity-filter only, without predefense_attack_success): run defense.kind=none "
               "with the same attack config\n"),
])
def test_bad_input_is_one_clear_message_and_exit_2(store, capsys, experiment, message):
    uri, _, _ = store
    assert main(["defenses", "--experiment", experiment, "--tracking-uri", uri]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1 and captured.out == ""


def frame(rows):
    """rows: (run_id, poison_count, defense, fraction, seed, attack_success, utility)."""
    return pd.DataFrame([{"run_id": i, "params.attack.kind": "backdoor", "params.attack.poison_count": str(c),
                          "params.defense.kind": d, "params.defense.fraction": f, "params.seed": str(s),
                          "metrics.attack_success": a, "metrics.utility": u, "metrics.train_seconds": 10.0}
                         for i, c, d, f, s, a, u in rows])


def test_configs_differing_beyond_the_seed_stay_apart_and_match_their_own_baseline():
    table = defense_table(frame([
        ("n50", 50, "none", None, 0, 0.3, 0.8), ("n300", 300, "none", None, 0, 0.9, 0.8),
        ("f50", 50, "similarity-filter", "0.1", 0, 0.1, 0.8), ("f300", 300, "similarity-filter", "0.1", 0, 0.2, 0.7),
        ("g300", 300, "similarity-filter", "0.2", 0, 0.1, 0.6), ("g300b", 300, "similarity-filter", "0.2", 1, 0.3, 0.6),
    ]))
    got = {(r.attack_params, r.defense, r.defense_params): (r.replicates, r.attack_success_without, r.pareto)
           for r in table.itertuples()}
    assert got == {
        ("poison_count=300", "none", ""): (1, 0.9, True),
        ("poison_count=300", "similarity-filter", "fraction=0.1"): (1, 0.9, True),
        ("poison_count=300", "similarity-filter", "fraction=0.2"): (2, 0.9, False),  # (.2, .6) vs (.2, .7)
        ("poison_count=50", "none", ""): (1, 0.3, False),
        ("poison_count=50", "similarity-filter", "fraction=0.1"): (1, 0.3, True),
    }


def test_a_table_needs_its_headline_metrics():
    with pytest.raises(ConfigError, match="no finished trial reports utility"):
        defense_table(frame([("a", 1, "none", None, 0, 0.3, 0.8)]).drop(columns="metrics.utility"))


def test_the_analysis_verbs_import_neither_torch_nor_ray(store):
    """``pareto`` and ``defenses`` read MLflow tables: a process that runs both never imports
    torch, torchvision, open_clip or Ray (seconds saved on every call)."""
    import subprocess
    import sys

    uri, _, _ = store
    script = ("import sys; from sweeps.cli import main; "
              f"codes = [main(['pareto', '--experiment', 'swp', '--objectives', 'attack_success:max,utility:max', '--tracking-uri', {uri!r}]), "
              f"main(['defenses', '--experiment', 'swp', '--tracking-uri', {uri!r}])]; "
              "print('CODES', codes, 'HEAVY', sorted(m for m in ('torch', 'torchvision', 'open_clip', 'ray') "
              "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300).stdout
    assert "CODES [0, 0] HEAVY []" in out, out[-2000:]
