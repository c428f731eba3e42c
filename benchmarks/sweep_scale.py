"""What the driver costs per trial as a sweep grows: 100, 1,000 and 10,000 trials, side by side.

Part 1 (``samplers``): each Optuna sampler poisonsweep offers, in memory, 3 objectives over a
sweep's 3 dimensions: the seconds of one ask+tell around trial 100, 1,000 and 10,000 (the mean
over the next ``--window`` trials after filling the study to that size). In-memory and
without Ray: what the sampler itself costs.

Part 2 (``driver``): the real driver (``sweeps.launch.run_sweep``: Tuner, OptunaSearch on its
SQLite study, the ConcurrencyLimiter, the TrialLogger writing one MLflow run per trial into
SQLite, the launch file, Tune's experiment state for ``--resume``) over trials of fixed, tiny
work (``--work`` seconds over 2 epochs, a 1 KB checkpoint each epoch, then the final metrics, a
real trial's poison plan and config), ``--slots`` at a time on a local Ray that declares that
many CPUs. Each trial's objectives are a smooth function of its drawn values plus seeded noise,
so the samplers see a front (constant values would make TPE's split trivial). Per size: the
driver process's CPU seconds per trial over the whole launch and over its last tenth of
trials before the drain, at least 50 of them (the marginal cost: what grows shows there; fewer
trials make it noise; the last ``--slots`` trials are left out, as no trial starts after them
and so none is suggested), and where they go:

- ``searcher``: OptunaSearch's suggest and tell (the sampler and the study's SQLite storage);
- ``tune state``: Tune's experiment-state saves (every trial's state, every second, or every 19
  times a save's duration where that is longer: ``sweeps/launch/_tune_fixes.py``);
- ``mlflow``: every MlflowClient call (create run, params, metrics, tags, artifacts, end);
- ``logger``: the TrialLogger's own work around them (the mirror, progress lines);
- ``rest``: the remainder of the driver's CPU, split into ``loop`` (the rest of the main
  thread: Tune's event loop, Ray's calls) and ``threads`` (the process's other threads: Ray's,
  Tune's syncer copying the experiment folder into storage).

Then it checks that MLflow lost nothing: one FINISHED child run per trial with its final
metrics. A size is skipped when the previous one projects it past ``--budget-minutes``.

    .venv/bin/python benchmarks/sweep_scale.py [--sizes 100 1000 10000] [--slots 16] [--sampler tpe]
        [--budget-minutes 30] [--only samplers|driver]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

RECORD_ENV, WORK_ENV = "SWEEP_SCALE_RECORD", "SWEEP_SCALE_WORK"
COMPONENTS = ("searcher", "tune state", "mlflow", "logger")


# ---------------------------------------------------------------- part 1: the samplers alone

def sampler_costs(names: list[str], sizes: list[int], window: int, budget_s: float) -> None:
    import optuna

    from sweeps.config._space import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"Optuna {optuna.__version__}, in memory, 3 objectives, 3 dimensions: seconds per ask+tell "
          f"(mean of {window} trials) at each study size; then the hypervolume of the front found by "
          f"that size (of the normalised objectives, larger is better; the same objectives for every sampler)")
    print(f"{'sampler':10s}" + "".join(f"{n:>12,d}" for n in sizes) + "".join(f"{f'HV@{n:,}':>12s}" for n in sizes))
    for name in names:
        study = optuna.create_study(directions=["maximize", "maximize", "minimize"], sampler=make_sampler(name, 0))
        cells, volumes, deadline = [], [], time.perf_counter() + budget_s
        for size in sizes:
            while len(study.trials) < size and time.perf_counter() < deadline:
                _ask_tell(study)
            if len(study.trials) < size:
                cells.append(f"{'(over time)':>12s}")
                volumes.append(f"{'':>12s}")
                continue
            volumes.append(f"{hypervolume(study.trials[:size]):12.4f}")
            timed = time.perf_counter()
            for _ in range(window):
                _ask_tell(study)
            cells.append(f"{(time.perf_counter() - timed) / window:12.4f}")
        print(f"{name:10s}" + "".join(cells) + "".join(volumes), flush=True)


def hypervolume(trials: list[Any]) -> float:
    """The hypervolume dominated by ``trials``' objectives (attack success and utility maximised,
    the count minimised), each scaled to [0, 1] over its range, up to the worst corner."""
    import numpy as np
    from optuna._hypervolume import compute_hypervolume

    values = np.array([t.values for t in trials if t.values is not None], dtype=float)
    # losses in [0, 1]: 1 - success, (0.85 - utility) / 0.2 (utility lies in [0.65, 0.85]), log-count over [10, 400]
    losses = np.stack([1 - values[:, 0], (0.85 - values[:, 1]) / 0.2,
                       np.log(values[:, 2] / 10) / math.log(40)], axis=1).clip(0, 1)
    return float(compute_hypervolume(losses, np.ones(3)))


def _ask_tell(study: Any) -> None:
    trial = study.ask()
    count = trial.suggest_int("attack.poison_count", 10, 400, log=True)
    size = trial.suggest_categorical("attack.trigger.size", [3, 4, 6])
    lr = trial.suggest_float("train.lr", 1e-4, 3e-3, log=True)
    study.tell(trial, list(synthetic_objectives(count, size, lr, trial.number)))


def synthetic_objectives(count: int, size: int, lr: float, seed: int) -> tuple[float, float, int]:
    """A front to find: attack success rises with the count and the trigger's size, utility
    falls away from lr 1e-3; seeded noise."""
    noise = math.sin(seed * 12.9898) * 0.05
    success = 1 / (1 + math.exp(-(math.log(count) - 4 + size / 3))) + noise
    utility = 0.8 - 0.1 * abs(math.log10(lr) + 3) - noise / 2
    return min(1.0, max(0.0, success)), utility, count


# ---------------------------------------------------------------- part 2: the driver

def fixed_work_trainable(values: dict[str, Any], *, raw: dict[str, Any], dims: dict, cache_dir: str,
                         threads: int, objectives: list[str], every: int = 1, kept: list[str] | None = None,
                         **_: Any) -> None:
    """A trial of ``$SWEEP_SCALE_WORK`` seconds with :func:`sweeps.launch.trainable`'s reports:
    each epoch's metrics with a 1 KB checkpoint, then the final metrics, a real trial's plan and
    the resolved config."""
    import tempfile as _tempfile

    import yaml
    from ray import tune

    from sweeps._files import CONFIG_FILE, METRICS_FILE, PLAN_FILE, epoch_result, final_result
    from sweeps.config._schema import resolve
    from sweeps.launch._trainable import for_worker

    record, work = Path(os.environ[RECORD_ENV]), float(os.environ[WORK_ENV])
    config = for_worker(resolve(raw, dims, values), threads)
    success, utility, count = synthetic_objectives(config.attack.poison_count, config.attack.trigger.size,
                                                   config.train.lr, zlib.crc32(json.dumps(values, sort_keys=True).encode()))
    epochs = config.train.epochs
    for epoch in range(1, epochs + 1):
        time.sleep(work / epochs)
        metrics = {"epoch": epoch, "loss": 1.0 / epoch, "attack_success": success * epoch / epochs,
                   "utility": utility * epoch / epochs}
        with _tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "state.bin").write_bytes(b"\0" * 1024)
            tune.report(epoch_result(metrics, kept), checkpoint=tune.Checkpoint.from_directory(folder))
    final = {**json.loads((record / "final.json").read_text()), "attack_success": success, "utility": utility,
             "poison_count": count}
    with _tempfile.TemporaryDirectory() as folder:
        shutil.copy(record / PLAN_FILE, Path(folder) / PLAN_FILE)
        (Path(folder) / METRICS_FILE).write_text(json.dumps(final, indent=1))
        (Path(folder) / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        tune.report(final_result(final, kept), checkpoint=tune.Checkpoint.from_directory(folder))


class Meter:
    """CPU seconds of the driver's main thread (Tune's event loop, which calls the searcher, the
    callbacks and the state saves) spent inside wrapped methods, per component, each call's time
    counted once: a call inside another wrapped call (MLflow inside the logger) counts for the
    inner one."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(COMPONENTS, 0.0)
        self.stack: list[float] = []  # time already given to inner calls, per open call

    def wrap(self, owner: type, name: str, component: str) -> None:
        method = getattr(owner, name)

        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            self.stack.append(0.0)
            try:
                return method(*args, **kwargs)
            finally:
                spent = time.thread_time() - start
                inner = self.stack.pop()
                self.totals[component] += spent - inner
                if self.stack:
                    self.stack[-1] += spent

        setattr(owner, name, timed)

    def snapshot(self) -> dict[str, float]:
        # called on the main thread (Tune's event loop calls the printer): its CPU time too
        return {**self.totals, "cpu": time.process_time(), "main": time.thread_time()}


