"""The minimal-budget search: its pure core on simulated dose-responses with a known
crossing (coverage of the interval, trials against a grid, bad input), and one real
search through Ray Tune into MLflow."""
import math

import numpy as np
import pytest
import yaml

from poison import ConfigError
from sweeps.budget._search import BudgetOptions, prepare_budget, rate_of
from sweeps.budget._stats import (
    BudgetSearch,
    Point,
    SimulatedResponse,
    best_variance,
    crossing_variance,
    fit_curve,
    grid_estimate,
    log_counts,
    run_simulated,
)
from sweeps.cli import main
from sweeps.config._schema import validate_config
from tests.support import backdoor, launch_runs

LOW, HIGH = 10, 2000


def coverage(response: SimulatedResponse, repeats: int = 200, **options) -> tuple[float, list]:
    """The fraction of ``repeats`` searches (fixed seeds) whose interval holds the true crossing."""
    truth = response.true_crossing(LOW, HIGH)
    estimates = []
    for r in range(repeats):
        search = BudgetSearch(low=LOW, high=HIGH, threshold=response.threshold, **options)
        estimates.append(run_simulated(search, response, np.random.default_rng([7, r])))
    return float(np.mean([e.low <= truth <= e.high for e in estimates])), estimates


# 200 repeats: the binomial standard error of a 95% coverage is 0.015, of an 80% one 0.028
@pytest.mark.parametrize("crossing,slope", [(150, 5.0), (40, 2.5)])
def test_interval_covers_the_true_crossing_at_the_stated_rate(crossing, slope):
    response = SimulatedResponse(crossing=crossing, slope=slope, threshold=0.9)
    rate, estimates = coverage(response, replicates=3, max_trials=90)
    assert 0.91 <= rate <= 0.995, rate
    assert all(e.status == "ok" for e in estimates)  # each stopped on its precision, not its budget
    assert np.median([e.rel_width for e in estimates]) <= 0.5


def test_a_lower_confidence_gives_a_narrower_interval_that_covers_less():
    response = SimulatedResponse(crossing=300, slope=4.0, threshold=0.8)
    rate, _ = coverage(response, replicates=3, max_trials=90, confidence=0.8, rel_width=0.3)
    assert 0.72 <= rate <= 0.9, rate


def test_coverage_holds_with_a_background_rate_and_beta_noise():
    # a retrieval attack's chance hit rate (the clean model's success) is the curve's floor
    response = SimulatedResponse(crossing=80, slope=3.0, threshold=0.9, floor=0.3, concentration=15)
    rate, _ = coverage(response, replicates=3, max_trials=90, floor=0.3)
    assert 0.91 <= rate <= 0.995, rate


def test_coverage_holds_when_each_seed_succeeds_all_or_nothing():
    # real backdoor trials: each seed's success is close to a step at a count of its own, so a
    # trial is nearly 0 or 1 (Beta concentration 0.5: U-shaped). Bisecting the gap between a
    # failing and a succeeding count then narrowed it to two neighbouring counts whose means
    # flipped around the threshold from round to round; the slope was never identified and
    # the search ended on that gap: coverage 0.885 here before such rounds were spread across
    # the fitted curve's rise (0.94 since), 0.68 on a bracket of 5-600
    response = SimulatedResponse(crossing=30, slope=4.0, threshold=0.9, concentration=0.5)
    rate, estimates = coverage(response, replicates=3, max_trials=120, rel_width=0.5)
    assert 0.91 <= rate <= 0.995, rate
    assert np.mean([e.method == "fieller" for e in estimates]) >= 0.95


