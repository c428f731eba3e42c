"""A repair of one Ray Tune defect that loses trials under worker faults.

With ``reuse_actors=True`` Tune hands a finished trial's actor to the next trial and first runs
its ``reset`` task. When the actor's worker dies during that task, Tune's actor manager reports
the death twice (``ray.air.execution._internal.actor_manager.RayActorManager._actor_task_failed``
calls the actor's error callback, then the task's):

1. ``TuneController._actor_failed`` sees a trial that is still PENDING, counts the failure and
   requeues it (``_try_recover``: PENDING again, its actor gone, to start on a new one), then
2. the reset task's ``on_error`` (``TuneController._trial_task_failure``) sees the same PENDING
   trial and, since only a RUNNING trial is recovered (``_process_trial_failure``), ends it in
   ERROR, with ``max_failures`` far from reached. Had it not, the trial would also stay in
   ``_resetting_trials`` and never get an actor again (``_maybe_reuse_cached_actor``).

The repair drops the second report: a lost-actor failure of a PENDING trial that no actor holds
any more (``_actor_failed`` unbound it) is the death already handled; the trial leaves
``_resetting_trials`` and starts again like any recovered trial. Every other failure goes to
Tune's handler unchanged. Reproduced in ``tests/sweeps/test_tune_fixes.py`` (a trainable whose
worker exits in its first ``reset``); checked against Ray 2.59 and 2.60.
"""
from __future__ import annotations

import functools
import logging

from ray.exceptions import RayActorError
from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Trial

log = logging.getLogger(__name__)


def repair_reset_failures() -> None:
    """Install the repair on Tune's controller (once; a Tune without the methods it wraps is left
    alone, with a warning)."""
    original = TuneController._trial_task_failure
    if getattr(original, "poisonsweep_repair", False):
        return
    if not hasattr(TuneController, "_actor_failed"):
        log.warning("Ray Tune changed: the repair of a trial failing in an actor's reset is not installed")
        return

    @functools.wraps(original)
    def _trial_task_failure(self: TuneController, trial: Trial, exception: Exception) -> None:
        handled = (isinstance(exception, RayActorError) and trial.status == Trial.PENDING
                   and trial not in getattr(self, "_trial_to_actor", {trial: None}))
        if not handled:
            return original(self, trial, exception)
        log.debug("trial %s: its actor's death is already handled (requeued)", trial)
        getattr(self, "_resetting_trials", set()).discard(trial)
        return None

    _trial_task_failure.poisonsweep_repair = True
    TuneController._trial_task_failure = _trial_task_failure
