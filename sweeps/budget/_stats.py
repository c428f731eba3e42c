"""The minimal poison budget: a sequential dose-response search (pure; numpy and scipy only).

The question: the smallest ``attack.poison_count`` at which ``attack_success`` reaches a
threshold τ, with a confidence interval. :class:`BudgetSearch` is the whole algorithm and
runs no trial: it *proposes* (count, seed) points, is told their results (*observe*),
*estimates* the crossing with its interval and says when it is *done*. The runner in
``sweeps.budget._search`` evaluates its points through Ray Tune; tests and
``benchmarks/budget_search.py`` evaluate them on simulated dose-responses
(:class:`SimulatedResponse`).

Model. Success against the log count x = log c is a logistic dose-response above the
clean model's success (Abbott's correction for a background rate, ``floor``):

    success(c) = floor + (1 - floor) * expit(a + b * (log c - x̄)),

fitted by binomial *quasi*-likelihood (each trial's success is a fraction of test images,
so it is a proportion; between-seed variation makes it overdispersed by an unknown
factor φ, Var = φ·p(1-p), estimated from the residuals). The crossing is
x* = x̄ + (logit τ' - a) / b with τ' the threshold on the corrected scale.

Interval: Fieller's theorem (Finney's standard for effective doses in bioassay): the
set of x where ``a + b(x - x̄) = logit τ'`` is not rejected by a t-test with the
dispersion-scaled covariance, i.e. ``(a + b u - g)² <= t² Var(a + b u)``. Why this and
not the alternatives:

- a parametric bootstrap needs a full noise model (test-set size, seed variance) that
  quasi-likelihood does not, and hundreds of refits per round;
- a nonparametric (trial-resampling) bootstrap undercovers with the 10-40 points a
  search has, breaks on resamples that separate, and costs the same refits;
- the delta method is symmetric in x, while the interval of a ratio is not;
- profile likelihood agrees with Fieller to first order for this two-parameter model
  and needs a root search per bound.

Fieller's interval is closed-form (cheap enough to recompute after every round and in
the thousands of simulated searches of the tests), asymmetric where it should be, and
honest about ignorance: when the slope is not significantly positive it is unbounded,
and the search keeps exploring instead of claiming precision. Its coverage under the
sequential design and the width-based stopping rule is checked by simulation
(``tests/sweeps/test_budget.py``).

Design. The first round spreads ``initial_counts`` counts log-evenly over [low, high]. Until a
bounded interval exists, each round bisects (in log count) the gap between the largest
count whose mean success is below τ and the smallest one at or above it ("gap" mode;
without such a pair, it extends to the bracket's end). Once the interval is bounded,
each round puts ``counts_per_round`` counts evenly across the current interval,
which concentrates trials around the crossing as the interval shrinks. Every count
gets ``replicates`` trials per visit, and every trial its own seed (``seed``, ``seed + 1``, ...
in the order proposed). Seeds are not shared between counts because a poison plan is
nested in the budget (``poison.attacks``): one seed's success at two counts comes from the
same plan, data order and initialisation, and on real trials it is close to a step at a
count of its own. Counts sharing their seeds would then all measure those few seeds' steps,
not the mean success over seeds that the curve models, and the quasi-likelihood, which
takes the trials as independent, would claim a precision it does not have. The search stops when the
interval's relative width (high - low) / estimate is at most ``rel_width``, when the
crossing lies outside the bracket with confidence, or when ``max_trials`` are spent.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import optimize, special, stats

from poison import ConfigError

Status = Literal["ok", "wide", "not-reached", "below-low"]
MAX_STEEPNESS = 30.0  # |b|·sd(x) beyond this: the data separate, the slope is not identified
MIN_SPREAD = 0.02  # smallest half-width (in log count) of a round's design
TAIL = 0.02  # fitted success this close to 0 or 1: a saturated point, left out of the fit
TRIM_PASSES = 4
RISE = (-2.5, 0.5)  # logit span of a round's design around the threshold while the slope is unidentified
MIN_ROUNDS = 2  # rounds before the search may stop


@dataclass(frozen=True)
class Point:
    """One trial to run: the attack's ``poison_count`` and the trial's ``seed``."""

    count: int
    seed: int


@dataclass(frozen=True)
class Curve:
    """A fitted dose-response ``floor + (1 - floor)·expit(a + b·(log c - center))``.

    ``cov`` is the quasi-likelihood covariance of (a, b), already scaled by
    ``dispersion``; ``df`` the residual degrees of freedom of its t-quantiles.
    """

    a: float
    b: float
    center: float
    cov: np.ndarray = field(repr=False)
    dispersion: float
    df: float
    floor: float = 0.0

    def success(self, counts: np.ndarray | float) -> np.ndarray:
        """The fitted mean success at ``counts``."""
        eta = self.a + self.b * (np.log(counts) - self.center)
        return self.floor + (1 - self.floor) * special.expit(eta)

    def _target(self, level: float) -> float:
        return float(special.logit((level - self.floor) / (1 - self.floor)))

    def crossing(self, level: float) -> float:
        """The count where the fitted curve reaches ``level``."""
        return _exp(self.center + (self._target(level) - self.a) / self.b)

    def interval(self, level: float, confidence: float) -> tuple[float, float]:
        """Fieller's interval for the crossing of ``level``, in counts; (0, inf) when unbounded."""
        q2 = stats.t.ppf(0.5 + confidence / 2, self.df) ** 2
        (vaa, vab), (_, vbb) = self.cov
        d = self.a - self._target(level)
        qa = self.b**2 - q2 * vbb  # > 0 iff the slope is significantly non-zero
        qb = 2 * (d * self.b - q2 * vab)
        qc = d**2 - q2 * vaa
        if qa <= 0:
            return 0.0, math.inf
        root = math.sqrt(max(qb * qb - 4 * qa * qc, 0.0))
        lo, hi = (-qb - root) / (2 * qa), (-qb + root) / (2 * qa)
        return _exp(self.center + lo), _exp(self.center + hi)


