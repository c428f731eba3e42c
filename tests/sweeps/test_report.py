"""The sweep report (``analysis/report.html``) over hand-made MLflow stores: what the page's
figures hold, read back from the plotly figures embedded in it."""
import base64
import json
import re

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from poison import ConfigError
from sweeps.analysis._report import write_report
from sweeps.cli import main

OBJECTIVES = "attack_success:max,utility:max,poison_count:min"


def add_trial(client, exp, parent, name, params, metrics, *, status="FINISHED"):
    tags = {"poisonsweep.role": "trial", "mlflow.parentRunId": parent, "mlflow.runName": name,
            "attack": "backdoor", "defense": params.get("defense.kind", "none")}
    run_id = client.create_run(exp, tags=tags).info.run_id
    client.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run_id, status)
    return run_id


def trial_metrics(count, success, utility):
    return {"attack_success": success, "utility": utility, "poison_count": count, "clean_utility": 0.8,
            "clean_attack_success": 0.05, "train_seconds": 10}


def launch(client, exp, role, params=None, *, start=0):
    run = client.create_run(exp, tags={"poisonsweep.role": role}, run_name=f"swp-{role}", start_time=start)
    for k, v in (params or {}).items():
        client.log_param(run.info.run_id, k, v)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """``swp``: a sweep of 4 trials (one failed beside them), then a second launch of 3 configurations
    × 2 seeds with two defenses; ``bud``: a budget launch of 8 trials at 4 counts."""
    folder = tmp_path_factory.mktemp("report")
    client = MlflowClient(f"sqlite:///{folder / 'm.db'}")
    exp = client.create_experiment("swp", artifact_location=(folder / "art").as_uri())
    first = launch(client, exp, "sweep", {"search.objectives": OBJECTIVES}, start=1000)
    ids = {"first": [add_trial(client, exp, first, f"t{i}", {"seed": 0, "search.attack.poison_count": c,
                                                            "attack.poison_count": c},
                               trial_metrics(c, s, u))
                     for i, (c, s, u) in enumerate([(10, 0.3, 0.79), (30, 0.6, 0.78), (100, 0.9, 0.70),
                                                    (50, 0.5, 0.60)])]}
    add_trial(client, exp, first, "failed", {"seed": 0, "attack.poison_count": 20}, trial_metrics(20, 1.0, 0.9),
              status="FAILED")
    second = launch(client, exp, "sweep", {"search.objectives": OBJECTIVES}, start=2000)
    ids["second"] = [add_trial(client, exp, second, f"r{c}-{d}-{seed}",
                               {"seed": seed, "attack.poison_count": c, "defense.kind": d},
                               trial_metrics(c, s + 0.02 * seed, u - 0.01 * seed))
                     for c, s, u in [(10, 0.4, 0.78), (40, 0.7, 0.75)] for d in ("none", "similarity-filter")
                     for seed in (0, 1)]
    bud = client.create_experiment("bud", artifact_location=(folder / "art-b").as_uri())
    budget = launch(client, bud, "budget", {"budget.threshold": 0.5, "budget.confidence": 0.95})
    for k, v in {"budget_count": 31.0, "budget_count_low": 22.0, "budget_count_high": 45.0,
                 "budget_floor": 0.05}.items():
        client.log_metric(budget, k, v)
    ids["budget"] = [add_trial(client, bud, budget, f"b{c}-{seed}", {"seed": seed, "attack.poison_count": c},
                               trial_metrics(c, s, 0.78))
                     for c, pair in [(8, (0.06, 0.1)), (20, (0.2, 0.35)), (50, (0.7, 0.6)), (120, (0.95, 0.9))]
                     for seed, s in enumerate(pair)]
    return client, {"first": first, "second": second, "budget": budget}, ids


def figures(path):
    """The plotly figures in the page, by div id: {id: {"data": [...], "layout": {...}}}."""
    text = path.read_text()
    out = {}
    for div, body in re.findall(r'Plotly\.newPlot\(\s*"([^"]+)",\s*(\[.*?\]),\s*\{', text, flags=re.S):
        out[div] = json.loads(body)
    return out


