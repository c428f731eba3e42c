"""``poisonsweep budget``: the minimal poison budget, searched through Ray Tune into MLflow.

:func:`prepare_budget` turns a sweep config into the budget search's own config (every
dimension at its default but ``attack.poison_count``, whose low/high, or ``--low``/``--high``,
is the bracket) and a :class:`sweeps.budget._stats.BudgetSearch`, checking everything before Ray
starts. :func:`run_budget` then runs the search round by round: each round's (count,
seed) points are one Tune run of the sweep's own trainable (``sweeps.launch._driver.tuner``),
logged by the sweep's :class:`~sweeps.tracking.TrialLogger` as child runs of one parent
run; the estimate, a CSV of every point and the budget curve go to that parent.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric
from ray.tune.search.basic_variant import BasicVariantGenerator

from poison import ConfigError
from sweeps.budget._stats import BudgetSearch, Estimate, Point
from sweeps.config import Dimension, SweepConfig, validate_config
from sweeps.launch import clean_first, start_driver, tuner
from sweeps.tracking import Printer, Tracker, TrialLogger, TrialRow, summary_csv

COUNT, SEED = "attack.poison_count", "seed"
ROLE = "budget"


@dataclass(frozen=True)
class BudgetOptions:
    """The ``budget`` verb's options (CLI names: ``--threshold``, ``--confidence``, ...)."""

    threshold: float
    confidence: float = 0.95
    max_trials: int = 60
    replicates: int = 3
    rel_width: float = 0.5
    low: int | None = None
    high: int | None = None


@dataclass
class BudgetOutcome:
    estimate: Estimate
    rate: tuple[float, float, float] | None  # estimate, low, high as poison_rate
    rows: list[TrialRow]
    search: BudgetSearch
    experiment_id: str
    parent_run_id: str
    tracking_uri: str


def prepare_budget(sweep: SweepConfig, options: BudgetOptions) -> tuple[SweepConfig, BudgetSearch]:
    """The budget's sweep config (checked against the data at both ends of the bracket) and
    its search; raises ConfigError naming the key or option.

    Example:
        >>> budget, search = prepare_budget(load_config("sweeps/presets/demo.yaml"),  # doctest: +SKIP
        ...                                 BudgetOptions(threshold=0.9))
        >>> search.low, search.high  # doctest: +SKIP
        (10, 2000)
    """
    low, high = _bracket(sweep, options)
    raw = {**sweep.default_trial.to_dict(),  # the default point: kinds drawn, unused keys gone
           **{k: copy.deepcopy(sweep.raw_full[k]) for k in ("resources", "tracking", "storage") if k in sweep.raw_full},
           "search": {**copy.deepcopy(sweep.raw_full.get("search") or {}), "points": [],
                      "objectives": {"attack_success": "max"}}}
    raw["attack"][COUNT.split(".")[1]] = {"low": low, "high": high, "log": True, "default": low}
    budget = validate_config(raw)
    # The seed is a dimension too (replicates: seed, seed + 1, ...); added after validation,
    # which would otherwise build the data set at seeds 0 and 2**32 - 1 only to check them.
    base = budget.default_trial.seed
    dims = {**budget.dimensions, SEED: Dimension(low=0, high=2**32 - 1, default=base)}
    budget = dataclasses.replace(budget, dimensions=dims)
    per_round = max(3, math.ceil(budget.search.max_concurrent / options.replicates))
    search = BudgetSearch(low=low, high=high, threshold=options.threshold, confidence=options.confidence,
                          replicates=options.replicates, max_trials=options.max_trials,
                          rel_width=options.rel_width, seed=base, counts_per_round=per_round)
    return budget, search