def instrument(meter: Meter) -> None:
    from mlflow.tracking import MlflowClient
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.tracking import TrialLogger

    for name in ("suggest", "on_trial_complete", "on_trial_result"):
        meter.wrap(OptunaSearch, name, "searcher")
    meter.wrap(TuneController, "checkpoint", "tune state")
    for name, value in vars(MlflowClient).items():
        if callable(value) and not name.startswith("_"):
            meter.wrap(MlflowClient, name, "mlflow")
    for name in ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error", "on_trial_recover",
                 "on_step_end", "on_experiment_end"):
        if hasattr(TrialLogger, name):
            meter.wrap(TrialLogger, name, "logger")


def sweep_config(size: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from sweep_overhead import sweep_config as overhead_config

    config = overhead_config(argparse.Namespace(epochs=2, trials=size, slots=args.slots, checkpoint_every=1), folder)
    config["search"]["sampler"] = args.sampler
    config["attack"]["poison_count"] = {"low": 10, "high": 400, "log": True, "default": 40}
    return config


def run_size(size: int, args: argparse.Namespace, folder: Path, meter: Meter) -> dict[str, Any]:
    from sweeps.config._schema import validate_config
    from sweeps.launch._driver import run_sweep

    sweep = validate_config(sweep_config(size, args, folder / str(size)))
    marks: list[dict[str, float]] = []

    def printer(line: str) -> None:
        if " done" in line or " failed" in line:
            marks.append(meter.snapshot())

    start, before = time.perf_counter(), meter.snapshot()
    outcome = run_sweep(sweep, tracking_uri=f"sqlite:///{folder / str(size) / 'mlflow.db'}", printer=printer,
                        trainable=fixed_work_trainable)
    wall, after = time.perf_counter() - start, meter.snapshot()
    # the marginal cost: the last tenth (at least 50) of trials before the drain (the last `slots` trials end
    # with none started after them, so no suggestion), each trial's start and end inside it
    end = max(1, len(marks) - args.slots)
    last = max(size // 10, min(50, end - 1))
    start_mark = marks[end - last - 1] if end - last - 1 >= 0 else before
    return {"size": size, "wall": wall, "whole": _per_trial(before, after, size),
            "tail": _per_trial(start_mark, marks[end - 1] if marks else after, last), "lost": lost(outcome, size)}


def _per_trial(a: dict[str, float], b: dict[str, float], n: int) -> dict[str, float]:
    parts = {k: (b[k] - a[k]) / n for k in (*COMPONENTS, "cpu", "main")}
    parts["rest"] = parts["cpu"] - sum(parts[k] for k in COMPONENTS)
    parts["loop"] = parts["main"] - sum(parts[k] for k in COMPONENTS)  # the rest on the main thread
    parts["threads"] = parts["cpu"] - parts["main"]                     # the process's other threads
    return parts


def lost(outcome: Any, size: int) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(outcome.tracking_uri)
    runs = client.search_runs([outcome.experiment_id], max_results=50000,
                              filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    finished = [r for r in runs if r.info.status == "FINISHED" and "attack_success" in r.data.metrics]
    ids = {r.data.tags.get("trial_id") for r in runs}
    if len(finished) == size and len(ids) == size == len(runs):
        return "nothing"
    return f"{size - len(finished)} of {size} (runs {len(runs)}, trial ids {len(ids)})"


def driver_costs(args: argparse.Namespace) -> None:
    import logging

    import ray
    from sweep_overhead import record_trial

    from sweeps import _local_ray as local_ray
    from sweeps.config._schema import validate_config
    from sweeps.launch._driver import QUIET_ENV

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    folder = Path(args.keep or tempfile.mkdtemp(prefix="sweep-scale-")).resolve()
    record = folder / "record"
    info = record_trial(validate_config(sweep_config(1, args, folder / "record-sweep")), record)
    print(f"\nrecorded a real trial's plan and final metrics ({info['seconds']:.1f} s)", flush=True)
    os.environ[RECORD_ENV], os.environ[WORK_ENV] = str(record), str(args.work)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    meter = Meter()
    instrument(meter)
    local_ray.init(num_cpus=args.slots)
    rows: list[dict[str, Any]] = []
    try:
        for size in args.sizes:
            if rows and rows[-1]["wall"] / rows[-1]["size"] * size > args.budget_minutes * 60:
                print(f"{size:,} trials: skipped (projected {rows[-1]['wall'] / rows[-1]['size'] * size / 60:.0f} min "
                      f"from {rows[-1]['size']:,}, over --budget-minutes {args.budget_minutes:g})", flush=True)
                continue
            rows.append(run_size(size, args, folder, meter))
            r = rows[-1]
            print(f"{size:,} trials: {r['wall']:.0f} s wall, driver CPU {r['whole']['cpu']:.3f} s/trial, "
                  f"last tenth (at least 50) before the drain {r['tail']['cpu']:.3f} s/trial; lost in MLflow: {r['lost']}", flush=True)
    finally:
        ray.shutdown()
    head = f"{'trials':>8s} {'wall s/trial':>12s} {'':>6s} {'driver CPU':>10s} " + " ".join(
        f"{c:>10s}" for c in (*COMPONENTS, "rest", "(loop", "threads)"))
    print(f"\n{args.sampler} sampler, {args.slots} trials at a time, {args.work:g} s of work each; driver seconds "
          "per trial (whole launch / its last tenth, at least 50, of trials before the last --slots):")
    print(head)
    for r in rows:
        for part in ("whole", "tail"):
            p = r[part]
            print(f"{r['size']:8,d} {r['wall'] / r['size'] if part == 'whole' else float('nan'):12.3f} {part:>6s} "
                  f"{p['cpu']:10.3f} " + " ".join(f"{p[c]:10.3f}" for c in (*COMPONENTS, "rest", "loop", "threads")))
    if len(rows) > 1:
        ratio = rows[-1]["tail"]["cpu"] / rows[0]["tail"]["cpu"]
        print(f"\nmarginal driver CPU per trial at {rows[-1]['size']:,} over that at {rows[0]['size']:,}: {ratio:.2f} "
              f"(target: at most 1.5, and at most 0.5 s per trial: {rows[-1]['tail']['cpu']:.3f} s)")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000], help="sweep sizes (100 1000 10000)")
    parser.add_argument("--slots", type=int, default=16, help="trials at a time; the local Ray declares as many CPUs")
    parser.add_argument("--work", type=float, default=0.2, help="seconds of work per trial (0.2)")
    parser.add_argument("--sampler", default="auto", help="search.sampler of the driver's sweeps (auto)")
    parser.add_argument("--samplers", default="auto,tpe,nsga2,random,gp", help="the samplers part 1 compares")
    parser.add_argument("--window", type=int, default=20, help="trials timed at each size in part 1 (20)")
    parser.add_argument("--budget-minutes", type=float, default=30, help="skip a size projected past this (30)")
    parser.add_argument("--only", choices=["samplers", "driver"], help="run one part")
    parser.add_argument("--keep", help="folder for the stores (default: a temporary one, removed)")
    args = parser.parse_args()
    print(f"sweep_scale: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    if args.only != "driver":
        sampler_costs(args.samplers.split(","), args.sizes, args.window, args.budget_minutes * 60 / 4)
    if args.only != "samplers":
        driver_costs(args)


if __name__ == "__main__":
    main()
