"""Trials needed: the sequential budget search against a log-spaced grid, side by side.

On simulated noisy dose-responses (``sweeps.budget._stats.SimulatedResponse``: logistic in log
count, Beta seed-to-seed spread, Binomial test-set noise) with known crossings, it runs
the sequential search (``BudgetSearch``) to its stopping rule, then finds the smallest
log-spaced grid over the same bracket, with the same replicates per count, fitted with
the same curve and interval, that reaches the same precision:

- "same median width": the grid's median relative interval width is at most the
  sequential search's median final width (a width counts only where it is a confidence
  interval: the gap between a failing and a succeeding count, which a search or grid
  without a fitted curve reports, counts as unbounded);
- "90% reach target": at least 90% of the grids reach ``--rel-width``.

It prints, per scenario, the mean trials of each, their ratio, the interval's coverage
of the true crossing and the RMSE of the log estimate. Defaults: a three-decade bracket
[5, 5000] (the order of magnitude unknown: why one searches), crossings 20, 150 and 1000,
slopes 3 and 6 per unit of log count (the calibration runs in shared/DESIGN.md went from
ASR 0.02 to 0.89 over a factor 3 in count: a slope near 5.5), 3 seeds per count, 95%
intervals, stop at relative width 0.3. Pure CPU, no Ray, no MLflow (about 2 minutes):

    .venv/bin/python benchmarks/budget_search.py [--repeats 200] [--replicates 3] [--rel-width 0.3]
"""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np

from sweeps.budget._stats import BudgetSearch, SimulatedResponse, grid_estimate, run_simulated

GRID_SIZES = (4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 18, 20, 23, 26, 30, 35, 40, 45, 50, 60, 70, 80, 100, 120)


def _sequential(response: SimulatedResponse, args: argparse.Namespace, truth: float) -> dict[str, float]:
    trials, widths, covered, errors = [], [], 0, []
    for r in range(args.repeats):
        search = BudgetSearch(low=args.low, high=args.high, threshold=args.threshold, replicates=args.replicates,
                              max_trials=args.max_trials, rel_width=args.rel_width, confidence=args.confidence,
                              counts_per_round=args.counts_per_round, initial_counts=args.initial_counts)
        est = run_simulated(search, response, np.random.default_rng([1, r]))
        trials.append(est.trials)
        widths.append(est.ci_width)
        covered += est.low <= truth <= est.high
        errors.append(math.log(est.count / truth) if est.count else math.inf)
    return {"trials": float(np.mean(trials)), "width": float(np.median(widths)),
            "reached": float(np.mean(np.array(widths) <= args.rel_width)), "coverage": covered / args.repeats,
            "rmse": float(np.sqrt(np.mean(np.square(errors))))}


def _grid(response: SimulatedResponse, args: argparse.Namespace, truth: float, size: int) -> dict[str, float]:
    widths, covered, errors = [], 0, []
    for r in range(args.repeats):
        est = grid_estimate(response, np.random.default_rng([2, size, r]), low=args.low, high=args.high,
                            counts=size, replicates=args.replicates, threshold=args.threshold,
                            confidence=args.confidence)
        widths.append(est.ci_width)
        covered += est.low <= truth <= est.high
        errors.append(math.log(est.count / truth) if est.count else math.inf)
    return {"trials": est.trials, "width": float(np.median(widths)),
            "reached": float(np.mean(np.array(widths) <= args.rel_width)), "coverage": covered / args.repeats,
            "rmse": float(np.sqrt(np.mean(np.square(errors))))}


def _smallest_grid(response: SimulatedResponse, args: argparse.Namespace, truth: float,
                   good: Callable[[dict[str, float]], bool]) -> dict[str, float] | None:
    """Bisects ``args.grid_sizes`` for the smallest grid that is ``good`` (precision grows with size)."""
    lo, hi, best = 0, len(args.grid_sizes) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        result = _grid(response, args, truth, args.grid_sizes[mid])
        if good(result):
            best, hi = result, mid - 1
        else:
            lo = mid + 1
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--replicates", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--rel-width", type=float, default=0.3)
    parser.add_argument("--max-trials", type=int, default=120)
    parser.add_argument("--low", type=int, default=5)
    parser.add_argument("--high", type=int, default=5000)
    parser.add_argument("--counts-per-round", type=int, default=3)
    parser.add_argument("--initial-counts", type=int, default=4)
    parser.add_argument("--crossings", default="20,150,1000", help="true crossings (counts), comma-separated")
    parser.add_argument("--slopes", default="3,6", help="logistic slopes per unit of log count")
    parser.add_argument("--grid-sizes", type=lambda v: [int(x) for x in v.split(",")], default=list(GRID_SIZES),
                        help="grid sizes (counts) to bisect over, ascending")
    parser.add_argument("--concentration", type=float, default=30.0,
                        help="Beta concentration of the seed-to-seed spread (small: each seed's success near 0 or 1)")
    args = parser.parse_args()
    print(f"bracket [{args.low}, {args.high}], threshold {args.threshold}, {args.replicates} seeds per count, "
          f"{args.confidence:.0%} interval, stop at relative width {args.rel_width}, {args.repeats} repeats\n")
    head = (f"{'crossing':>8} {'slope':>5} | {'seq trials':>10} {'width':>5} {'cover':>5} {'rmse':>5} | "
            f"{'grid (same median width)':>24} {'ratio':>5} {'cover':>5} {'rmse':>5} | "
            f"{'grid (90% reach)':>16} {'ratio':>5}")
    print(head)
    print("-" * len(head))
    ratios, ratios90, start = [], [], time.perf_counter()
    for crossing in (float(c) for c in args.crossings.split(",")):
        for slope in (float(b) for b in args.slopes.split(",")):
            response = SimulatedResponse(crossing=crossing, slope=slope, threshold=args.threshold,
                                         concentration=args.concentration)
            truth = response.true_crossing(args.low, args.high)
            seq = _sequential(response, args, truth)
            same = _smallest_grid(response, args, truth, lambda g, seq=seq: g["width"] <= seq["width"])
            reach = _smallest_grid(response, args, truth, lambda g: g["reached"] >= 0.9)
            g1 = f"{same['trials']:>24}" if same else f"{'>' + str(args.grid_sizes[-1] * args.replicates):>24}"
            g2 = f"{reach['trials']:>16}" if reach else f"{'>' + str(args.grid_sizes[-1] * args.replicates):>16}"
            r1 = seq["trials"] / same["trials"] if same else float("nan")
            r2 = seq["trials"] / reach["trials"] if reach else float("nan")
            ratios.append(r1)
            ratios90.append(r2)
            print(f"{crossing:>8g} {slope:>5g} | {seq['trials']:>10.1f} {seq['width']:>5.2f} {seq['coverage']:>5.2f} "
                  f"{seq['rmse']:>5.3f} | {g1} {r1:>5.2f} {same['coverage'] if same else float('nan'):>5.2f} "
                  f"{same['rmse'] if same else float('nan'):>5.3f} | {g2} {r2:>5.2f}", flush=True)
    print(f"\nmean ratio sequential/grid trials: {np.nanmean(ratios):.2f} (same median width), "
          f"{np.nanmean(ratios90):.2f} (90% of grids reach width {args.rel_width}); "
          f"target: at most 0.33.  [{time.perf_counter() - start:.0f} s]")


if __name__ == "__main__":
    main()