def values(array):
    """A trace's array as numpy: plotly writes numeric arrays base64-encoded (``bdata``)."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"])
    return np.asarray(array)


@pytest.fixture(scope="module")
def reports(store, tmp_path_factory):
    """The report of each launch: the first (by --parent), the latest of ``swp`` (the second) and the budget."""
    client, parents, _ = store
    out = {}
    for key, experiment, parent in [("first", "swp", parents["first"]), ("second", "swp", None),
                                    ("budget", "bud", None)]:
        folder = tmp_path_factory.mktemp(key)
        out[key] = write_report(client, experiment, parent, folder)
    return out


PAIRS = ["attack_success-vs-utility", "attack_success-vs-poison_count", "utility-vs-poison_count"]


def trace(figure, name):
    found = [t for t in figure if t.get("name") == name]
    assert len(found) == 1, [t.get("name") for t in figure]
    return found[0]


def shapes(path, div):
    """The layout shapes (reference lines, bands) of the figure ``div``, by name."""
    text = path.read_text()
    start = text.index(f'"{div}"')
    layout = text[text.index("\"shapes\":", start):]
    return {s["name"]: s for s in json.JSONDecoder().raw_decode(layout[layout.index("["):])[0]}


@pytest.mark.parametrize("launch_key", ["first", "second", "budget"])
def test_one_point_per_trial_in_every_pair_each_with_its_run(store, reports, launch_key):
    _, _, ids = store
    found = figures(reports[launch_key])
    assert set(found) >= {f"figure-pareto-{p}" for p in PAIRS}
    for pair in PAIRS:
        trials = trace(found[f"figure-pareto-{pair}"], "trials")
        assert len(values(trials["x"])) == len(values(trials["y"])) == len(ids[launch_key])
        assert sorted(row[0] for row in trials["customdata"]) == sorted(ids[launch_key])  # the failed run is not one


def test_every_link_is_a_run_of_the_launch(store, reports):
    client, parents, ids = store
    text = reports["first"].read_text()
    links = re.findall(r'<a class="run" href="([^"]+)"[^>]*data-run-id="([^"]+)"', text)
    experiment = client.get_experiment_by_name("swp").experiment_id
    assert {run for _, run in links} == {*ids["first"], parents["first"]}
    assert all(href == f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run}" for href, run in links)
    assert text.count("plotly.js v") == 1  # inlined once, for every figure


def test_clean_model_reference_lines(reports):
    lines = shapes(reports["first"], "figure-pareto-attack_success-vs-utility")
    assert lines["clean model: utility 0.8"]["y0"] == pytest.approx(0.8)  # utility on the y axis
    assert lines["clean model: attack_success 0.05"]["x0"] == pytest.approx(0.05)
    assert set(shapes(reports["first"], "figure-pareto-utility-vs-poison_count")) == {"clean model: utility 0.8"}


def test_replicates_get_their_interval_and_no_replicates_none(reports):
    assert "mean of seeds (95% interval)" not in str(figures(reports["first"]))
    means = trace(figures(reports["second"])["figure-pareto-attack_success-vs-utility"],
                  "mean of seeds (95% interval)")
    assert len(values(means["x"])) == 4  # 2 counts × 2 defenses, 2 seeds each
    # count 10, no defense: attack_success 0.40 and 0.42; Student's t with 1 degree of freedom
    at = int(np.flatnonzero(np.isclose(values(means["x"]), 0.41))[0])
    half = 12.706204736174696 * np.std([0.40, 0.42], ddof=1) / np.sqrt(2)
    assert values(means["error_x"]["array"])[at] == pytest.approx(half)
    assert values(means["error_x"]["arrayminus"])[at] == pytest.approx(half)


def test_defense_chart_only_with_defenses(reports):
    assert "figure-defenses" not in figures(reports["first"])
    chart = figures(reports["second"])["figure-defenses"]
    assert sorted(t["name"] for t in chart) == ["none", "similarity-filter"]
    assert all(len(values(t["x"])) == 2 for t in chart)  # one point per attack configuration
    assert (reports["second"].parent / "report-defenses.png").stat().st_size > 0


def test_a_budget_launch_gets_its_budget_curve(reports):
    found = figures(reports["budget"])
    assert "figure-budget" not in figures(reports["first"])
    curve = found["figure-budget"]
    assert len(values(trace(curve, "trials")["x"])) == 8
    assert sorted(values(trace(curve, "mean per count (95% interval)")["x"])) == [8, 20, 50, 120]
    assert len(values(trace(curve, "fitted dose-response")["x"])) > 0
    lines = shapes(reports["budget"], "figure-budget")
    assert lines["threshold 0.5"]["y0"] == 0.5 and lines["budget 31"]["x0"] == 31
    assert (lines["95% interval"]["x0"], lines["95% interval"]["x1"]) == (22, 45)
    assert lines["clean model: attack_success 0.05"]["y0"] == pytest.approx(0.05)


def test_logged_to_the_parent_run_with_a_png_per_figure(store, reports):
    client, parents, _ = store
    logged = sorted(a.path for a in client.list_artifacts(parents["budget"], "analysis"))
    assert logged == sorted(f"analysis/{p.name}" for p in reports["budget"].parent.iterdir())
    assert logged == ["analysis/report-budget.png", *(f"analysis/report-pareto-{p}.png" for p in sorted(PAIRS)),
                      "analysis/report.html"]


def test_cli_writes_the_report_and_prints_its_path(store, tmp_path, capsys):
    client, parents, ids = store
    code = main(["report", "--experiment", "swp", "--parent", parents["first"], "--output", str(tmp_path),
                 "--objectives", "attack_success:max,utility:max", "--ui-url", "https://mlflow.example.org/ui",
                 "--tracking-uri", client.tracking_uri])
    assert code == 0 and capsys.readouterr().out.strip() == str(tmp_path / "report.html")
    text = (tmp_path / "report.html").read_text()
    assert list(figures(tmp_path / "report.html")) == ["figure-pareto-attack_success-vs-utility"]
    assert 'href="https://mlflow.example.org/ui/#/experiments/' in text


@pytest.mark.parametrize("args, message", [
    (["--experiment", "nope"], "--experiment: no MLflow experiment 'nope'; experiments: "),
    (["--experiment", "swp", "--parent", "0123abcd"], "--parent: experiment 'swp' has no run 0123abcd"),
    (["--experiment", "swp", "--output", "/nonexistent/folder"],
     "--output: /nonexistent/folder: the folder /nonexistent does not exist"),
    (["--experiment", "swp", "--output", __file__], f"--output: {__file__} is not a folder"),
])
def test_bad_input_is_one_clear_line_and_exit_2(store, capsys, args, message):
    client, _, _ = store
    assert main(["report", *args, "--tracking-uri", client.tracking_uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    with pytest.raises(ConfigError, match="no MLflow experiment 'nope'"):
        write_report(client, "nope", None, ".")


def test_output_names_a_new_folder_in_an_existing_one(store, tmp_path, capsys):
    client, _, _ = store
    assert main(["report", "--experiment", "swp", "--output", str(tmp_path / "new"), "--tracking-uri",
                 client.tracking_uri]) == 0
    assert (tmp_path / "new" / "report.html").is_file()
    assert main(["report", "--experiment", "nope", "--output", str(tmp_path / "none"), "--tracking-uri",
                 client.tracking_uri]) == 2
    assert not (tmp_path / "none").exists()  # refused before anything is written


def test_the_report_imports_neither_torch_nor_ray(store, tmp_path):
    """A budget launch's report fits the dose-response again (sweeps.budget's statistics): the
    process still never imports torch, open_clip or Ray."""
    import subprocess
    import sys

    client, _, _ = store
    script = ("import sys; from sweeps.cli import main; "
              f"code = main(['report', '--experiment', 'bud', '--output', {str(tmp_path)!r}, "
              f"'--tracking-uri', {client.tracking_uri!r}]); "
              "print('CODE', code, 'HEAVY', sorted(m for m in ('torch', 'torchvision', 'open_clip', 'ray') "
              "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300).stdout
    assert "CODE 0 HEAVY []" in out, out[-2000:]
    assert (tmp_path / "report-budget.png").is_file()


def test_the_trial_table_has_a_row_per_trial_with_its_defense(store, reports):
    _, _, ids = store
    text = reports["second"].read_text()
    head = re.findall(r"<th>([^<]*)</th>", text[text.index('<table class="trials">'):])
    assert head == ["trial", "run", "defense", "attack_success", "utility", "poison_count", "clean_utility",
                    "clean_attack_success", "front"]
    rows = re.findall(r"<tr><td>(r\d+-[a-z-]+-\d)</td>.*?data-run-id=\"(\w+)\".*?<td>([a-z-]+)</td>", text)
    assert sorted(run for _, run, _ in rows) == sorted(ids["second"])
    assert all(name.split("-", 1)[1].rsplit("-", 1)[0] == defense for name, _, defense in rows)
    assert "<th>defense</th>" not in reports["first"].read_text()  # one defense: no column


def test_an_experiment_without_launch_runs_gets_a_report_of_all_its_trials(store, tmp_path):
    client, _, _ = store
    exp = client.create_experiment("loose", artifact_location=(tmp_path / "art").as_uri())
    runs = [add_trial(client, exp, "", f"t{i}", {"seed": i}, trial_metrics(10 * (i + 1), 0.3 * i, 0.7))
            for i in range(3)]
    path = write_report(client, "loose", None, tmp_path)
    trials = trace(figures(path)["figure-pareto-attack_success-vs-utility"], "trials")
    assert sorted(row[0] for row in trials["customdata"]) == sorted(runs)
    assert "Launch (every run): 3 finished trials" in path.read_text()
