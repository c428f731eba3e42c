"""The trial logger: every Tune event of a launch mirrored into MLflow as it comes, with
progress lines and a status line (trials done, running, failed, time left); and the launch's
summary (one row per trial, and the parent run's description)."""
from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from ray import tune

from sweeps._files import DECISION_KEY, METRICS_FILE, reported_epoch
from sweeps.config import REPLICATE, SweepConfig
from sweeps.tracking._client import LAUNCH_TAG, Tracker, trial_name
from sweeps.tracking._mirror import TRACKING_ERRORS, Backoff, Mirror, has_final, rung_decisions, stopped, trial_folder
from trainers.config import TrialConfig

Printer = Callable[[str], None]
#: How often a terminal's status line is redrawn between Tune's events (the clock in it moves).
STATUS_EVERY_S = 1.0


class Console:
    """A printer for a person at a terminal: lines scroll above a status line that stays last and
    is redrawn in place. Where ``stream`` is not a terminal (CI, ``ray job logs``, a file) the
    status is printed as a plain line, only when it changes."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.shown = ""  # the status line on the terminal now, or the last one printed

    def __call__(self, line: str) -> None:
        if self.live and self.shown:
            self.stream.write(f"\r\x1b[K{line}\n{self.shown}")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def status(self, line: str) -> None:
        if self.live:
            self.stream.write(f"\r\x1b[K{line}")
            self.stream.flush()
        elif line != self.shown:
            self(line)
        self.shown = line

    def close(self) -> None:
        """Leaves the status line where it is, the cursor on the next line."""
        if self.live and self.shown:
            self.stream.write("\n")
            self.stream.flush()
        self.shown = ""


@dataclass
class TrialRow:
    """One finished (or failed) trial, for the summary table."""

    trial_id: str
    status: str
    values: dict[str, Any]
    metrics: dict[str, float]
    run_id: str | None
    error: str = ""
    name: str = ""  # its run's name


def trial_count(sweep: SweepConfig) -> int:
    """Tune trials of a launch: every configuration's replicates."""
    return sweep.search.num_samples * sweep.search.replicates


_LIVE_LOGGER: TrialLogger | None = None


@contextmanager
def restoring(logger: TrialLogger) -> Iterator[None]:
    """While a Tuner is restored: its pickled :class:`TrialLogger` unpickles as ``logger``."""
    global _LIVE_LOGGER
    _LIVE_LOGGER = logger
    try:
        yield
    finally:
        _LIVE_LOGGER = None


def _live_logger() -> tune.Callback:
    """What a pickled :class:`TrialLogger` becomes: the logger of the launch restoring it
    (a Tuner pickles its callbacks; a client to a tracking server does not belong on disk)."""
    return _LIVE_LOGGER if _LIVE_LOGGER is not None else tune.Callback()