def test_a_non_monotone_wiggle_costs_some_coverage_but_does_not_break_it():
    # a wiggle of ±0.03 on the whole curve: non-monotone on the plateau, and the first
    # crossing of the true mean (the truth) is 7% below the logistic's own. The model is
    # then wrong, so the nominal 95% cannot be promised: measured 0.815 here (0.865 with
    # other seeds); it was 0.26-0.6 before saturated points were left out of the fit
    response = SimulatedResponse(crossing=150, slope=4.0, threshold=0.9, wiggle=0.03, period=1.5)
    truth = response.true_crossing(LOW, HIGH)
    grid = np.geomspace(LOW, HIGH, 2000)
    assert np.any(np.diff(response.mean(grid)) < 0) and abs(truth / 150 - 1) > 0.05
    rate, _ = coverage(response, replicates=3, max_trials=90)
    assert rate >= 0.78, rate


def test_fewer_trials_than_a_grid_for_a_tighter_interval():
    # (benchmarks/budget_search.py measures the ratio across scenarios)
    response = SimulatedResponse(crossing=150, slope=5.0, threshold=0.9)
    _, seq = coverage(response, repeats=100, replicates=3, max_trials=90)
    grid = [grid_estimate(response, np.random.default_rng([8, r]), low=LOW, high=HIGH, counts=12, replicates=3,
                          threshold=0.9) for r in range(100)]
    assert grid[0].trials == 36
    assert np.mean([e.trials for e in seq]) <= 0.7 * 36  # measured: 22
    assert np.median([e.rel_width for e in seq]) <= np.median([e.rel_width for e in grid])


def test_no_design_beats_every_trial_at_the_crossing():
    """best_variance, the floor benchmarks/budget_bound.py divides by: the one-count design at the
    crossing reaches it, and no two-count design on a fine grid of counts and shares goes below."""
    crossing, slope, threshold = 55.0, 1.6, 0.9
    best = best_variance(slope=slope, threshold=threshold)
    assert best == pytest.approx(1 / (1.6**2 * 0.09))  # 4.34
    assert crossing_variance([crossing], crossing=crossing, slope=slope, threshold=threshold) == pytest.approx(best)
    counts = np.geomspace(5, 600, 60)
    least = min(crossing_variance([c1, c2], shares=[s, 1 - s], crossing=crossing, slope=slope, threshold=threshold)
                for i, c1 in enumerate(counts) for c2 in counts[i + 1:] for s in np.linspace(0.05, 0.95, 19))
    assert best <= least < 1.05 * best  # two counts either side of 55 come close
    # beyond |logit τ| 2.39 two counts beat one at the crossing (Elfving), so the floor is refused there
    # (at τ 0.99, counts where the logit is ∓2.4: 0.69 and 13.95 pairs, shares 0.2 and 0.8: 0.48 of it)
    two = crossing_variance([0.69, 13.95], shares=[0.2, 0.8], crossing=55.0, slope=slope, threshold=0.99)
    assert two < 0.5 / (slope**2 * 0.99 * 0.01)
    with pytest.raises(ValueError, match="0.084-0.916"):
        best_variance(slope=slope, threshold=0.95)
    # a count without trials adds nothing; shares must fit the counts
    assert crossing_variance([55.0, 200.0], shares=[1.0, 0.0], crossing=crossing, slope=slope,
                             threshold=threshold) == pytest.approx(best)
    with pytest.raises(ValueError, match="shares"):
        crossing_variance([20.0, 55.0], shares=[1.0], crossing=crossing, slope=slope, threshold=threshold)
    grid = crossing_variance(log_counts(5, 600, 33), crossing=crossing, slope=slope, threshold=threshold)
    assert 0.44 < best / grid < 0.50  # the real trials' curve at 0.9: no design does with a third of this grid's trials


@pytest.mark.parametrize("slope, threshold, concentration, counts", [(1.6, 0.5, 1.0, 33), (4.0, 0.5, 2.0, 17)])
def test_the_large_sample_variance_is_what_simulated_grids_scatter(slope, threshold, concentration, counts):
    """crossing_variance predicts the spread of the fitted log crossing over 300 simulated grids of
    3 trials per count, with φ from the Beta-Binomial noise: measured/predicted 1.05 and 1.06."""
    response = SimulatedResponse(crossing=30.0, slope=slope, threshold=threshold, concentration=concentration)
    logs = [math.log(grid_estimate(response, np.random.default_rng([9, r]), low=5, high=600, counts=counts,
                                   replicates=3, threshold=threshold).count) for r in range(300)]
    grid = log_counts(5, 600, counts)
    assert response.dispersion == 1 / 200 + (1 - 1 / 200) / (concentration + 1)  # 200 test images
    predicted = response.dispersion * crossing_variance(grid, crossing=30.0, slope=slope, threshold=threshold) / (3 * len(grid))
    assert 0.8 < np.var(logs) / predicted < 1.25


