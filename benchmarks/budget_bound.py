"""What no budget design can beat: the trials a design that *knows* the curve needs, against a grid.

For a logistic dose-response in log count (``sweeps.budget``'s model, no background rate) the
large-sample variance of the fitted crossing is φ·V/n for n trials, where V depends only on the
design: where the trials go (``sweeps.budget._stats.crossing_variance``). The least V of any design is
every trial at the crossing itself (``best_variance``: 1/(b²·τ(1-τ))), which needs the true curve.
So V_best / V_grid is the smallest fraction of a log-spaced grid's trials that any design,
sequential or not, can need for the same precision, in large samples: a floor under the ratio
``benchmarks/budget_search.py`` and ``budget_real.py`` measure for the sequential search.

It prints that floor per curve, threshold, bracket and grid size, and checks the large-sample
variance against the spread of real fits: ``--check R`` fits R simulated grids per row
(``sweeps.budget._stats.grid_estimate``, Beta seed spread of concentration ``--concentration``) and
prints the measured variance of the log crossing over the predicted φ·V/n (1 where the formula
holds). Defaults: the real CPU trials' curve (``README.md``: slope 1.6 per unit of log count,
success 0.5 at 14 pairs) on their bracket 5-600 and on a three-decade one. Pure CPU, seconds:

    .venv/bin/python benchmarks/budget_bound.py [--medians 14] [--slopes 1.6] [--check 300]
"""
from __future__ import annotations

import argparse
import math

import numpy as np
from scipy import special

from sweeps.budget._stats import SimulatedResponse, best_variance, crossing_variance, grid_estimate, log_counts

# on 5-600, 65, 70 and 170 round to 60, 64 and 131 distinct counts: the grids of budget_real.py's
# 180 trials and of the calibrated simulation's 192 and 393 (README)
GRID_COUNTS = (9, 17, 33, 65, 70, 170)


def _measured_over_predicted(response: SimulatedResponse, low: int, high: int, n: int, replicates: int,
                             repeats: int) -> float:
    """Var(log ĉ) over ``repeats`` simulated grids, divided by the large-sample φ·V/trials."""
    counts = log_counts(low, high, n)
    logs = []
    for r in range(repeats):
        est = grid_estimate(response, np.random.default_rng([3, n, r]), low=low, high=high, counts=n,
                            replicates=replicates, threshold=response.threshold)
        if est.count:
            logs.append(math.log(est.count))
    predicted = response.dispersion * crossing_variance(counts, crossing=response.crossing, slope=response.slope,
                                               threshold=response.threshold) / (len(counts) * replicates)
    return float(np.var(logs)) / predicted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--medians", default="14", help="counts where success is 0.5, comma-separated")
    parser.add_argument("--slopes", default="1.6", help="slopes per unit of log count, comma-separated")
    parser.add_argument("--thresholds", default="0.5,0.9")
    parser.add_argument("--brackets", default="5-600,5-5000", help="low-high, comma-separated")
    parser.add_argument("--grid-counts", default=",".join(map(str, GRID_COUNTS)))
    parser.add_argument("--replicates", type=int, default=3, help="trials per grid count (for --check)")
    parser.add_argument("--check", type=int, default=0, metavar="R", help="simulated grids per row (0: none)")
    parser.add_argument("--concentration", type=float, default=1.0, help="Beta seed spread for --check")
    args = parser.parse_args()
    floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
    brackets = [tuple(int(v) for v in b.split("-")) for b in args.brackets.split(",")]
    grid_counts = [int(v) for v in args.grid_counts.split(",")]

    print("Smallest fraction of a log-spaced grid's trials any design can need for the same precision")
    print("(large-sample variance of the log crossing; the design that reaches it knows the curve)\n")
    header = "| success 0.5 at, slope | threshold (crossing) | bracket | grid counts | floor: best / grid |"
    if args.check:
        header += f" grid's measured / predicted variance ({args.check} fits) |"
    print(header)
    print("| --- " * (header.count("|") - 1) + "|")
    for median in floats(args.medians):
        for slope in floats(args.slopes):
            for threshold in floats(args.thresholds):
                crossing = median * math.exp(special.logit(threshold) / slope)
                best = best_variance(slope=slope, threshold=threshold)
                for low, high in brackets:
                    for n in grid_counts:
                        counts = log_counts(low, high, n)
                        ratio = best / crossing_variance(counts, crossing=crossing, slope=slope, threshold=threshold)
                        row = (f"| {median:g}, {slope:g} | {threshold:g} ({crossing:.0f}) | {low}-{high} | "
                               f"{len(counts)} | **{ratio:.2f}** |")
                        if args.check:
                            response = SimulatedResponse(crossing=crossing, slope=slope, threshold=threshold,
                                                         concentration=args.concentration)
                            row += f" {_measured_over_predicted(response, low, high, n, args.replicates, args.check):.2f} |"
                        print(row, flush=True)


if __name__ == "__main__":
    main()