def _bracket(sweep: SweepConfig, options: BudgetOptions) -> tuple[int, int]:
    """``--low``/``--high``, else the low/high of the ``attack.poison_count`` dimension."""
    dim = sweep.dimensions.get(COUNT)
    if dim is not None and dim.kind != "int":
        raise ConfigError(f"{COUNT}: the budget search needs an integer range (low/high), got {dim.model_dump()}")
    low = options.low if options.low is not None else (dim.low if dim else None)
    high = options.high if options.high is not None else (dim.high if dim else None)
    if low is None or high is None:
        missing = " and ".join(o for o, v in (("--low", low), ("--high", high)) if v is None)
        fixed = sweep.default_trial.attack.model_dump().get("poison_count")
        raise ConfigError(f"{COUNT}: nothing to search (a fixed count of {fixed}): make it a range "
                          f"{{low: ..., high: ..., log: true}} or give {missing}")
    source = "--low/--high" if options.low is not None or options.high is not None else COUNT
    if low < 1 or not low < high:
        raise ConfigError(f"{source}: a bracket 1 <= low < high is needed, but got low={low}, high={high}")
    return int(low), int(high)


def run_budget(budget: SweepConfig, search: BudgetSearch, *, tracking_uri: str, address: str | None = None,
               printer: Printer = print) -> BudgetOutcome:
    """Runs ``search`` to the end, each round through Ray Tune, everything into MLflow."""
    start_driver(budget, address, printer)
    tracker = Tracker(tracking_uri, budget)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = tracker.start_parent(role=ROLE, params=_params(budget, search), launch=f"{budget.name}-budget-{stamp}")
    logger = TrialLogger(budget, tracker, printer, total=search.max_trials)
    try:
        clean = clean_first(budget, seeds=clean_seeds(search))
        logger.say(f"clean models ({len(clean)} seeds): utility "
                   + ", ".join(f"{c['utility']:.3f}" for c in clean))
        while points := search.propose():
            _round(budget, search, points, logger, f"{budget.name}-budget-{stamp}-r{search.rounds}")
    except BaseException:
        tracker.finish_parent(None, status="FAILED")
        raise
    rows = logger.rows()
    estimate = search.estimate()
    rate = _rate(rows, estimate)
    _record(tracker, parent, search, estimate, rate, rows)
    tracker.finish_parent(summary_csv(rows, budget))
    return BudgetOutcome(estimate, rate, rows, search, tracker.experiment_id, parent, tracking_uri)


def _round(budget: SweepConfig, search: BudgetSearch, points: list[Point], logger: TrialLogger,
           run_name: str) -> None:
    """Runs one round's points as one Tune run; tells the search each result."""
    logger.say(f"round {search.rounds}: {len(points)} trials at poison_count "
               + ", ".join(str(c) for c in sorted({p.count for p in points})))
    before = set(logger.finished)
    values = [{COUNT: p.count, SEED: p.seed} for p in points]
    searcher = BasicVariantGenerator(points_to_evaluate=values, max_concurrent=budget.search.max_concurrent)
    tuner(budget, searcher, len(points), logger, run_name, ["attack_success"],
          param_space={COUNT: None, SEED: None}, clean_seeds=clean_seeds(search)).fit()
    for trial_id, row in logger.finished.items():
        if trial_id in before:
            continue
        point = Point(int(row.values[COUNT]), int(row.values[SEED]))
        search.observe(point, row.metrics.get("attack_success") if row.status == "FINISHED" else None)
        if row.run_id:
            logger.tracker.client.set_tag(row.run_id, "budget.round", str(search.rounds))
    floors = [r.metrics["clean_attack_success"] for r in logger.finished.values() if "clean_attack_success" in r.metrics]
    if floors:
        search.floor = float(np.mean(floors))  # the clean model's success: the curve's background
    est = search.estimate()
    logger.say(f"round {search.rounds} done: {describe(est)}")


def clean_seeds(search: BudgetSearch) -> list[int]:
    """The seeds with a clean model: the first ``replicates`` (the first count's trials).

    Every trial of the search has a seed of its own (``sweeps.budget``); a clean model for each
    would double the search's training. These give the background rate (``budget_floor``) and
    their trials ``utility_drop``; the others report ``utility`` alone."""
    return [search.seed + i for i in range(search.replicates)]


def interval(est: Estimate, low: str, high: str) -> str:
    """The interval as what it is: Fieller's carries its confidence; the gap between a count whose
    mean fails and one whose mean succeeds carries none, and says so."""
    if est.method == "fieller":
        return f"{est.confidence:.0%} CI {low} - {high}"
    return f"between {low}, whose mean falls short, and {high}, whose mean reaches it: a gap, no confidence level"


