"""The Optuna search space of a sweep, as a define-by-run function."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from sweeps.config._schema import Dimension, dropped_by, kind_switches, search_order

#: ``search.sampler: auto`` draws trials below this number with TPE, the rest with NSGA-II: TPE's
#: cost per trial grows with the study (about 0.02 s at 100 trials, 0.1 s at 1,000), NSGA-II's
#: stays near a millisecond (docs/search.md, benchmarks/sweep_scale.py).
AUTO_TPE_TRIALS = 250


class NSGAII(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, picklable: Tune pickles the searcher with its sampler, and Optuna 5.1's
    NSGAIISampler holds a ``threading.Lock`` (its generation cache's), which pickle refuses. The
    lock is left out of the pickle and made anew on unpickling."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_thread_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


class Staged(optuna.samplers.BaseSampler):
    """Optuna's TPE for a study's first ``switch`` trials, then its NSGA-II: what
    ``search.sampler: auto`` is. Each trial is drawn wholly by one of them, chosen by the
    trial's number (so a resumed study chooses as before).

    Example:
        >>> sampler = Staged(seed=0, switch=2)
        >>> study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        >>> study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=4)
        >>> [t.system_attrs.get(NSGAII._get_generation_key()) for t in study.trials]
        [None, None, 0, 0]
    """

    def __init__(self, seed: int | None = None, switch: int = AUTO_TPE_TRIALS) -> None:
        self.switch = switch
        self.first = optuna.samplers.TPESampler(seed=seed)
        self.then = NSGAII(seed=seed)

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        return self.first if trial.number < self.switch else self.then

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._for(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.first.reseed_rng()
        self.then.reseed_rng()


SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "auto": lambda seed: Staged(seed=seed),
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "nsga2": lambda seed: NSGAII(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed),
}


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    return SAMPLERS[name](seed)


class define_by_run:  # noqa: N801  (a picklable function: Tune checkpoints the searcher)
    """Draws the dimensions a trial uses on an Optuna trial, each named by its key path.

    Kind dimensions of switched sections (``attack.kind``, ``attack.trigger.kind``) are
    drawn first, outer before inner; then only the dimensions the drawn kinds use (a
    conditional space: ``attack.trigger.size`` is not drawn for a ``sig`` trigger, nor
    anything under ``attack.trigger`` for a ``targeted`` attack).

    Example:
        >>> from optuna.trial import FixedTrial
        >>> space = define_by_run({"train.lr": Dimension(low=1e-4, high=1e-2, log=True)})
        >>> space(FixedTrial({"train.lr": 1e-3}))
    """

    def __init__(self, dims: dict[str, Dimension]) -> None:
        self.dims = dims

    def __call__(self, trial: optuna.Trial) -> None:
        switches = kind_switches(self.dims)  # microseconds; nothing derived is pickled
        drawn: dict[str, Any] = {}
        for path in search_order(self.dims):
            if dropped_by(path, drawn, self.dims, switches) is None:
                drawn[path] = suggest(trial, path, self.dims[path])


def suggest(trial: optuna.Trial, path: str, dim: Dimension) -> Any:
    if dim.kind == "categorical":
        return trial.suggest_categorical(path, dim.choices)
    if dim.kind == "int":
        return trial.suggest_int(path, dim.low, dim.high, step=int(dim.step or 1), log=dim.log)
    return trial.suggest_float(path, float(dim.low), float(dim.high), step=dim.step, log=dim.log)
