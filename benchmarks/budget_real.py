"""Trials needed on real CPU trials: the sequential budget search against log-spaced grids.

The same question as ``benchmarks/budget_search.py`` (which runs on simulated responses, 200
repeats), asked of real training runs: the minimal ``poison_count`` at which a backdoor
reaches ``attack_success`` >= each of ``--thresholds``. Each trial is a real
``trainers.run_trial`` (no Ray, no MLflow): Fashion-MNIST, 2,000 pairs, a 6 px checkerboard
patch on non-bag images captioned as bags, tiny-rn, ``--epochs`` epochs of batch 64, one torch
thread per trial, ``--workers`` trials at a time.

1. For each threshold, the sequential search (``sweeps.budget._stats.BudgetSearch``, as
   ``poisonsweep budget`` runs it: every trial its own seed) goes to its stopping rule; its
   trials and final interval width are recorded.
2. Log-spaced grids over the same bracket with the same replicates per count, fitted with the
   same curve and interval, of growing size (``--grid-sizes``, nested: each size's counts are
   among the next one's when size - 1 divides the next size - 1), until one is as precise as
   the search at every threshold (a confidence interval no wider than the search's: the gap
   between a failing and a succeeding count, all a grid without a fitted curve has, is none).
   A grid trial's seed is fixed by its count and replicate, so
   the nested grids share their common points (one training, charged to every grid asking
   for it) and every threshold reads the same grids; no seed is shared by two counts.

Requires Debian's dataset-fashion-mnist. About 75-90 min on 2 cores at the defaults (348 trainings):
    .venv/bin/python benchmarks/budget_real.py [--workers 2] [--thresholds 0.5,0.9]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time

from sweeps.budget._stats import BudgetSearch, Estimate, Point

RECIPE = {
    "data": {"dataset": "fashion-mnist", "size": 2000, "test_size": 500},
    "train": {"epochs": 6, "batch_size": 64, "lr": 2.0e-3, "warmup": 0.05, "threads": 1},
    "attack": {"kind": "backdoor", "target": "bag", "caption_source": "dataset",
               "trigger": {"kind": "patch", "size": 6, "location": "bottom-right"}},
}
GRID_SEED = 1_000_000  # grid seeds: GRID_SEED + 100·count + replicate, apart from the searches' 0, 1, ...


def _trial(job: tuple[int, int, str, int]) -> float:
    count, seed, cache, epochs = job
    from trainers import parse_trial_config, run_trial

    raw = {**RECIPE, "seed": seed, "attack": {**RECIPE["attack"], "poison_count": count},
           "train": {**RECIPE["train"], "epochs": epochs}}
    return run_trial(parse_trial_config(raw), cache_dir=cache, baseline=False).metrics["attack_success"]


class Oracle:
    """Runs trials ``workers`` at a time, each (count, seed) once."""

    def __init__(self, pool, cache: str, epochs: int) -> None:
        self.pool, self.cache, self.epochs, self.trained = pool, cache, epochs, 0
        self.results: dict[tuple[int, int], float] = {}

    def run(self, points: list[Point]) -> list[float]:
        todo = sorted({(p.count, p.seed) for p in points} - self.results.keys())
        for key, value in zip(todo, self.pool.map(_trial, [(c, s, self.cache, self.epochs) for c, s in todo])):
            self.results[key] = value
        self.trained += len(todo)
        return [self.results[(p.count, p.seed)] for p in points]


def _show(name: str, est: Estimate) -> str:
    return (f"{name}: {est.trials} trials, minimal count {est.count:.0f} [{est.low:.0f}, {est.high:.0f}] "
            f"(relative width {est.rel_width:.2f}, {est.status})" if est.count else f"{name}: {est.trials} trials, {est.status}")


def _as_precise(grid: Estimate, search: Estimate) -> bool:
    """The grid's confidence interval is no wider than the search's (a gap between a failing and
    a succeeding count is no confidence interval: ``Estimate.ci_width``)."""
    return grid.ci_width <= search.ci_width < float("inf")


def _options(args: argparse.Namespace, threshold: float) -> dict:
    return {"low": args.low, "high": args.high, "threshold": threshold, "confidence": args.confidence,
            "replicates": args.replicates}


def _grid(oracle: Oracle, args: argparse.Namespace, size: int, thresholds: list[float]) -> dict[float, Estimate]:
    """One grid of ``size`` counts, its points trained once and fitted at every threshold."""
    designs = {t: BudgetSearch(**_options(args, t), max_trials=size * args.replicates, initial_counts=size)
               for t in thresholds}
    proposed = [d.propose() for d in designs.values()][0]
    points, seen = [], {}
    for p in proposed:  # the count's replicate j gets the grid seed of (count, j)
        j = seen[p.count] = seen.get(p.count, -1) + 1
        points.append(Point(p.count, GRID_SEED + 100 * p.count + j))
    results = oracle.run(points)
    for design in designs.values():
        for point, success in zip(points, results):
            design.observe(point, success)
    return {t: d.estimate() for t, d in designs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--low", type=int, default=5)
    parser.add_argument("--high", type=int, default=600)
    parser.add_argument("--thresholds", default="0.5,0.9")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--replicates", type=int, default=3)
    parser.add_argument("--rel-width", type=float, default=0.5)
    parser.add_argument("--max-trials", type=int, default=90)
    parser.add_argument("--grid-sizes", default="5,9,17,33,65")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=RECIPE["train"]["epochs"])
    args = parser.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    start = time.perf_counter()
    found: dict[float, Estimate] = {}
    grids: dict[float, Estimate] = {}
    with tempfile.TemporaryDirectory() as cache, mp.get_context("spawn").Pool(args.workers) as pool:
        oracle = Oracle(pool, cache, args.epochs)
        for t in thresholds:
            search = BudgetSearch(**_options(args, t), max_trials=args.max_trials, rel_width=args.rel_width)
            while points := search.propose():
                for point, success in zip(points, oracle.run(points)):
                    search.observe(point, success)
                print(f"  threshold {t}: search round {search.rounds}: counts {sorted({p.count for p in points})} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            found[t] = search.estimate()
            print(_show(f"threshold {t}: sequential search", found[t]), flush=True)
        for size in (int(s) for s in args.grid_sizes.split(",")):
            for t, est in _grid(oracle, args, size, thresholds).items():
                if t not in grids or not _as_precise(grids[t], found[t]):
                    grids[t] = est
                print("  " + _show(f"threshold {t}: grid of {size} counts", est), flush=True)
            if all(_as_precise(grids[t], found[t]) for t in thresholds):
                break
        results = dict(oracle.results)
    print(f"\n{args.epochs} epochs; bracket [{args.low}, {args.high}], {args.replicates} trials per count, "
          f"{args.confidence:.0%} interval; {oracle.trained} trainings in {time.perf_counter() - start:.0f} s")
    for t in thresholds:
        print(f"threshold {t}:")
        print("  " + _show("sequential search", found[t]))
        if _as_precise(grids[t], found[t]):
            print("  " + _show("smallest grid as precise", grids[t]))
            print(f"  ratio search / grid trials: {found[t].trials / grids[t].trials:.2f} (target: at most 0.33)")
        else:
            print("  " + _show("largest grid tried, not as precise", grids[t]))
            print(f"  no grid of up to {grids[t].trials} trials reached the search's width: the ratio is below "
                  f"{found[t].trials / grids[t].trials:.2f} (target: at most 0.33)")
    by_count: dict[int, list[str]] = {}
    for (count, _seed), success in sorted(results.items()):
        by_count.setdefault(count, []).append(f"{success:.2f}")
    print("attack_success by count (one seed each): " + "; ".join(f"{c}: {' '.join(v)}" for c, v in by_count.items()))


if __name__ == "__main__":
    main()
