"""MOASHA: asynchronous successive halving over several objectives, as a Ray Tune scheduler.

Rungs are epochs: ``grace_period``, ``grace_period * reduction_factor``, ... below ``max_t``
(``train.epochs``). When a trial reports a rung's epoch, it is placed among every trial that
reached that rung so far (:func:`promotion_order`) and goes on when it is among the first
``ceil(n / reduction_factor)`` of those ``n``; otherwise Tune stops it. Nobody waits for a rung to
fill (as in ASHA): the first trial at a rung always goes on, and later ones meet a fuller rung.

The order at a rung: feasible trials (every ``search.constraints`` satisfied) before infeasible
ones (these by their total violation); then by non-dominated sorting over the objectives
(moocore's ``pareto_rank``); within a front by crowding distance, largest first (NSGA-II's,
on each objective's range within the front); then by arrival. An objective may be ranked by
another metric of the rung's epoch (``search.rung_metrics``: a backdoor's ``target_similarity`` for
its ``attack_success``), in the objective's direction.

Ray Tune does not keep a scheduler's state in its experiment state (``TuneController.save_to_dir``
leaves ``_scheduler_alg`` out), so :class:`RungState`, a Tune callback, saves the rungs and the
decisions with it and gives them back to the scheduler when a launch is resumed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import moocore
import numpy as np
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from sweeps.config import Constraint

EPOCH = "epoch_metrics/epoch"  # a per-epoch report, flattened as schedulers see it


def rung_epochs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The rungs' epochs: ``grace_period * reduction_factor**k`` (rounded) below ``max_t``."""
    rungs, k = [], 0
    while (epoch := int(round(grace_period * reduction_factor**k))) < max_t:
        if not rungs or epoch > rungs[-1]:
            rungs.append(epoch)
        k += 1
    return rungs