def fit_curve(counts: Iterable[float], successes: Iterable[float], *, floor: float = 0.0) -> Curve | None:
    """Fits the logistic dose-response in log count by binomial quasi-likelihood.

    Points where the fitted curve is saturated (within ``TAIL`` of 0 or 1 on the
    floor-corrected scale) are dropped and the curve refitted, until the kept set is
    stable: under the model they carry almost no information on the crossing (their
    weight p(1-p) is tiny), but their residuals enter the slope's score unweighted, so a
    real attack's ceiling below 1 or a wiggle on its plateau far from the crossing would
    otherwise bend the slope and move the crossing.

    Returns None when the data cannot identify a curve: fewer than three distinct
    counts, no variation, or separation (the slope runs off to infinity).

    Example:
        >>> curve = fit_curve([10, 10, 30, 30, 100, 100], [0.05, 0.1, 0.5, 0.4, 0.9, 0.95])
        >>> round(curve.crossing(0.5))
        32
    """
    x = np.log(np.asarray(list(counts), dtype=float))
    y = np.clip((np.asarray(list(successes), dtype=float) - floor) / (1 - floor), 0.0, 1.0)
    keep = np.ones(len(x), dtype=bool)
    curve = None
    for _ in range(TRIM_PASSES):
        fitted = _fit(x[keep], y[keep], floor)
        if fitted is None:
            return curve
        curve = fitted
        p = special.expit(curve.a + curve.b * (x - curve.center))
        inside = (p > TAIL) & (p < 1 - TAIL)
        if np.array_equal(inside, keep):
            break
        keep = inside
    return curve