def test_points_are_unique_replicated_and_within_budget():
    search = BudgetSearch(low=LOW, high=HIGH, threshold=0.9, replicates=3, max_trials=40, rel_width=0.01)
    response = SimulatedResponse(crossing=100, slope=3.0)
    rng = np.random.default_rng(0)
    seen = []
    while not search.done:
        batch = search.propose()
        assert batch and all(LOW <= p.count <= HIGH for p in batch)
        seen += batch
        for p in batch:
            search.observe(p, response.sample(p.count, rng))
    assert len(seen) == len(set(seen)) == search.trials == 40  # no (count, seed) twice; budget spent exactly
    first = seen[:12]  # round 0: four log-spaced counts, three trials at each
    assert sorted({p.count for p in first}) == [10, 58, 342, 2000]
    assert [p.seed for p in seen] == list(range(40))  # every trial its own seed: no seed shared by two counts
    assert [[p.seed for p in first if p.count == c] for c in (10, 58)] == [[0, 1, 2], [3, 4, 5]]
    assert search.propose() == [] and search.estimate().status == "wide"


def test_same_observations_same_proposals():
    def run() -> list[Point]:
        search = BudgetSearch(low=5, high=500, threshold=0.9, replicates=2, seed=11)
        rng, out = np.random.default_rng(3), []
        while not search.done:
            batch = search.propose()
            out += batch
            for p in batch:
                search.observe(p, SimulatedResponse(crossing=60, slope=3.0).sample(p.count, rng))
        return out

    first = run()
    assert first == run() and min(p.seed for p in first) == 11


def test_a_crossing_outside_the_bracket_is_said_so():
    above = BudgetSearch(low=LOW, high=HIGH, threshold=0.9, replicates=2)
    est = run_simulated(above, SimulatedResponse(crossing=20000, slope=4.0), np.random.default_rng(0))
    assert est.status == "not-reached" and est.trials < 20
    below = BudgetSearch(low=LOW, high=HIGH, threshold=0.9, replicates=2)
    est = run_simulated(below, SimulatedResponse(crossing=2, slope=4.0), np.random.default_rng(0))
    assert est.status == "below-low" and est.trials < 20


def test_a_failed_trial_is_spent_but_not_observed():
    search = BudgetSearch(low=LOW, high=HIGH, threshold=0.9, replicates=1, max_trials=4)
    for point in search.propose():
        search.observe(point, None if point.count == 58 else 0.5)
    assert search.trials == 4 and len(search.observations) == 3 and search.done


def test_fit_recovers_a_noise_free_curve():
    response = SimulatedResponse(crossing=123, slope=3.0, threshold=0.9)
    counts = np.geomspace(30, 400, 12)
    curve = fit_curve(counts, response.mean(counts))
    assert curve.crossing(0.9) == pytest.approx(123, rel=1e-3) and curve.b == pytest.approx(3.0, rel=1e-3)
    assert fit_curve([10, 20, 40, 80], [0, 0, 1, 1]) is None  # separated: no slope to find


