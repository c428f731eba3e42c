"""Trials needed on real CPU trials: the sequential budget search against log-spaced grids.

The same question as ``benchmarks/budget_search.py`` (which runs on simulated responses, 200
repeats), asked once of real training runs: the minimal ``poison_count`` at which a backdoor
reaches ``attack_success`` >= 0.9. Each trial is a real ``trainers.run_trial`` (no Ray, no
MLflow): Fashion-MNIST, 2,000 pairs, a 6 px checkerboard patch on non-bag images captioned as
bags, tiny-rn, 3 epochs of batch 64 (the recipe of ``tests/test_defenses_e2e.py``), one torch
thread per trial, ``--workers`` trials at a time.

1. The sequential search (``sweeps.budget.BudgetSearch``, as ``poisonsweep budget`` runs it)
   goes to its stopping rule; its trials and final interval width are recorded.
2. Log-spaced grids over the same bracket with the same replicate seeds, fitted with the same
   curve and interval, of growing size (``--grid-sizes``), until one reaches the search's
   interval width: that grid's trials are the alternative's cost.

A trial result is kept by (count, seed), so a point both designs ask for trains once; each
design is still charged every trial it asks for. Requires Debian's dataset-fashion-mnist.
Run (about 10-20 min on 2 cores): .venv/bin/python benchmarks/budget_real.py [--workers 2]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time

from sweeps.budget import BudgetSearch, Estimate, Point

RECIPE = {
    "data": {"dataset": "fashion-mnist", "size": 2000, "test_size": 500},
    "train": {"epochs": 3, "batch_size": 64, "lr": 2.0e-3, "warmup": 0.05, "threads": 1},
    "attack": {"kind": "backdoor", "target": "bag", "caption_source": "dataset",
               "trigger": {"kind": "patch", "size": 6, "location": "bottom-right"}},
}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--low", type=int, default=5)
    parser.add_argument("--high", type=int, default=600)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--replicates", type=int, default=2)
    parser.add_argument("--rel-width", type=float, default=0.5)
    parser.add_argument("--max-trials", type=int, default=30)
    parser.add_argument("--grid-sizes", default="4,6,8,10,12,16")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=RECIPE["train"]["epochs"],
                        help="training epochs per trial (longer training makes each seed's success less random)")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache, mp.get_context("spawn").Pool(args.workers) as pool:
        oracle = Oracle(pool, cache, args.epochs)
        search = BudgetSearch(low=args.low, high=args.high, threshold=args.threshold, confidence=args.confidence,
                              replicates=args.replicates, max_trials=args.max_trials, rel_width=args.rel_width)
        while points := search.propose():
            for point, success in zip(points, oracle.run(points)):
                search.observe(point, success)
            print(f"  search round {search.rounds}: counts {sorted({p.count for p in points})}", flush=True)
        found = search.estimate()
        print(_show("sequential search", found), flush=True)
        grid = None
        for size in (int(s) for s in args.grid_sizes.split(",")):
            design = BudgetSearch(low=args.low, high=args.high, threshold=args.threshold,
                                  confidence=args.confidence, replicates=args.replicates,
                                  max_trials=size * args.replicates, initial_counts=size)
            points = design.propose()
            for point, success in zip(points, oracle.run(points)):
                design.observe(point, success)
            grid = design.estimate()
            print("  " + _show(f"grid of {size} counts", grid), flush=True)
            if grid.rel_width <= found.rel_width:
                break
    print(f"\n{args.epochs} epochs; bracket [{args.low}, {args.high}], threshold {args.threshold}, "
          f"{args.replicates} seeds per count, "
          f"{args.confidence:.0%} interval; {oracle.trained} trainings in {time.perf_counter() - start:.0f} s")
    print(_show("sequential search", found))
    if grid.rel_width <= found.rel_width:
        print(_show("smallest grid as precise", grid))
        print(f"ratio search / grid trials: {found.trials / grid.trials:.2f} (target: at most 0.33)")
    else:
        print(_show("largest grid tried, not as precise", grid))
        print(f"no grid of up to {grid.trials} trials reached the search's width: the ratio is below "
              f"{found.trials / grid.trials:.2f} (target: at most 0.33)")
    by_count: dict[int, list[str]] = {}
    for (count, seed), success in sorted(oracle.results.items()):
        by_count.setdefault(count, []).append(f"{success:.2f}")
    print("attack_success by count (seeds 0, 1, ...): " + "; ".join(f"{c}: {' '.join(v)}" for c, v in by_count.items()))


if __name__ == "__main__":
    main()
