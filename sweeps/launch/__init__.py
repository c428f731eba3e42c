"""Running a sweep: the driver (Ray, Tune's Tuner with Optuna's searcher, the clean and
reference models first, resume) and what runs in Ray's workers (the trainable, data-parallel
trials)."""
from poison.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "_driver": ["QUIET_ENV", "SweepOutcome", "clean_first", "find_launch", "run_sweep", "start_driver", "tuner"],
    "_trainable": ["trainable", "train_clean", "train_reference"],
})