def crowding_distance(points: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each point of one front (rows; any direction): per
    objective, the gap between its two neighbours over the front's range; the ends are infinite.
    An objective equal over the front adds nothing."""
    n, m = points.shape
    distance = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(points[:, j], kind="stable")
        column = points[order, j]
        span = column[-1] - column[0]
        if span == 0:
            continue
        distance[order[0]] = distance[order[-1]] = np.inf
        distance[order[1:-1]] += (column[2:] - column[:-2]) / span
    return distance


def promotion_order(values: np.ndarray, directions: Sequence[str],
                    violations: Sequence[float] | None = None) -> tuple[list[int], np.ndarray]:
    """The rows of ``values`` (one per trial, in arrival order; one column per objective, each
    ``max`` or ``min`` by ``directions``) from best to worst, and each row's front (0: not
    dominated). ``violations``: each trial's total constraint violation (0: feasible); infeasible
    trials come after every feasible one, by violation."""
    values = np.asarray(values, dtype=float).reshape(len(values), len(directions))
    n = len(values)
    violations = np.zeros(n) if violations is None else np.asarray(violations, dtype=float)
    # minimisation throughout; a value a trial did not report (NaN) counts as the worst possible
    signs = np.array([-1.0 if d == "max" else 1.0 for d in directions])
    costs = np.where(np.isfinite(values), values * signs, np.finfo(float).max)
    fronts = np.zeros(n, dtype=int)
    crowding = np.zeros(n)
    for feasible in (True, False):
        rows = np.flatnonzero((violations <= 0) == feasible)
        if not len(rows):
            continue
        fronts[rows] = moocore.pareto_rank(costs[rows])
        for front in np.unique(fronts[rows]):
            members = rows[fronts[rows] == front]
            crowding[members] = crowding_distance(costs[members])
    infeasible = violations > 0
    order = sorted(range(n), key=lambda i: (bool(infeasible[i]), float(max(violations[i], 0.0)), int(fronts[i]),
                                            -crowding[i], i))
    return order, fronts


def violation(constraints: Sequence[Constraint], metrics: dict[str, Any]) -> float:
    """The trial's total violation of ``constraints`` (0: all satisfied); a metric it did not
    report violates infinitely."""
    total = 0.0
    for c in constraints:
        value = metrics.get(c.metric)
        total += max(0.0, c.value(float(value))) if _finite(value) else math.inf
    return total


class MOASHA(FIFOScheduler):
    """Stops a trial at a rung unless it is among the best ``1 / reduction_factor`` of the trials
    that reached the rung (see the module). ``decisions``: each trial's, in order, as
    ``{"epoch", "decision" (promoted|stopped), "place", "of", "kept", "front", "feasible"}``."""

    def __init__(self, objectives: dict[str, str], *, grace_period: int, reduction_factor: float, max_t: int,
                 constraints: Sequence[Constraint] = (), rung_metrics: dict[str, str] | None = None) -> None:
        super().__init__()
        self.objectives, self.reduction_factor = dict(objectives), reduction_factor
        self.ranked_by = [(rung_metrics or {}).get(k, k) for k in self.objectives]  # the metric read per objective
        self.constraints = list(constraints)
        self.rungs = rung_epochs(grace_period, reduction_factor, max_t)
        # rung epoch -> trial id -> (objective values, violation), in arrival order
        self.recorded: dict[int, dict[str, tuple[list[float], float]]] = {r: {} for r in self.rungs}
        self.decisions: dict[str, list[dict[str, Any]]] = {}

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        epoch = result.get(EPOCH)
        if epoch is None or int(epoch) not in self.recorded:
            return TrialScheduler.CONTINUE  # not a rung (or the final report)
        metrics = {k[len("epoch_metrics/"):]: v for k, v in result.items() if k.startswith("epoch_metrics/")}
        decision = self.decide(trial.trial_id, int(epoch), metrics)
        return TrialScheduler.CONTINUE if decision["decision"] == "promoted" else TrialScheduler.STOP

    def decide(self, trial_id: str, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Records the trial at rung ``epoch`` with its epoch's ``metrics`` and decides; a trial
        already decided there (a restarted trial reporting the rung again) keeps its decision."""
        earlier = next((d for d in self.decisions.get(trial_id, []) if d["epoch"] == epoch), None)
        if earlier is not None:
            return earlier
        rung = self.recorded[epoch]
        values = [float(metrics[k]) if _finite(metrics.get(k)) else math.nan for k in self.ranked_by]
        rung[trial_id] = (values, violation(self.constraints, metrics))
        ids = list(rung)
        order, fronts = promotion_order(np.array([rung[t][0] for t in ids]), list(self.objectives.values()),
                                        [rung[t][1] for t in ids])
        place, kept = order.index(len(ids) - 1), math.ceil(len(ids) / self.reduction_factor)
        decision = {"epoch": epoch, "decision": "promoted" if place < kept else "stopped", "place": place + 1,
                    "of": len(ids), "kept": kept, "front": int(fronts[-1]) + 1, "feasible": rung[trial_id][1] <= 0}
        self.decisions.setdefault(trial_id, []).append(decision)
        return decision

    def stopped_at(self, trial_id: str) -> int | None:
        """The rung's epoch at which the trial was stopped, or None."""
        return next((d["epoch"] for d in self.decisions.get(trial_id, []) if d["decision"] == "stopped"), None)

    def state(self) -> dict[str, Any]:
        return {"recorded": {str(k): v for k, v in self.recorded.items()}, "decisions": self.decisions}

    def load(self, state: dict[str, Any]) -> None:
        for epoch, trials in state.get("recorded", {}).items():
            if int(epoch) in self.recorded:
                self.recorded[int(epoch)] = {t: (list(v[0]), float(v[1])) for t, v in trials.items()}
        self.decisions = {t: list(d) for t, d in state.get("decisions", {}).items()}

    def debug_string(self) -> str:
        by = [f"{o} by {m}" for o, m in zip(self.objectives, self.ranked_by) if o != m]
        return f"MOASHA: rungs at epochs {self.rungs}, keeping 1 in {self.reduction_factor:g}" + \
            (f" ({', '.join(by)})" if by else "")


#: The key of a rung's decision in the trial's result at that epoch (and so in Tune's result.json).
DECISION = "rung_decision"


class RungState(tune.Callback):
    """Keeps :class:`MOASHA`'s rungs and decisions in Tune's experiment state (Tune saves its
    callbacks' ``get_state`` with it, and leaves the scheduler's out), so a resumed launch
    decides on the same rungs; and adds each decision to the result of the epoch it was made at
    (``DECISION``), where the trial logger and Tune's record find it. Listed before the logger."""

    def __init__(self, scheduler: MOASHA) -> None:
        self.scheduler = scheduler

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        epoch = (result.get("epoch_metrics") or {}).get("epoch")
        if epoch is None:
            return
        decision = next((d for d in self.scheduler.decisions.get(trial.trial_id, []) if d["epoch"] == int(epoch)),
                        None)
        if decision is not None:
            result[DECISION] = dict(decision)

    def get_state(self) -> dict[str, Any] | None:
        return {"moasha": self.scheduler.state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.scheduler.load(state.get("moasha", {}))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