def _fit(x: np.ndarray, y: np.ndarray, floor: float) -> Curve | None:
    if len(np.unique(x)) < 3 or len(y) < 4 or np.ptp(y) == 0:
        return None
    center = float(x.mean())
    design = np.column_stack([np.ones_like(x), x - center])

    def loss(theta: np.ndarray) -> float:  # negative quasi-log-likelihood (binomial)
        eta = design @ theta
        return -float(np.sum(y * special.log_expit(eta) + (1 - y) * special.log_expit(-eta)))

    def grad(theta: np.ndarray) -> np.ndarray:
        return -design.T @ (y - special.expit(design @ theta))

    def hess(theta: np.ndarray) -> np.ndarray:
        p = special.expit(design @ theta)
        return (design * (p * (1 - p))[:, None]).T @ design

    start = np.array([special.logit(np.clip(y.mean(), 0.02, 0.98)), 0.0])
    found = optimize.minimize(loss, start, jac=grad, hess=hess, method="trust-exact")
    a, b = (float(v) for v in found.x)
    if not found.success or not np.isfinite([a, b]).all() or abs(b) * x.std() > MAX_STEEPNESS:
        return None
    p = special.expit(design @ found.x)
    w = p * (1 - p)
    # residual degrees of freedom from the effective number of points (Kish: (Σw)²/Σw²):
    # a point on a saturated part of the curve estimates no dispersion, and counting it
    # as a full point made the t-quantile too small (coverage 0.87 instead of 0.95)
    n_eff = float(w.sum() ** 2 / max(np.sum(w * w), 1e-300))
    if n_eff <= 2.5:
        return None
    df = n_eff - 2
    # Pearson dispersion as a ratio of sums: a point fitted at p≈0 or 1 (a measured floor
    # or ceiling the model does not have) cannot blow it up the way a mean of ratios would
    dispersion = float(np.sum((y - p) ** 2) / max(np.sum(w), 1e-12) * n_eff / df)
    try:
        cov = np.linalg.inv(hess(found.x)) * max(dispersion, 1e-12)
    except np.linalg.LinAlgError:
        return None
    return Curve(a, b, center, cov, dispersion, df, floor)


@dataclass(frozen=True)
class Estimate:
    """The minimal budget as the search knows it now.

    ``count`` is the estimated crossing (None when nothing can be said yet), ``low``/``high``
    its interval at ``confidence`` (``method`` "fieller" for the fitted curve's, "gap" for
    the gap between a failing and a succeeding count when no curve is identified; 0 and
    inf when unbounded). ``status``: ``ok`` (interval as tight as asked), ``wide`` (not
    yet), ``not-reached`` (the crossing lies above the bracket), ``below-low`` (the lowest
    count of the bracket already reaches the threshold).
    """

    count: float | None
    low: float
    high: float
    status: Status
    method: Literal["fieller", "gap", "none"]
    confidence: float
    trials: int
    curve: Curve | None = None

    @property
    def rel_width(self) -> float:
        """(high - low) / count: the interval's width relative to the estimate."""
        if self.count is None or not math.isfinite(self.high):
            return math.inf
        return (self.high - self.low) / self.count

    @property
    def ci_width(self) -> float:
        """``rel_width`` when the interval is a confidence interval (Fieller's, or a step found to
        the count), else inf: the gap between a failing and a succeeding count claims no confidence."""
        return self.rel_width if self.method == "fieller" or self.status == "ok" else math.inf