@pytest.mark.parametrize("options,message", [
    ({"threshold": 1.0}, "--threshold: must lie strictly between 0 and 1, got 1.0"),
    ({"threshold": 0.0}, "--threshold: must lie strictly between 0 and 1"),
    ({"confidence": 1.5}, "--confidence: must lie strictly between 0 and 1"),
    ({"low": 100, "high": 100}, "--low/--high: low < high must hold, but got low=100, high=100"),
    ({"low": 0}, "--low/--high: whole poison counts of at least 1"),
    ({"replicates": 0}, "--replicates: at least 1"),
    ({"max_trials": 5}, "--max-trials: 5 is fewer than the first round's 4 counts × 3 replicates"),
    ({"rel_width": 0}, "--rel-width: must be positive"),
])
def test_bad_search_options_name_the_option(options, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        BudgetSearch(**{"low": LOW, "high": HIGH, "threshold": 0.9, **options})


TINY = {
    "name": "budget-e2e",
    "seed": 0,
    "data": {"size": 600, "test_size": 96},
    "train": {"epochs": 1, "batch_size": 64, "lr": {"choices": [2.0e-3, 1.0e-3], "default": 2.0e-3}},
    "attack": {**backdoor(), "poison_count": {"low": 10, "high": 120, "log": True, "default": 40}},
    "search": {"max_concurrent": 2},
    "resources": {"cpu": 1},
}


def _sweep(**attack):
    return validate_config({**TINY, "attack": {**TINY["attack"], **attack}})


def test_budget_config_takes_the_bracket_from_the_dimension_and_fixes_the_rest():
    budget, search = prepare_budget(_sweep(), BudgetOptions(threshold=0.9))
    assert (search.low, search.high, search.seed, search.replicates) == (10, 120, 0, 3)
    assert set(budget.dimensions) == {"attack.poison_count", "seed"}  # train.lr is fixed at its default
    assert budget.resolve({"attack.poison_count": 77, "seed": 5}).train.lr == 2.0e-3
    assert budget.resolve({"attack.poison_count": 77, "seed": 5}).seed == 5
    _, search = prepare_budget(_sweep(), BudgetOptions(threshold=0.9, low=20))
    assert (search.low, search.high) == (20, 120)


@pytest.mark.parametrize("attack,options,message", [
    ({"poison_count": 40}, {}, "attack.poison_count: nothing to search (a fixed count of 40): make it a range "
                               "{low: ..., high: ..., log: true} or give --low and --high"),
    ({"poison_count": 40}, {"low": 10}, "attack.poison_count: nothing to search (a fixed count of 40): "
                                        "make it a range {low: ..., high: ..., log: true} or give --high"),
    ({}, {"low": 200}, "--low/--high: a bracket 1 <= low < high is needed, but got low=200, high=120"),
    ({"poison_count": 40}, {"low": 10, "high": 10**6}, "attack.poison_count: high (1000000): 1,000,000 exceeds"),
    ({}, {"threshold": 1.5}, "--threshold: must lie strictly between 0 and 1"),
])
def test_bad_budget_input_names_the_key_or_option(attack, options, message):
    with pytest.raises(ConfigError) as err:
        prepare_budget(_sweep(**attack), BudgetOptions(**{"threshold": 0.9, **options}))
    assert str(err.value).startswith(message), str(err.value)


def test_cli_bad_budget_input_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "fixed.yaml"
    path.write_text(yaml.safe_dump({**TINY, "attack": backdoor(40)}))
    assert main(["budget", str(path), "--threshold", "0.9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("poisonsweep: error: attack.poison_count: nothing to search") and len(err.splitlines()) == 1
    assert not (tmp_path / "poisonsweep_results").exists()


def test_rate_of_follows_the_training_set_size():
    injected = rate_of([(10, 10 / 1010), (100, 100 / 1100)])
    replaced = rate_of([(10, 10 / 1000), (100, 100 / 1000)])
    assert injected(50) == pytest.approx(50 / 1050) and replaced(50) == pytest.approx(0.05)
    assert rate_of([]) is None and injected(math.inf) == math.inf


@pytest.mark.slow
def test_budget_search_runs_real_trials_into_mlflow(tmp_path, ray_local, capsys):
    path = tmp_path / "budget.yaml"
    path.write_text(yaml.safe_dump({**TINY, "storage": {"path": str(tmp_path / "results")}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["budget", str(path), "--threshold", "0.5", "--max-trials", "6", "--replicates", "1",
                 "--tracking-uri", uri])
    assert code == 0
    client, parent, children = launch_runs(uri, "budget-e2e", "budget")
    assert len(children) == 6 and parent.info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" for c in children)
    # round 0: four log-spaced counts over the dimension's bracket; then round 1
    counts = sorted(int(c.data.params["attack.poison_count"]) for c in children if c.data.tags["budget.round"] == "1")
    assert counts == [10, 23, 52, 120]
    assert {c.data.tags["budget.round"] for c in children} == {"1", "2"}
    for child in children:
        m, p, t = child.data.metrics, child.data.params, child.data.tags
        assert m["poison_count"] == int(p["attack.poison_count"]) and 10 <= m["poison_count"] <= 120
        assert p["train.lr"] == "0.002" and p["seed"] == t["seed"]
        assert {"attack_success", "utility", "poison_rate"} <= set(m)
        # a clean model for the first --replicates seeds only (here seed 0): the background rate
        assert ("clean_attack_success" in m) == ("utility_drop" in m) == (p["seed"] == "0")
    assert sorted(int(c.data.params["seed"]) for c in children) == list(range(6))  # every trial its own seed
    assert {"config.yaml", "trials.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "budget")}
    assert artifacts == {"budget/budget_points.csv", "budget/budget.json", "budget/budget_curve.png"}
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "analysis")}  # the launch's report
    assert {"analysis/report.html", "analysis/report-budget.png"} <= report, report
    png = client.download_artifacts(parent.info.run_id, "budget/budget_curve.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    csv = open(client.download_artifacts(parent.info.run_id, "budget/budget_points.csv", str(tmp_path))).read()
    assert len(csv.strip().splitlines()) == 7 and csv.startswith("poison_count,seed,status,attack_success")
    pm, pp = parent.data.metrics, parent.data.params
    assert pm["budget_trials"] == 6 and pp["budget.threshold"] == "0.5" and pp["budget.replicates"] == "1"
    assert parent.data.tags["budget.status"] in {"ok", "wide", "not-reached", "below-low"}
    if "budget_count" in pm:
        assert pm["budget_count_low"] <= pm["budget_count"] <= pm["budget_count_high"]
        assert pm["budget_rate"] == pytest.approx(pm["budget_count"] / (600 + pm["budget_count"]), rel=1e-6)
    out = capsys.readouterr().out
    assert "Minimal poison budget for attack_success >= 0.5" in out and "round 2 done" in out
    assert "poisonsweep ui --tracking-uri " + uri in out


def _outcome(search: BudgetSearch, rate=None):
    from sweeps.budget._search import BudgetOutcome

    return BudgetOutcome(search.estimate(), rate, [], search, "0", "run", "sqlite://")


def test_only_a_fitted_interval_is_printed_as_a_confidence_interval():
    """Seeds that succeed all or nothing at 30 leave a gap between two counts and no curve: the
    summary says what that is, and claims no confidence; a Fieller interval is printed as the CI it is."""
    from sweeps.budget._search import describe, summary

    step = BudgetSearch(low=5, high=5000, threshold=0.9, replicates=2, max_trials=16)
    while not step.done:
        for point in step.propose():
            step.observe(point, float(point.count >= 30))
    est = step.estimate()
    assert est.method == "gap" and est.low < 30 <= est.high
    text = summary(_outcome(step, rate=(0.01, 0.005, 0.02))) + describe(est)
    assert "CI" not in text and text.count("no confidence level") == 3  # count, rate and the round's line
    assert f"between {math.floor(est.low)}, whose mean falls short, and {math.ceil(est.high)}" in text

    fitted = BudgetSearch(low=LOW, high=HIGH, threshold=0.9, replicates=3)
    est = run_simulated(fitted, SimulatedResponse(crossing=150, slope=4.0), np.random.default_rng(0))
    assert est.method == "fieller"
    text = summary(_outcome(fitted)) + describe(est)
    assert text.count("95% CI") == 2 and "no confidence level" not in text
