"""MOASHA's promotion rule on hand-worked rungs.

Four trials, objectives attack_success (max) and poison_count (min):

    A (0.9, 40)   B (0.5, 10)   C (0.4, 30)   D (0.7, 20)

B dominates C (more success with less poison); A, B and D dominate each other nowhere, so the
first front is {A, B, D} and C alone is the second. In the first front, A and B are the ends on
both objectives (infinite crowding distance); D's is (0.9 - 0.5) / (0.9 - 0.5) + (40 - 10) / (40 - 10)
= 2. So the full rung's order is A, B (ends, by arrival), D, C.
"""
from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from sweeps.config import Constraint
from sweeps.launch._moasha import DECISION, MOASHA, RungState, crowding_distance, promotion_order, rung_epochs

OBJECTIVES = {"attack_success": "max", "poison_count": "min"}
TRIALS = {"A": (0.9, 40), "B": (0.5, 10), "C": (0.4, 30), "D": (0.7, 20)}


def test_rungs_are_grace_times_powers_of_the_reduction_factor_below_max_t():
    assert rung_epochs(1, 3, 3) == [1]
    assert rung_epochs(1, 2, 8) == [1, 2, 4]
    assert rung_epochs(2, 3, 20) == [2, 6, 18]
    assert rung_epochs(1, 1.5, 4) == [1, 2, 3]  # 1, 1.5 -> 2, 2.25 -> 2 (once), 3.375 -> 3


def test_crowding_distance_of_one_front():
    front = np.array([[-0.9, 40.0], [-0.5, 10.0], [-0.7, 20.0]])
    assert crowding_distance(front).tolist() == [np.inf, np.inf, 2.0]
    assert crowding_distance(front[:2]).tolist() == [np.inf, np.inf]


def test_a_full_rung_orders_by_front_then_crowding_then_arrival():
    order, fronts = promotion_order(np.array(list(TRIALS.values())), list(OBJECTIVES.values()))
    assert [list(TRIALS)[i] for i in order] == ["A", "B", "D", "C"]
    assert fronts.tolist() == [0, 0, 1, 0]


def test_directions_matter():
    # poison_count maximised instead: A (0.9, 40) now dominates every other trial; then D (0.7, 20)
    # dominates B (0.5, 10); C (0.4, 30) and D are not comparable -> fronts {A}, {C, D}, {B}
    order, fronts = promotion_order(np.array(list(TRIALS.values())), ["max", "max"])
    assert [list(TRIALS)[i] for i in order] == ["A", "C", "D", "B"]
    assert fronts.tolist() == [0, 2, 1, 1]


def test_infeasible_trials_lose_to_every_feasible_one():
    # A violates a constraint: it goes after C, which is dominated
    order, _ = promotion_order(np.array(list(TRIALS.values())), list(OBJECTIVES.values()), [0.1, 0, 0, 0])
    assert [list(TRIALS)[i] for i in order] == ["B", "D", "C", "A"]
    # among infeasible trials the smaller violation first
    order, _ = promotion_order(np.array(list(TRIALS.values())), list(OBJECTIVES.values()), [0.2, 0.1, 0, 0])
    assert [list(TRIALS)[i] for i in order] == ["D", "C", "B", "A"]


def test_an_unreported_objective_counts_as_the_worst():
    order, _ = promotion_order(np.array([[0.9, np.nan], [0.1, 30.0]]), list(OBJECTIVES.values()))
    assert order == [0, 1]  # neither dominates: A's missing poison_count is worse, its success better
    order, _ = promotion_order(np.array([[np.nan, 10.0], [0.1, 10.0]]), list(OBJECTIVES.values()))
    assert order == [1, 0]


def trial(name: str) -> SimpleNamespace:
    return SimpleNamespace(trial_id=name)


def report(scheduler: MOASHA, name: str, epoch: int, **extra: float) -> str:
    success, poison = TRIALS[name]
    result = {"epoch_metrics/epoch": epoch, "epoch_metrics/attack_success": success,
              "epoch_metrics/poison_count": poison, **{f"epoch_metrics/{k}": v for k, v in extra.items()}}
    return scheduler.on_trial_result(None, trial(name), result)


def test_asynchronous_promotion_with_reduction_factor_2():
    # arrivals A, B, C, D at rung 1: each is placed among the trials already there, and the first
    # ceil(n / 2) of n go on: A (1 of 1, kept 1), B (2 of 2, kept 1), C (3 of 3, kept 2: B
    # dominates it), D (3 of 4, kept 2: behind A and B on crowding)
    scheduler = MOASHA(OBJECTIVES, grace_period=1, reduction_factor=2, max_t=4)
    assert [report(scheduler, t, 1) for t in "ABCD"] == [TrialScheduler.CONTINUE] + [TrialScheduler.STOP] * 3
    assert scheduler.decisions["D"] == [{"epoch": 1, "decision": "stopped", "place": 3, "of": 4, "kept": 2,
                                         "front": 1, "feasible": True}]
    assert scheduler.decisions["C"][0]["front"] == 2
    assert scheduler.stopped_at("D") == 1 and scheduler.stopped_at("A") is None