class BudgetSearch:
    """The sequential search for the minimal poison count reaching ``threshold``.

    Lifecycle: ``propose()`` the next batch of points; run them; ``observe()`` each
    result (``None`` for a failed trial: it counts as spent); repeat until ``done``;
    ``estimate()`` at any time. Deterministic: the same observations give the same
    proposals.

    Example:
        >>> search = BudgetSearch(low=10, high=1000, threshold=0.9, replicates=2)
        >>> sim = SimulatedResponse(crossing=200, slope=4.0, threshold=0.9)
        >>> rng = np.random.default_rng(0)
        >>> while not search.done:
        ...     for point in search.propose():
        ...         search.observe(point, sim.sample(point.count, rng))
        >>> est = search.estimate()  # (whether intervals hold the truth 95% of the time: tests/sweeps/test_budget.py)
        >>> est.status, est.method, est.low < est.count < est.high, est.trials <= 60
        ('ok', 'fieller', True, True)
    """

    def __init__(self, *, low: int, high: int, threshold: float, confidence: float = 0.95,
                 replicates: int = 3, max_trials: int = 60, rel_width: float = 0.5, seed: int = 0,
                 counts_per_round: int = 3, initial_counts: int = 4, floor: float = 0.0) -> None:
        _check(low=low, high=high, threshold=threshold, confidence=confidence, replicates=replicates,
               max_trials=max_trials, rel_width=rel_width, counts_per_round=counts_per_round,
               initial_counts=initial_counts)
        self.low, self.high, self.threshold, self.confidence = int(low), int(high), threshold, confidence
        self.replicates, self.max_trials, self.rel_width, self.seed = replicates, max_trials, rel_width, seed
        self.counts_per_round, self.initial_counts = counts_per_round, initial_counts
        self.floor = floor
        self.rounds = 0
        self._issued: dict[int, int] = {}  # count -> trials issued there
        self._results: list[tuple[Point, float]] = []
        self._spent = 0
        self._estimate: tuple[tuple[int, float, int], Estimate] | None = None

    @property
    def floor(self) -> float:
        """The clean model's success (Abbott's background rate); ignored at or above the threshold."""
        return self._floor

    @floor.setter
    def floor(self, value: float) -> None:
        self._floor = float(value) if 0 <= value < self.threshold else 0.0

    @property
    def trials(self) -> int:
        """Trials proposed so far (failed ones included)."""
        return self._spent

    @property
    def observations(self) -> list[tuple[Point, float]]:
        return list(self._results)

    def observe(self, point: Point, success: float | None) -> None:
        """Records one trial's ``attack_success`` (None or NaN: the trial failed)."""
        if success is not None and math.isfinite(success):
            self._results.append((point, float(success)))

    @property
    def done(self) -> bool:
        if self._spent >= self.max_trials:
            return True
        return self.rounds >= MIN_ROUNDS and self.estimate().status != "wide"

    def propose(self) -> list[Point]:
        """The next round's points (empty when done): ``replicates`` per count, each its own seed."""
        if self.done:
            return []
        counts = self._initial() if not self._issued else self._next_counts(self.estimate())
        points = []
        for count in counts:
            if len(points) + self.replicates > self.max_trials - self._spent and points:
                break  # the budget ends: whole counts first, then what is left of one
            take = min(self.replicates, self.max_trials - self._spent - len(points))
            first = self.seed + self._spent + len(points)  # every trial its own seed
            points += [Point(count, first + i) for i in range(take)]
            self._issued[count] = self._issued.get(count, 0) + take
        self._spent += len(points)
        self.rounds += 1
        return points

    def _initial(self) -> list[int]:
        return log_counts(self.low, self.high, self.initial_counts)

    def _next_counts(self, est: Estimate) -> list[int]:
        if est.method == "fieller" and math.isfinite(est.high) and est.low > 0:
            lo, hi = math.log(max(est.low, self.low)), math.log(min(est.high, self.high))
            mid = math.log(min(max(est.count, self.low), self.high))
            half = max((hi - lo) / 2, MIN_SPREAD)
            xs = mid + half * (np.linspace(-1, 1, self.counts_per_round) if self.counts_per_round > 1 else np.zeros(1))
        elif est.curve is not None and est.curve.b > 0:
            xs = self._across_rise(est.curve)
        else:
            lo, hi = self._gap()
            xs = np.linspace(math.log(lo), math.log(hi), self.counts_per_round + 2)[1:-1]
        counts = np.clip(np.rint(np.exp(xs)), self.low, self.high).astype(int)
        return sorted(set(int(c) for c in counts))

    def _across_rise(self, curve: Curve) -> np.ndarray:
        """Log counts where a fitted curve whose slope is not yet significant rises through
        the threshold: evenly in its logit from ``RISE[0]`` below the threshold's to ``RISE[1]``
        above it. Bisecting the gap instead piles every trial onto two neighbouring counts
        once the gap is narrow, where the per-count means flip around the threshold from
        round to round and the slope never becomes identified."""
        levels = curve._target(self.threshold) + np.linspace(*RISE, max(self.counts_per_round, 2))
        return curve.center + (levels - curve.a) / curve.b

    def _means(self) -> dict[int, float]:
        by: dict[int, list[float]] = {}
        for point, y in self._results:
            by.setdefault(point.count, []).append(y)
        return {c: float(np.mean(v)) for c, v in sorted(by.items())}

    def _gap(self) -> tuple[float, float]:
        """The counts between which the mean success first reaches the threshold (the
        bracket's end where no evaluated count fails, or none succeeds)."""
        means = self._means()
        above = [c for c, m in means.items() if m >= self.threshold]
        hi = min(above) if above else self.high
        below = [c for c, m in means.items() if m < self.threshold and c < hi]
        lo = max(below) if below else self.low
        if lo >= hi:  # both ends evaluated on one count: widen to its neighbours
            lo, hi = max(self.low, lo / 2), min(self.high, hi * 2)
        return lo, hi

    def estimate(self) -> Estimate:
        """The crossing with its interval from every observation so far."""
        key = (len(self._results), self._floor, self._spent)
        if self._estimate is None or self._estimate[0] != key:  # done, propose and the caller all ask
            self._estimate = (key, self._fit_estimate())
        return self._estimate[1]

    def _fit_estimate(self) -> Estimate:
        points = [p for p, _ in self._results]
        curve = fit_curve([p.count for p in points], [y for _, y in self._results], floor=self.floor) \
            if points else None
        if curve is not None and curve.b > 0:
            count = curve.crossing(self.threshold)
            low, high = curve.interval(self.threshold, self.confidence)
            if math.isfinite(high):
                return self._judge(count, low, high, "fieller", curve)
        return self._from_means(curve)

    def _judge(self, count: float, low: float, high: float, method: str, curve: Curve | None) -> Estimate:
        if low > self.high and self.high in self._issued:
            status: Status = "not-reached"
        elif high < self.low and self.low in self._issued:
            status = "below-low"
        else:
            status = "ok" if (high - low) / count <= self.rel_width else "wide"
        return Estimate(count, low, high, status, method, self.confidence, self._spent, curve)  # type: ignore[arg-type]

    def _from_means(self, curve: Curve | None) -> Estimate:
        """Without a bounded interval: what the per-count means say."""
        means = self._means()
        if not means:
            return Estimate(None, 0.0, math.inf, "wide", "none", self.confidence, self._spent, curve)
        if all(m < self.threshold for m in means.values()) and self.high in means:
            return Estimate(None, float(self.high), math.inf, "not-reached", "gap", self.confidence,
                            self._spent, curve)
        if all(m >= self.threshold for m in means.values()) and self.low in means:
            return Estimate(float(self.low), 0.0, float(self.low), "below-low", "gap", self.confidence,
                            self._spent, curve)
        lo, hi = self._gap()
        if curve is None and hi - lo <= 1 and lo in means and hi in means:
            # a step no curve can fit (every trial 0 or 1): the gap is the answer
            return Estimate(float(hi), float(lo), float(hi), "ok", "gap", self.confidence, self._spent, None)
        return Estimate(math.sqrt(lo * hi), float(lo), float(hi), "wide", "gap", self.confidence,
                        self._spent, curve)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def log_counts(low: int, high: int, n: int) -> list[int]:
    """``n`` integer counts spread log-evenly over [low, high] (fewer where they round alike)."""
    return sorted(set(int(c) for c in np.rint(np.geomspace(low, high, n))))