class TrialLogger(tune.Callback):
    """Mirrors every trial into MLflow as it runs, and prints its progress.

    Tune's storage keeps the record; MLflow is written from the events as they come. When
    the tracking store fails, live writes pause (:class:`~sweeps.tracking.Backoff`) and the
    trials they missed are brought up to date from Tune's storage once it answers again,
    and at the end (:meth:`catch_up`). One logger may serve several Tuners in turn (the
    budget search's rounds): trials are numbered on across them, out of ``total``
    (default ``search.num_samples``). A printer with a ``status`` method (:class:`Console`)
    gets the status line there, else as a line of its own when it changes.
    """

    def __init__(self, sweep: SweepConfig, tracker: Tracker, printer: Printer, *, total: int | None = None) -> None:
        self.sweep, self.tracker, self.printer = sweep, tracker, printer
        self.status: Printer = getattr(printer, "status", printer)
        self.total = total or trial_count(sweep)
        self.mirror = Mirror(sweep, tracker)
        self.backoff = Backoff()
        self.behind: dict[str, Any] = {}  # trials whose MLflow run lags Tune's record
        self.order: dict[str, int] = {}
        self.highest = 0  # max(order.values()): numbering is O(1) per trial
        self.finished: dict[str, TrialRow] = {}
        self.start = time.monotonic()
        self.first_start: float | None = None  # the first trial's start, this process's clock
        self.running: set[str] = set()
        self.ended = 0  # trials this process saw end (a resumed launch's earlier ones set no pace)
        self.status_at = 0.0

    def __reduce__(self) -> tuple:
        return (_live_logger, ())

    @property
    def run_ids(self) -> dict[str, str]:
        return {t: r.run_id for t, r in self.mirror.runs.items()}

    def reattach(self) -> None:
        """Takes over the trial runs an interrupted launch left under the parent run."""
        self.mirror.load_existing()
        for trial_id, run in self.mirror.runs.items():
            self.order[trial_id] = run.number
            self.highest = max(self.highest, run.number)

    def say(self, line: str) -> None:
        """Prints a progress line stamped with the time since the sweep started."""
        elapsed = int(time.monotonic() - self.start)
        self.printer(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {line}")

    def progress(self) -> str:
        """The status line: trials done, stopped early (by the scheduler), running and failed, and
        the time left at the pace of those that ended since this process started its first trial."""
        statuses = Counter(r.status for r in self.finished.values())
        failed, stopped = statuses["FAILED"], statuses["STOPPED"]
        done = len(self.finished) - failed - stopped
        left = self.total - len(self.finished)
        line = f"{done}/{self.total} trials done, " + (f"{stopped} stopped early, " if stopped else "") + \
            f"{len(self.running)} running, {failed} failed"
        if self.first_start is None or not self.ended or not left:
            return line
        per_trial = (time.monotonic() - self.first_start) / self.ended
        seconds = int(per_trial * left)
        return f"{line}, about {seconds // 60}:{seconds % 60:02d} left"

    def _show_progress(self) -> None:
        self.status_at = time.monotonic()
        self.status(self.progress())

    def on_step(self, iteration: int, trials: list, **info: Any) -> None:
        if getattr(self.printer, "live", False) and time.monotonic() - self.status_at >= STATUS_EVERY_S:
            self._show_progress()

    def _label(self, trial: Any) -> str:
        """"trial N/total"; a trial this process has not seen start (a resumed launch's trial
        failing as Tune restores it) takes the next number."""
        return f"trial {self.number(trial.trial_id)}/{self.total}"

    def number(self, trial_id: str) -> int:
        """The trial's number (its run name starts with it): the next after the highest given, so a
        resumed launch whose MLflow lacks some trials (the server was down) never reuses one."""
        if trial_id not in self.order:
            self.highest += 1
            self.order[trial_id] = self.highest
        return self.order[trial_id]

    def _write(self, trial: Any, write: Callable[[], Any]) -> bool:
        """Does one MLflow write for ``trial``; on a tracking error, leaves it to the catch-up."""
        if trial.trial_id in self.behind or not self.backoff.ready():
            self.behind[trial.trial_id] = trial
            return False
        try:
            write()
            return True
        except TRACKING_ERRORS as err:
            self.behind[trial.trial_id] = trial
            self._tracking_failed(err)
            return False

    def _tracking_failed(self, err: BaseException) -> None:
        if self.backoff.ready():  # the first failure since MLflow last answered
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            self.say(f"MLflow unreachable ({first}); the trials go on, their results are kept in "
                     f"Tune's storage and written when it answers again")
        self.backoff.failed()

    def _catch_up_behind(self) -> None:
        if not self.behind or not self.backoff.ready():
            return
        for trial_id, trial in list(self.behind.items()):
            try:
                self._catch_up_one(trial)
            except TRACKING_ERRORS as err:
                self._tracking_failed(err)
                return
            del self.behind[trial_id]
        self.say("MLflow answers again: the trials' results are written")

    def _catch_up_one(self, trial: Any) -> None:
        number = self.number(trial.trial_id)
        self.mirror.catch_up(trial, number, _epochs(self.sweep.resolve(trial.config)), _error_text)

    def catch_up(self, folder: Path) -> bool:
        """Brings every trial of the launch in ``folder`` into MLflow as Tune recorded it (a
        restored launch's trials that finished before too, for the summary); False when
        the tracking store still fails."""
        from ray.tune import ExperimentAnalysis

        trials = ExperimentAnalysis(str(folder)).trials
        for trial in sorted(trials, key=lambda t: self.order.get(t.trial_id, float("inf"))):
            self.number(trial.trial_id)
            try:
                self._catch_up_one(trial)
            except TRACKING_ERRORS as err:
                self._tracking_failed(err)
                return False
            self.behind.pop(trial.trial_id, None)
            if trial.trial_id not in self.finished and trial.status in ("TERMINATED", "ERROR"):
                self._record(trial)
        try:
            lost = self.mirror.close_lost({t.trial_id for t in trials})
        except TRACKING_ERRORS as err:
            self._tracking_failed(err)
            return False
        if lost:
            self.say(f"{lost} trial run(s) of a killed driver that Tune never recorded: marked KILLED "
                     f"(their points were drawn again)")
        return True

    def _record(self, trial: Any, done: bool = False) -> None:
        """The trial's summary row, from its final checkpoint (or its error); ``done``: Tune
        completed it (its status changes only after the callbacks)."""
        run = self.mirror.runs.get(trial.trial_id)
        name = trial_name(self.number(trial.trial_id), self.sweep.resolve(trial.config))
        decisions = rung_decisions(trial)
        if (done or trial.status == "TERMINATED") and stopped(decisions) and not has_final(trial):
            self.finished[trial.trial_id] = TrialRow(trial.trial_id, "STOPPED", dict(trial.config), {},
                                                     run.run_id if run else None,
                                                     f"stopped at epoch {decisions[-1]['epoch']}", name)
            return
        if (done or trial.status == "TERMINATED") and trial.checkpoint is not None:
            with trial.checkpoint.as_directory() as folder:
                if (Path(folder) / METRICS_FILE).is_file():
                    metrics = json.loads((Path(folder) / METRICS_FILE).read_text())
                    self.finished[trial.trial_id] = TrialRow(trial.trial_id, "FINISHED", dict(trial.config),
                                                             metrics, run.run_id if run else None, name=name)
                    return
        last = _error_text(trial).strip().splitlines()
        self.finished[trial.trial_id] = TrialRow(trial.trial_id, "FAILED", dict(trial.config), {},
                                                 run.run_id if run else None, last[-1] if last else "error", name)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        restarted = trial.trial_id in self.order
        number = self.number(trial.trial_id)
        if self.first_start is None:
            self.first_start = time.monotonic()
        self.running.add(trial.trial_id)
        self._write(trial, lambda: self.mirror.start(trial.trial_id, dict(trial.config), number))
        values = " ".join(f"{'replicate' if k == REPLICATE else k}={_fmt(v)}" for k, v in trial.config.items())
        self.say(f"{self._label(trial)} {'restarted' if restarted else 'started'}: {values or 'defaults'}")
        self._show_progress()
        self._catch_up_behind()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        epoch = reported_epoch(result)
        if not epoch:
            return
        self._write(trial, lambda: self.mirror.epoch(trial.trial_id, epoch))
        decision = result.get(DECISION_KEY)  # the scheduler's at a rung (added by its RungState callback)
        if decision and decision["decision"] == "promoted":
            self._write(trial, lambda: self.mirror.rungs(trial.trial_id, rung_decisions(trial, [decision])))
        total = _epochs(self.sweep.resolve(trial.config))
        self.say(f"{self._label(trial)} epoch {int(epoch['epoch'])}/{total}: loss {epoch['loss']:.3f} "
                 f"utility {epoch.get('utility', float('nan')):.3f} "
                 f"attack_success {epoch.get('attack_success', float('nan')):.3f}")
        self._catch_up_behind()

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = _error_text(trial).strip().splitlines()
        self.say(f"{self._label(trial)} failed ({error[-1] if error else 'worker lost'}); retrying from its "
                 f"last checkpoint (failure {trial.num_failures} of {self.sweep.search.max_failures} allowed)")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        decisions = rung_decisions(trial)
        if stopped(decisions) and not has_final(trial):  # by the scheduler, after its last epoch: no final metrics
            self._write(trial, lambda: self.mirror.stop(trial.trial_id, decisions))
            self._record(trial, done=True)
            last = decisions[-1]
            self.say(f"{self._label(trial)} stopped at epoch {last['epoch']}: place {last['place']} of {last['of']} "
                     f"at that rung, which keeps {last['kept']}")
            self._ended(trial)
            return
        step = _epochs(self.sweep.resolve(trial.config))  # the last epoch's step
        with trial.checkpoint.as_directory() as folder:
            self._write(trial, lambda: self.mirror.complete(trial.trial_id, Path(folder), step, trial_folder(trial)))
        self._record(trial, done=True)
        metrics = self.finished[trial.trial_id].metrics
        self.say(f"{self._label(trial)} done: attack_success {metrics.get('attack_success', float('nan')):.3f} "
                 f"utility {metrics['utility']:.3f} poison_count {metrics['poison_count']}")
        self._ended(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = _error_text(trial)
        self._write(trial, lambda: self.mirror.fail(trial.trial_id, error))
        self._record(trial)
        self.say(f"{self._label(trial)} FAILED: {self.finished[trial.trial_id].error}")
        self._ended(trial)

    def _ended(self, trial: Any) -> None:
        """A trial finished, failed or was stopped: the status line counts it."""
        self.running.discard(trial.trial_id)
        self.ended += 1
        self._show_progress()
        self._catch_up_behind()

    def rows(self) -> list[TrialRow]:
        return [self.finished[t] for t in sorted(self.finished, key=lambda t: self.order.get(t, 0))]


def _epochs(config: TrialConfig) -> int:
    """Epochs a trial reports: its training's plus a post-training defense's."""
    return config.train.epochs + config.defense.extra_epochs


def _error_text(trial: Any) -> str:
    path = trial.error_file
    if path and Path(path).is_file():
        return Path(path).read_text()
    return str(trial.get_error() or "")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


SUMMARY_COLUMNS = ["poison_count", "attack_success", "utility", "clean_utility", "clean_attack_success"]


def summary_csv(rows: list[TrialRow], sweep: SweepConfig) -> str:
    """One line per trial; a dimension its drawn kinds do not use is left empty."""
    dims, cols = list(sweep.dimensions), SUMMARY_COLUMNS
    lines = [",".join(["trial_id", "status", *dims, *cols, "run_id"])]
    for r in rows:
        lines.append(",".join([r.trial_id, r.status, *(str(r.values.get(d, "")) for d in dims),
                               *(str(r.metrics.get(c, "")) for c in cols), r.run_id or ""]))
    return "\n".join(lines) + "\n"


def sweep_note(sweep: SweepConfig, rows: list[TrialRow], launch: str) -> str:
    """The parent run's description (Markdown, MLflow's ``mlflow.note.content``): the sweep, its
    trials, and its answer: the trials of this launch no other of them dominates under the
    sweep's objectives (trial by trial; ``poisonsweep pareto`` averages replicate seeds)."""
    from sweeps.analysis._pareto import nondominated

    objectives = sweep.search.objectives
    finished = [r for r in rows if r.status == "FINISHED"]
    attacks = sorted({sweep.resolve(r.values).attack.kind for r in rows}) or [sweep.default_trial.attack.kind]
    lines = [f"**{sweep.name}**, launch `{launch}`: attack {', '.join(attacks)}; "
             f"dimensions {', '.join(f'`{d}`' for d in sweep.dimensions) or 'none'}.", "",
             f"{len(finished)} trials finished, {len(rows) - len(finished)} failed; objectives "
             + ", ".join(f"{k} ({v})" for k, v in objectives.items()) + "."]
    scored = [r for r in finished if all(math.isfinite(r.metrics.get(k, math.nan)) for k in objectives)]
    if scored:
        mask = nondominated(np.array([[r.metrics[k] for k in objectives] for r in scored]), list(objectives.values()))
        front = sorted((r for r, keep in zip(scored, mask) if keep), key=lambda r: r.name)
        lines += ["", f"Non-dominated trials ({len(front)} of {len(scored)}):", "",
                  "| run | " + " | ".join(objectives) + " |", "|---" * (len(objectives) + 1) + "|",
                  *(f"| {r.name} | " + " | ".join(_fmt(r.metrics[k]) for k in objectives) + " |" for r in front)]
    lines += ["", f"This launch's runs: `tags.{LAUNCH_TAG} = '{launch}'`."]
    return "\n".join(lines) + "\n"


def summary_table(rows: list[TrialRow], sweep: SweepConfig) -> str:
    """The final table of trials, by their run names: their drawn values ("-": a dimension the
    trial's kinds do not use) and headline metrics."""
    dims = list(sweep.dimensions)
    head = ["trial", "status", *dims, "poison_count", "trigger", "attack_success", "utility"]
    body = []
    for r in rows:
        trigger = sweep.resolve(r.values).attack.trigger_name
        body.append([r.name or r.trial_id, r.status, *(_fmt(r.values[d]) if d in r.values else "-" for d in dims),
                     _fmt(r.metrics.get("poison_count", "")), trigger,
                     _fmt(r.metrics.get("attack_success", "")), _fmt(r.metrics.get("utility", ""))])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*map(str, row)) for row in body)])