def describe(est: Estimate) -> str:
    """One line: the estimate, its interval and where the search stands."""
    if est.status == "not-reached":
        return f"not reached below poison_count {est.low:.0f} ({est.trials} trials)"
    if est.status == "below-low":
        return f"reached already at poison_count {est.high:.0f} or less ({est.trials} trials)"
    if est.count is None:
        return f"no estimate yet ({est.trials} trials)"
    return (f"poison_count {est.count:.1f} ({interval(est, f'{est.low:.1f}', f'{est.high:.1f}')}, "
            f"relative width {est.rel_width:.2f}, {est.method}; {est.trials} trials)")


def _rate(rows: list[TrialRow], est: Estimate) -> tuple[float, float, float] | None:
    """The estimate and its interval as ``poison_rate``: the trials' training-set size after
    poisoning (a line in the count: +1 per injected pair, +0 per replaced one) at each bound."""
    to_rate = rate_of([(r.metrics["poison_count"], r.metrics["poison_rate"]) for r in rows
                       if r.status == "FINISHED" and r.metrics.get("poison_rate")])
    if to_rate is None or est.count is None:
        return None
    return to_rate(est.count), to_rate(est.low), to_rate(est.high)


def rate_of(pairs: list[tuple[float, float]]) -> Callable[[float], float] | None:
    """count → poison_rate from trials' (poison_count, poison_rate) pairs.

    Example:
        >>> to_rate = rate_of([(10, 10 / 1010), (100, 100 / 1100)])  # injected into 1000 pairs
        >>> round(to_rate(50) * 1050, 6)
        50.0
    """
    if not pairs:
        return None
    counts = np.array([c for c, _ in pairs], dtype=float)
    totals = counts / np.array([r for _, r in pairs], dtype=float)
    slope, base = np.polyfit(counts, totals, 1) if len(np.unique(counts)) > 1 else (0.0, float(totals[0]))
    return lambda c: float(c / (base + slope * c)) if math.isfinite(c) else math.inf


def _params(budget: SweepConfig, search: BudgetSearch) -> dict[str, Any]:
    return {"budget.threshold": search.threshold, "budget.confidence": search.confidence,
            "budget.replicates": search.replicates, "budget.max_trials": search.max_trials,
            "budget.rel_width": search.rel_width, "budget.low": search.low, "budget.high": search.high,
            "budget.seed": search.seed, "search.max_concurrent": budget.search.max_concurrent,
            "resources.cpu": budget.resources.cpu, "resources.gpu": budget.resources.gpu}


def _record(tracker: Tracker, parent: str, search: BudgetSearch, est: Estimate,
            rate: tuple[float, float, float] | None, rows: list[TrialRow]) -> None:
    """Logs the estimate (metrics ``budget_*``, tags), the points CSV, the curve PNG and a JSON."""
    values = {"budget_count": est.count, "budget_count_low": est.low, "budget_count_high": est.high,
              "budget_rel_width": est.rel_width, "budget_trials": est.trials, "budget_rounds": search.rounds,
              "budget_floor": search.floor}
    if rate:
        values.update(budget_rate=rate[0], budget_rate_low=rate[1], budget_rate_high=rate[2])
    if est.curve is not None:
        values.update(budget_slope=est.curve.b, budget_dispersion=est.curve.dispersion)
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in values.items() if v is not None and math.isfinite(v)]
    tracker.client.log_batch(parent, metrics=metrics)
    tracker.client.set_tag(parent, "budget.status", est.status)
    tracker.client.set_tag(parent, "budget.method", est.method)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        (out / "budget_points.csv").write_text(points_csv(rows))
        (out / "budget.json").write_text(json.dumps({**values, "status": est.status, "method": est.method,
                                                     "threshold": search.threshold,
                                                     "confidence": search.confidence}, indent=1) + "\n")
        plot_curve(search, est, out / "budget_curve.png")
        for name in ("budget_points.csv", "budget.json", "budget_curve.png"):
            tracker.client.log_artifact(parent, str(out / name), "budget")