def _check(*, low: int, high: int, threshold: float, confidence: float, replicates: int, max_trials: int,
           rel_width: float, counts_per_round: int, initial_counts: int) -> None:
    """Rejects bad options with the CLI's names for them."""
    if not 0 < threshold < 1:
        raise ConfigError(f"--threshold: must lie strictly between 0 and 1, got {threshold}")
    if not 0 < confidence < 1:
        raise ConfigError(f"--confidence: must lie strictly between 0 and 1, got {confidence}")
    if not (isinstance(low, (int, np.integer)) and isinstance(high, (int, np.integer))) or low < 1:
        raise ConfigError(f"--low/--high: whole poison counts of at least 1 are needed, got low={low}, high={high}")
    if not low < high:
        raise ConfigError(f"--low/--high: low < high must hold, but got low={low}, high={high}")
    if replicates < 1:
        raise ConfigError(f"--replicates: at least 1 seed per count, got {replicates}")
    if counts_per_round < 1 or initial_counts < 3:
        raise ConfigError(f"counts per round: at least 1 (and 3 in the first round), got "
                          f"{counts_per_round} and {initial_counts}")
    if max_trials < initial_counts * replicates:
        raise ConfigError(f"--max-trials: {max_trials} is fewer than the first round's {initial_counts} "
                          f"counts × {replicates} replicates")
    if not rel_width > 0:
        raise ConfigError(f"--rel-width: must be positive, got {rel_width}")


