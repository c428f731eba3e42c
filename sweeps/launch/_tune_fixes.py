"""Repairs of Ray Tune defects that lose trials under faults or slow a large sweep: a trial failed
when its reused worker dies in its reset (:func:`repair_reset_failures`), an experiment state torn
by a launch killed while Tune copied it into storage (:func:`mend_torn_state`), and checkpoints
deleted before the experiment state that stops naming them is in storage, which Tune guards by
rewriting that whole state whenever a trial checkpoints twice within a save
(:func:`defer_checkpoint_deletion`).

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
import threading
import time
from pathlib import Path
from typing import Any

from ray.exceptions import RayActorError
from ray.train._internal import checkpoint_manager as _checkpoints
from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
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


#: Tune's experiment state is saved at least this often (seconds), and besides at most once per
#: SAVE_SHARE times the last save's duration: saves take at most 1/SAVE_SHARE of the driver's time
#: (Tune's own ``TUNE_GLOBAL_CHECKPOINT_S=auto`` uses 19, with a floor of 10 s)
SAVE_FLOOR_S, SAVE_SHARE = 1.0, 19.0

_pending: list[tuple[Any, str]] = []  # (filesystem, path): checkpoints waiting for a state save
_pending_lock = threading.Lock()


def defer_checkpoint_deletion() -> None:
    """Delete a trial's superseded checkpoints only once an experiment state that no longer names
    them is in storage, instead of forcing a save (once installed, in this process; a Tune without
    the methods it wraps is left alone, with a warning).

    Tune (``ray.train._internal.checkpoint_manager._CheckpointManager.register_checkpoint``)
    deletes a trial's checkpoints beyond ``CheckpointConfig(num_to_keep)`` as soon as it registers
    a newer one, while the experiment state in storage (saved at most every
    ``TUNE_GLOBAL_CHECKPOINT_S``) may still name them: a launch killed then resumes a trial from
    a checkpoint that is gone, and the trial fails ("Could not recover from checkpoint as it does
    not exist on storage anymore"). Tune guards against it by forcing a save of the whole
    experiment state, every trial's, whenever a trial has checkpointed ``num_to_keep`` times
    since the last (``_ExperimentCheckpointManager.on_trial_checkpoint``): a save per trial at
    least (its last epoch's and its final report's checkpoints come together), each as large as
    the sweep, so the driver's cost per trial grows with the sweep.

    Here a superseded checkpoint waits instead: it is deleted once a state written after it was
    superseded has been copied into storage (the copy that Tune's syncer launched after the save
    has ended without error), and no save is forced. The save period adapts as Tune's ``auto``
    does, from ``SAVE_FLOOR_S`` up to ``SAVE_SHARE`` times the last save's duration, so a sweep of
    thousands of trials does not spend its driver on rewriting their states every second. A launch
    killed with deletions waiting leaves those checkpoints on disk (at most those superseded
    within one save period)."""
    original = getattr(_ExperimentCheckpointManager, "sync_up_experiment_state", None)
    if getattr(original, "poisonsweep_repair", False):
        return
    delete = getattr(_checkpoints, "_delete_fs_path", None)
    if original is None or delete is None or not hasattr(_ExperimentCheckpointManager, "on_trial_checkpoint"):
        log.warning("Ray Tune changed: checkpoint deletions are not deferred to the experiment state's saves")
        return

    def queue(fs: Any, fs_path: str) -> None:
        with _pending_lock:
            _pending.append((fs, fs_path))

    def delete_quietly(fs: Any, fs_path: str) -> None:
        try:
            delete(fs=fs, fs_path=fs_path)
        except Exception as error:  # a checkpoint already gone, storage unreachable: Tune's own delete raises too
            log.warning("could not delete the superseded checkpoint %s: %s", fs_path, error)

    @functools.wraps(original)
    def sync_up_experiment_state(self: _ExperimentCheckpointManager, save_fn: Any, force: bool = False,
                                 wait: bool = False) -> None:
        root = str(self._storage.experiment_fs_path).rstrip("/") + "/"
        with _pending_lock:  # the deletions queued before this save, of this experiment's checkpoints
            mine = [p for p in _pending if str(p[1]).startswith(root)]
            _pending[:] = [p for p in _pending if not str(p[1]).startswith(root)]
        saved, synced, start = self._last_save_time, self._last_sync_time, time.monotonic()
        try:
            original(self, save_fn, force=force, wait=wait)
        except BaseException:
            with _pending_lock:
                _pending[:0] = mine
            raise
        awaiting = self.__dict__.setdefault("_poisonsweep_awaiting", [])
        if self._last_sync_time != synced and mine:  # a copy of a state written after they were superseded
            awaiting.append((getattr(self._storage.syncer, "_sync_process", None), self._last_sync_time, mine))
        elif mine:
            with _pending_lock:
                _pending[:0] = mine
        if self._last_save_time != saved and not self._auto_checkpoint_enabled:
            self._checkpoint_period = max(SAVE_FLOOR_S, SAVE_SHARE * (time.monotonic() - start))
        still = []
        for process, launched, batch in awaiting:
            # the copy has ended: waited for, seen ended, or followed by a later one (Tune's syncer
            # waits for a copy before it launches the next; a syncer that does not show its copy
            # is trusted only that way)
            ended = wait or self._last_sync_time != launched or (process is not None and not process.is_running)
            if not ended:
                still.append((process, launched, batch))
            elif process is not None and getattr(process, "_result", {}).get("exception") is not None:
                with _pending_lock:  # that copy failed: storage may still hold the older state
                    _pending[:0] = batch
            else:
                for fs, fs_path in batch:
                    delete_quietly(fs, fs_path)
        self._poisonsweep_awaiting = still

    def on_trial_checkpoint(self: _ExperimentCheckpointManager, trial: Trial) -> None:
        return None  # no forced save: the deletion it guarded waits for a save instead

    sync_up_experiment_state.poisonsweep_repair = True
    _ExperimentCheckpointManager.sync_up_experiment_state = sync_up_experiment_state
    _ExperimentCheckpointManager.on_trial_checkpoint = on_trial_checkpoint
    _checkpoints._delete_fs_path = queue


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