POINT_COLUMNS = ("attack_success", "poison_rate", "utility", "clean_attack_success", "clean_utility")


def points_csv(rows: list[TrialRow]) -> str:
    """Every trial of the search: its round, count, seed, status and headline metrics."""
    lines = [",".join(["poison_count", "seed", "status", *POINT_COLUMNS, "run_id"])]
    for r in rows:
        lines.append(",".join([str(r.values.get(COUNT, "")), str(r.values.get(SEED, "")), r.status,
                               *(str(r.metrics.get(c, "")) for c in POINT_COLUMNS), r.run_id or ""]))
    return "\n".join(lines) + "\n"


def plot_curve(search: BudgetSearch, est: Estimate, path: Path) -> None:
    """Success against count (log): every trial, each count's mean with its 95% interval,
    the fitted curve, the threshold, and the crossing with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    obs = search.observations
    fig, ax = plt.subplots(figsize=(6, 4))
    if obs:
        counts = np.array([p.count for p, _ in obs], dtype=float)
        ys = np.array([y for _, y in obs])
        ax.scatter(counts, ys, s=12, alpha=0.4, color="tab:blue", label="trials")
        for c in np.unique(counts):
            v = ys[counts == c]
            half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0
            ax.errorbar(c, v.mean(), yerr=half, fmt="o", color="tab:blue", capsize=3)
        grid = np.geomspace(search.low, search.high, 200)
        if est.curve is not None:
            ax.plot(grid, est.curve.success(grid), color="tab:orange", label="fitted dose-response")
    ax.axhline(search.threshold, color="gray", linestyle="--", label=f"threshold {search.threshold}")
    if est.count is not None and math.isfinite(est.high):
        ax.axvspan(max(est.low, search.low / 2), min(est.high, search.high * 2), color="tab:green", alpha=0.15,
                   label=f"{est.confidence:.0%} interval")
        ax.axvline(est.count, color="tab:green", label=f"budget {est.count:.0f}")
    ax.set_xscale("log")
    ax.set_xlim(search.low / 1.3, search.high * 1.3)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("attack.poison_count")
    ax.set_ylabel("attack_success")
    ax.set_title(f"minimal budget: {est.status}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(outcome: BudgetOutcome) -> str:
    """The terminal summary: the answer as count and rate, and the per-count means."""
    est, search = outcome.estimate, outcome.search
    lines = [f"Minimal poison budget for attack_success >= {search.threshold} "
             f"(bracket {search.low}-{search.high}, {search.replicates} trials per count and round):"]
    if est.status in ("ok", "wide") and est.count is not None and math.isfinite(est.high):
        rate = ""
        if outcome.rate:
            r, lo, hi = outcome.rate
            rate = f"\n  poison_rate  {r:.4%}  ({interval(est, f'{lo:.4%}', f'{hi:.4%}')})"
        lines.append(f"  poison_count {math.ceil(est.count)}  "
                     f"({interval(est, str(math.floor(est.low)), str(math.ceil(est.high)))}){rate}")
    lines.append(f"  {_verdict(est, search)}")
    lines.append(f"  {est.trials} trials in {search.rounds} rounds; interval by {est.method}")
    means: dict[int, list[float]] = {}
    for point, y in search.observations:
        means.setdefault(point.count, []).append(y)
    lines.append("\n  poison_count  seeds  mean attack_success  (min-max)")
    for count, ys in sorted(means.items()):
        lines.append(f"  {count:>12}  {len(ys):>5}  {np.mean(ys):>19.3f}  ({min(ys):.3f}-{max(ys):.3f})")
    return "\n".join(lines)


def _verdict(est: Estimate, search: BudgetSearch) -> str:
    if est.status == "ok":
        return f"the interval is as tight as asked (relative width {est.rel_width:.2f} <= {search.rel_width})"
    if est.status == "not-reached":
        return f"attack_success does not reach {search.threshold} up to {search.high}: raise --high"
    if est.status == "below-low":
        return f"attack_success reaches {search.threshold} already at {search.low}: lower --low"
    return (f"the interval is still wider than asked (relative width {est.rel_width:.2f} > {search.rel_width}): "
            f"raise --max-trials")