# --- what any design can reach: large-sample variance of the crossing (benchmarks/budget_bound.py) ---

def crossing_variance(counts: Iterable[float], *, crossing: float, slope: float, threshold: float,
                      shares: Iterable[float] | None = None) -> float:
    """The large-sample variance of the fitted log crossing, per trial and per unit of dispersion φ,
    when trials are spread over ``counts`` (in ``shares``, equal by default) and the true curve is
    ``expit(logit τ + slope·(log c - log crossing))`` (no background rate).

    With n trials the fit's crossing x̂* has variance φ·V/n, V = c'M⁻¹c / b², where M is the
    Fisher information of (a, b) per trial (Σ sᵢ pᵢ(1-pᵢ)·[1, xᵢ]ᵀ[1, xᵢ]) and c = (1, x*): the
    delta method for x* = (logit τ - a)/b. The ratio of two designs' V is the ratio of the trials
    they need for the same precision (φ cancels when it does not depend on the count, as for a
    Beta seed spread: φ = 1/m + (1 - 1/m)/(κ + 1) with m test images).

    Example (by hand: two counts at the crossing ×2^±1, slope 2, τ = 0.5: p = expit(±2 log 2) =
    0.8 and 0.2, w = 0.16, M = 0.16·diag(1, log²2) around x*, so V = 1/(4·0.16) = 1.5625):
        >>> round(crossing_variance([50, 200], crossing=100, slope=2.0, threshold=0.5), 4)
        1.5625
    """
    x = np.log(np.asarray(list(counts), dtype=float))
    s = np.full(len(x), 1.0) if shares is None else np.asarray(list(shares), dtype=float)
    if s.shape != x.shape or (s < 0).any() or not s.sum() > 0:
        raise ValueError(f"shares: one non-negative share per count, not all zero, got {s.tolist()}")
    x, s = x[s > 0], s[s > 0] / s.sum()  # a count with no trials adds nothing
    target = math.log(crossing)
    p = special.expit(special.logit(threshold) + slope * (x - target))
    w = s * p * (1 - p)
    u = x - target  # centred on the crossing: c = (1, 0)
    info = np.array([[w.sum(), (w * u).sum()], [(w * u).sum(), (w * u * u).sum()]])
    if np.linalg.det(info) <= 1e-15 * max(info[0, 0] * info[1, 1], 1e-300):  # one count: only there
        return 1 / (slope**2 * w.sum()) if np.allclose(u, 0) else math.inf
    return float(np.linalg.solve(info, [1.0, 0.0])[0]) / slope**2


BEST_LOGIT = 2.39  # |logit τ| up to which one count at the crossing is the best design (Elfving)