def test_arrival_order_changes_who_goes_on():
    # arrivals C, D, B, A: C (alone), D (dominates C), B (2 of 3: not dominated, behind D by arrival),
    # A (2 of 4: an end of the front, like B which came first) -> every one goes on
    scheduler = MOASHA(OBJECTIVES, grace_period=1, reduction_factor=2, max_t=4)
    assert [report(scheduler, t, 1) for t in "CDBA"] == [TrialScheduler.CONTINUE] * 4
    assert [scheduler.decisions[t][0]["place"] for t in "CDBA"] == [1, 1, 2, 2]


def test_only_rung_epochs_decide_and_a_trial_is_decided_once_per_rung():
    scheduler = MOASHA(OBJECTIVES, grace_period=1, reduction_factor=2, max_t=4)  # rungs 1, 2
    assert report(scheduler, "A", 1) == TrialScheduler.CONTINUE
    assert report(scheduler, "B", 3) == TrialScheduler.CONTINUE  # 3 is no rung
    assert report(scheduler, "B", 1) == TrialScheduler.STOP
    assert report(scheduler, "B", 1) == TrialScheduler.STOP  # reported again: the same decision
    assert len(scheduler.recorded[1]) == 2 and len(scheduler.decisions["B"]) == 1
    final = {"attack_success": 0.9, "poison_count": 40}  # the final report: no epoch_metrics
    assert scheduler.on_trial_result(None, trial("A"), final) == TrialScheduler.CONTINUE


def test_constraints_decide_ties_against_the_infeasible():
    # B would stop behind A (both ends of the front, A first); with A's utility_drop over the bound,
    # A is infeasible and B goes on
    scheduler = MOASHA(OBJECTIVES, grace_period=1, reduction_factor=2, max_t=4,
                       constraints=[Constraint("utility_drop", "<=", 0.02)])
    assert report(scheduler, "A", 1, utility_drop=0.05) == TrialScheduler.CONTINUE
    assert report(scheduler, "B", 1, utility_drop=0.01) == TrialScheduler.CONTINUE
    assert scheduler.decisions["A"][0]["feasible"] is False
    assert report(scheduler, "D", 1) == TrialScheduler.STOP  # no utility_drop reported: infeasible


def test_a_rung_metric_ranks_its_objective_in_the_objectives_direction():
    # attack success ranked by target_margin: A's success is higher, but B's margin is; with
    # poison_count equal, the margin alone decides, and of 2 arrivals with factor 2 one goes on
    scheduler = MOASHA(OBJECTIVES, grace_period=1, reduction_factor=2, max_t=4,
                       rung_metrics={"attack_success": "target_margin"})
    first = {"epoch_metrics/epoch": 1, "epoch_metrics/attack_success": 0.02, "epoch_metrics/target_margin": -0.3,
             "epoch_metrics/poison_count": 20}
    second = {**first, "epoch_metrics/attack_success": 0.0, "epoch_metrics/target_margin": -0.1}
    assert scheduler.on_trial_result(None, trial("A"), first) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, trial("B"), second) == TrialScheduler.CONTINUE  # 1 of 2: kept 1
    assert scheduler.on_trial_result(None, trial("C"), first) == TrialScheduler.STOP  # behind B, A came first
    assert "attack_success by target_margin" in scheduler.debug_string()
    # without the rung metric, A's and C's success puts B last
    plain = MOASHA(OBJECTIVES, grace_period=1, reduction_factor=2, max_t=4)
    assert [plain.on_trial_result(None, trial(t), r) for t, r in (("A", first), ("B", second))] == \
        [TrialScheduler.CONTINUE, TrialScheduler.STOP]


def test_the_rungs_survive_tunes_experiment_state():
    scheduler = MOASHA(OBJECTIVES, grace_period=1, reduction_factor=2, max_t=4)
    report(scheduler, "A", 1)
    # Tune keeps callbacks' get_state in its experiment state (pickled); a resumed launch's
    # scheduler starts empty and gets it back through the callback
    state = pickle.loads(pickle.dumps(RungState(scheduler).get_state()))
    resumed = MOASHA(OBJECTIVES, grace_period=1, reduction_factor=2, max_t=4)
    RungState(resumed).set_state(state)
    assert report(resumed, "B", 1) == TrialScheduler.STOP  # A is still on rung 1
    assert resumed.decisions["A"][0]["decision"] == "promoted"


