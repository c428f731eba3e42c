"""The Optuna search space of a sweep, as a define-by-run function."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

from sweeps.config._schema import Dimension, dropped_by, kind_switches, search_order

SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed),
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
