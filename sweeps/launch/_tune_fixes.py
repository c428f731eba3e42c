"""Repairs of two Ray Tune defects that lose trials under faults: a trial failed when its reused
worker dies in its reset (:func:`repair_reset_failures`), and an experiment state torn by a launch
killed while Tune copied it into storage (:func:`mend_torn_state`).

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
worker exits in its first ``reset``), on Ray 2.60.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from pathlib import Path

from ray.exceptions import RayActorError
from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Trial

from poison.manifest import atomic_write

log = logging.getLogger(__name__)


def repair_reset_failures() -> None:
    """Install the repair on Tune's controller (once; a Tune without the methods it wraps is left
    alone, with a warning)."""
    original = getattr(TuneController, "_trial_task_failure", None)
    if getattr(original, "poisonsweep_repair", False):
        return
    if original is None or not hasattr(TuneController, "_actor_failed"):
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


def mend_torn_state(folder: Path, ray_temp: Path | None = None) -> list[str]:
    """Mends the experiment state of an interrupted launch in ``folder`` before Tune restores it.

    Tune writes its experiment state (``experiment_state-<session>.json``, beside the searcher's
    ``search_gen_state-<session>.json`` and ``searcher-state-<session>.pkl``) into a staging folder
    under Ray's temporary folder, then copies it into storage; a launch killed during the copy
    leaves a torn file there (empty or cut short), and Tune, finding the newest state unreadable,
    starts the sweep afresh (its trials "never recorded"). A torn state is replaced by its whole
    copy in Ray's staging folder (``<ray temp>/session_*/artifacts/*/<launch>/driver_artifacts``,
    the newest whole one) with the searcher's files of the same session; without one, the
    session's files are set aside (``.torn``) and Tune goes on from the state before it. Returns
    a line per mended file."""
    if ray_temp is None:
        ray_temp = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
    said = []
    for state in sorted(folder.glob("experiment_state-*.json")):
        if _whole(state):
            continue
        session = state.name.removeprefix("experiment_state-").removesuffix(".json")
        names = [state.name, f"search_gen_state-{session}.json", f"searcher-state-{session}.pkl"]
        staged = [d for d in ray_temp.glob(f"session_*/artifacts/*/{folder.name}/driver_artifacts")
                  if _whole(d / state.name)]
        if staged:
            source = max(staged, key=lambda d: (d / state.name).stat().st_mtime)
            for name in names:
                if (source / name).is_file():
                    data = (source / name).read_bytes()
                    atomic_write(folder / name, lambda fh, data=data: fh.write(data))
            said.append(f"{state.name} was torn: restored from Ray's staging copy ({source})")
        else:
            for name in names:
                if (folder / name).exists():
                    (folder / name).rename(folder / f"{name}.torn")
            said.append(f"{state.name} was torn and has no whole copy: set aside, the launch goes on "
                        f"from the state saved before it")
    return said


def _whole(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return True