def test_the_decision_reaches_the_result_of_its_epoch():
    scheduler = MOASHA(OBJECTIVES, grace_period=1, reduction_factor=2, max_t=4)
    report(scheduler, "A", 1)
    report(scheduler, "B", 1)
    result = {"epoch_metrics": {"epoch": 1, "attack_success": 0.5, "poison_count": 10}}
    RungState(scheduler).on_trial_result(0, [], trial("B"), result)
    assert result[DECISION]["decision"] == "stopped" and result[DECISION]["place"] == 2
    later = {"epoch_metrics": {"epoch": 2}}
    RungState(scheduler).on_trial_result(0, [], trial("A"), later)
    assert DECISION not in later


@pytest.mark.parametrize("bad", ["", "utility_drop", "utility_drop = 1"])
def test_constraint_text_must_be_metric_op_bound(bad):
    from poison import ConfigError

    with pytest.raises(ConfigError, match=r"^search\.constraints\[2\]: "):
        Constraint.parse(bad, "search.constraints[2]")


def test_constraint_values_are_optunas_sign():
    assert Constraint.parse("utility_drop <= 0.02", "k").value(0.05) == pytest.approx(0.03)
    assert Constraint.parse("utility >= 0.5", "k").value(0.6) == pytest.approx(-0.1)


def study_search(constraints=(), sampler="tpe"):
    from sweeps.config import Dimension, define_by_run, make_sampler
    from sweeps.launch._driver import StudySearch

    searcher = StudySearch(space=define_by_run({"attack.poison_count": Dimension(low=10, high=40)}),
                           metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()), sampler=make_sampler(sampler, 0))
    searcher.constraints = list(constraints)
    return searcher


def test_optuna_learns_a_stopped_trial_as_pruned_with_no_values():
    # a stopped trial's last result is an epoch's report (flattened), without the objectives at the
    # top level: Ray's OptunaSearch would tell [None, None] as COMPLETE, which Optuna refuses
    limit = Constraint("utility_drop", "<=", 0.02)
    searcher = study_search([limit])
    for trial_id in ("done", "stopped"):
        searcher.suggest(trial_id)
    searcher.on_trial_complete("done", {"attack_success": 0.9, "poison_count": 12, "utility_drop": 0.05,
                                        "epoch_metrics/attack_success": 0.1})
    searcher.on_trial_complete("stopped", {"epoch_metrics/attack_success": 0.4, "epoch_metrics/poison_count": 30,
                                           "epoch_metrics/utility_drop": 0.01, "rung_decision/decision": "stopped"})
    done, stop = searcher._ot_study.get_trials()
    assert done.state.name == "COMPLETE" and done.values == [0.9, 12]
    assert stop.state.name == "PRUNED" and stop.values is None
    # the constraints' values (Optuna's sign: > 0 violated) are the trials' constraints, as every
    # constrained sampler reads them: the finished trial's final utility_drop, the stopped one's last epoch's
    assert done.constraints == pytest.approx({"utility_drop <= 0.02": 0.03})
    assert stop.constraints == pytest.approx({"utility_drop <= 0.02": -0.01})
    assert done.system_attrs["constraints:utility_drop <= 0.02"] == pytest.approx(0.03)
    # a trial without the metric (failed before it) violates it without end
    searcher.suggest("blind")
    searcher.on_trial_complete("blind", {"epoch_metrics/attack_success": 0.4, "rung_decision/decision": "stopped"})
    assert searcher._ot_study.get_trials()[2].constraints == {"utility_drop <= 0.02": float("inf")}


def test_a_failed_trial_is_still_a_failure():
    searcher = study_search()
    searcher.suggest("t")
    searcher.on_trial_complete("t", None, error=True)
    assert searcher._ot_study.get_trials()[0].state.name == "FAIL"


def test_replicates_of_a_configuration_one_of_them_stopped_are_told_as_stopped():
    from sweeps.launch._driver import Replicates

    inner = study_search()
    searcher = Replicates(inner, repeat=2)
    searcher.suggest("r0"), searcher.suggest("r1")
    searcher.on_trial_complete("r0", {"attack_success": 0.9, "poison_count": 12})
    searcher.on_trial_complete("r1", {"epoch_metrics/attack_success": 0.2, "rung_decision/decision": "stopped"})
    (told,) = inner._ot_study.get_trials()
    assert told.state.name == "PRUNED" and told.values is None  # not the finished replicate's values alone