def best_variance(*, slope: float, threshold: float) -> float:
    """The least :func:`crossing_variance` of any design: every trial at the crossing itself,
    1 / (b²·τ(1-τ)) (the locally c-optimal design; it needs the true curve, which no search has,
    so in large samples it bounds every design from below). This holds for thresholds within
    about 0.084-0.916 (|logit τ| ≤ 2.39); further out two counts either side of the crossing do
    better, and this function refuses. ``tests/sweeps/test_budget.py`` checks that no two-count design
    does better inside that range, and that one does outside it."""
    if abs(special.logit(threshold)) > BEST_LOGIT:
        raise ValueError(f"threshold {threshold}: one count at the crossing is the best design only for "
                         f"|logit τ| <= {BEST_LOGIT} (thresholds 0.084-0.916)")
    return 1 / (slope**2 * threshold * (1 - threshold))


# --- simulated dose-responses with a known crossing (tests and the benchmark) ---

@dataclass(frozen=True)
class SimulatedResponse:
    """A noisy attack whose true mean success crosses ``threshold`` at ``crossing``.

    Mean: a logistic in log count with ``slope`` (per unit of log count), plus an optional
    wiggle ``wiggle * sin(2π·log(c)/period)`` that makes it non-monotone. A trial's
    success is Binomial(``test_images``, p_seed) / ``test_images`` with p_seed drawn
    from a Beta of mean p and concentration ``concentration`` (the seed-to-seed spread).
    """

    crossing: float
    slope: float
    threshold: float = 0.9
    wiggle: float = 0.0
    period: float = 0.7
    concentration: float = 30.0
    test_images: int = 200
    floor: float = 0.0

    def mean(self, counts: np.ndarray | float) -> np.ndarray:
        x = np.log(counts)
        target = special.logit((self.threshold - self.floor) / (1 - self.floor))
        p = special.expit(target + self.slope * (x - math.log(self.crossing)))
        p = self.floor + (1 - self.floor) * p + self.wiggle * np.sin(2 * np.pi * x / self.period)
        return np.clip(p, 1e-4, 1 - 1e-4)

    @property
    def dispersion(self) -> float:
        """φ of Var = φ·p(1-p) for one trial's success (Beta-Binomial: 1/m + (1 - 1/m)/(κ + 1))."""
        return 1 / self.test_images + (1 - 1 / self.test_images) / (self.concentration + 1)

    def sample(self, count: float, rng: np.random.Generator) -> float:
        p = float(self.mean(count))
        p_seed = rng.beta(self.concentration * p, self.concentration * (1 - p))
        return rng.binomial(self.test_images, p_seed) / self.test_images

    def true_crossing(self, low: float, high: float) -> float:
        """The smallest count in [low, high] where the mean reaches the threshold (a fine
        log grid, then a root search); for a monotone curve this is ``crossing``."""
        grid = np.geomspace(low, high, 20001)
        above = np.flatnonzero(self.mean(grid) >= self.threshold)
        if not len(above):
            return math.inf
        if above[0] == 0:
            return float(low)
        i = above[0]
        return float(optimize.brentq(lambda c: float(self.mean(c)) - self.threshold, grid[i - 1], grid[i]))


def run_simulated(search: BudgetSearch, response: SimulatedResponse, rng: np.random.Generator) -> Estimate:
    """Runs ``search`` to the end against ``response``; returns its final estimate."""
    while not search.done:
        for point in search.propose():
            search.observe(point, response.sample(point.count, rng))
    return search.estimate()


def grid_estimate(response: SimulatedResponse, rng: np.random.Generator, *, low: int, high: int, counts: int,
                  replicates: int, threshold: float, confidence: float = 0.95) -> Estimate:
    """The obvious alternative: ``counts`` log-spaced counts × ``replicates`` seeds, one
    fit of the same curve with the same interval."""
    search = BudgetSearch(low=low, high=high, threshold=threshold, confidence=confidence, replicates=replicates,
                          max_trials=counts * replicates, initial_counts=max(counts, 3))
    for point in search.propose():
        search.observe(point, response.sample(point.count, rng))
    return search.estimate()