@pytest.mark.parametrize("search, train, message", [
    ({"scheduler": "moasha", "grace_period": 5}, {"epochs": 5},
     "search.grace_period: 5 leaves no rung below train.epochs (5); give fewer epochs than train.epochs"),
    ({"scheduler": "moasha"}, {"epochs": {"low": 2, "high": 6}},
     "search.scheduler: moasha needs a fixed train.epochs (its rungs are epochs below it), not a search dimension"),
    ({"constraints": ["utility_drop <= 0.02", "utility_dorp <= 0.1"]}, {},
     "search.constraints[1]: unknown metric 'utility_dorp'; valid: "),
    ({"constraints": ["utility_drop < 0.02"]}, {},
     "search.constraints[0]: 'utility_drop < 0.02' is not 'METRIC <= BOUND' or 'METRIC >= BOUND'"),
    ({"constraints": ["utility >= nan"]}, {}, "search.constraints[0]: bound 'nan' is not a finite number"),
    ({"scheduler": "moasha", "rung_metrics": {"utility_drop": "target_margin"}}, {},
     "search.rung_metrics: 'utility_drop' is not one of the objectives (attack_success, utility, poison_count)"),
    ({"scheduler": "moasha", "rung_metrics": {"attack_success": "target_margn"}}, {},
     "search.rung_metrics: attack_success: unknown metric 'target_margn'; valid: "),
    ({"rung_metrics": {"attack_success": "target_margin"}}, {},
     "search.rung_metrics: only search.scheduler: moasha ranks trials at rungs"),
    ({"epoch_budget": -1}, {}, "search.epoch_budget: "),
])
def test_bad_scheduler_and_constraint_settings_are_one_line_naming_the_key(search, train, message):
    from poison import ConfigError
    from sweeps.config import validate_config
    from tests.support import TINY

    raw = {**TINY, "train": {**TINY["train"], **train}, "search": {**TINY["search"], **search}}
    with pytest.raises(ConfigError) as err:
        validate_config(raw, check_data=False)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_valid_scheduler_config():
    from sweeps.config import validate_config
    from tests.support import TINY

    sweep = validate_config({**TINY, "search": {**TINY["search"], "scheduler": "moasha", "grace_period": 2,
                                                "reduction_factor": 2, "constraints": ["utility >= 0.5"]}},
                            check_data=False)
    assert sweep.search.parsed_constraints == [Constraint("utility", ">=", 0.5)]
    from sweeps.launch._driver import moasha

    scheduler = moasha(sweep, list(sweep.search.objectives))
    assert scheduler.rungs == [2, 4] and scheduler.constraints == sweep.search.parsed_constraints  # TINY: 5 epochs


class Counting(Searcher):
    """A searcher that suggests ``{"x": n}`` for its n-th trial."""

    def __init__(self) -> None:
        super().__init__(metric="attack_success", mode="max")
        self.n = 0

    def suggest(self, trial_id):
        self.n += 1
        return {"x": self.n}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass

    def save(self, checkpoint_path):
        pass

    def restore(self, checkpoint_path):
        pass


def test_the_epoch_budget_stops_suggesting_once_spent_and_survives_a_resume(tmp_path):
    from sweeps.launch._driver import BudgetLimiter

    limiter = BudgetLimiter(Counting(), max_concurrent=3, epoch_budget=4)
    assert [limiter.suggest(t) for t in ("t1", "t2", "t3")] == [{"x": 1}, {"x": 2}, {"x": 3}]
    for epoch in (1, 2):
        limiter.on_trial_result("t1", {"epoch_metrics/epoch": epoch, "epoch_metrics/loss": 1.0})
    limiter.on_trial_result("t1", {"epoch_metrics/epoch": 2})  # a retried trial reports an epoch again
    limiter.on_trial_result("t1", {"attack_success": 0.5})  # the final report is no epoch
    limiter.on_trial_complete("t1", {"attack_success": 0.5})
    # Tune tells a searcher no result of a trial the scheduler stops, only its last, at the end
    limiter.on_trial_complete("t2", {"epoch_metrics/epoch": 1, "rung_decision/decision": "stopped"})
    assert limiter.epochs_spent == 3 and limiter.suggest("t4") == {"x": 4}  # 3 of 4 spent
    limiter.on_trial_result("t3", {"epoch_metrics": {"epoch": 1}})  # unflattened, as a searcher may see it
    assert limiter.suggest("t5") == Searcher.FINISHED  # 4 of 4 spent: t3 and t4 run on, nothing starts
    limiter.save(str(tmp_path / "searcher.pkl"))
    resumed = BudgetLimiter(Counting(), max_concurrent=3, epoch_budget=4)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    assert resumed.epochs_spent == 4 and resumed.suggest("t5") == Searcher.FINISHED
    unlimited = BudgetLimiter(Counting(), max_concurrent=2)
    for epoch in range(1, 100):
        unlimited.on_trial_result("t1", {"epoch_metrics/epoch": epoch})
    assert unlimited.suggest("t1") == {"x": 1}
