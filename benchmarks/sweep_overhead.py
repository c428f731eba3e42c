"""What the sweep machinery costs per trial: poisonsweep's own driver over trials of fixed work.

It runs ``sweeps.launch.run_sweep`` as ``poisonsweep run`` does (Ray Tune's Tuner with
OptunaSearch and a ConcurrencyLimiter, the TrialLogger writing a parent run and one child
run per trial into a SQLite MLflow store, the launch file, per-epoch checkpoints, retries
allowed), with one substitution: each trial's function (``run_sweep(trainable=...)``) does
a fixed amount of work (sleeps ``--work`` seconds, split over its epochs) instead of
training. Everything it reports is a real trial's: before the sweep, one real trial of the
same config is trained in-process, and every fixed-work trial replays its per-epoch reports
(same metric names), writes its loop state (same bytes: weights, AdamW moments, ...) as each
epoch's checkpoint, and ends with its final metrics, poison plan (Parquet) and resolved
config, which the driver logs to MLflow as for a real trial.

Printed side by side, from one run:
- ``ideal``: N x work / slots (slots = ``search.max_concurrent`` trials of one CPU);
- ``bare Tune``: the same trials through a plain Tuner (same trainable, reuse_actors, no
  searcher, callbacks or checkpoints): the floor of Ray Tune itself;
- ``poisonsweep``: ``run_sweep`` from its call to its return (``sweep``), and from the first
  trial's start to the end (``trials``: without Ray's and the clean model's start-up);
each as overhead per trial, (wall - ideal) / N, and as the ratio wall / ideal; and the steady
state once the trial actors run (the trials after the first ``slots``: a trial's life as the
driver saw it plus the wait of its slot, less its work, per slot), with the time between the
driver's events of a warm trial (start, each epoch, done). Then it checks
that nothing was lost from MLflow: the parent run finished, exactly one FINISHED child run
per trial, with every epoch's metrics at steps 1..epochs, every final metric, the tags, the
params and the plan artifact. ``--profile`` adds where the driver's time went (cProfile of
the driver process: the TrialLogger's callbacks, Tune's experiment-state saves, MLflow).

    .venv/bin/python benchmarks/sweep_overhead.py [--trials 32] [--work 0.6] [--epochs 3] [--profile]

Ray runs locally with 2 CPUs (``--cpus``), no dashboard; the store, Tune's storage and the
cache go to a temporary folder (``--keep DIR`` keeps them there).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

RECORD_ENV, WORK_ENV = "SWEEP_OVERHEAD_RECORD", "SWEEP_OVERHEAD_WORK"
EPOCHS_FILE, FINAL_FILE, STATE_DIR = "epochs.json", "final.json", "state"


def sweep_config(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """A demo-like sweep (tiny-rn backdoor; Optuna's TPE over poison_count, trigger size and
    lr) whose real trial trains in seconds."""
    return {
        "name": "overhead", "seed": 0,
        "data": {"dataset": "synthetic", "size": 600, "test_size": 96, "image_size": 32},
        "model": {"arch": "tiny-rn", "pretrained": None},
        "train": {"epochs": args.epochs, "batch_size": 64, "lr": {"low": 1e-4, "high": 3e-3, "log": True,
                                                                  "default": 2e-3}},
        "attack": {"kind": "backdoor", "target": "blue circle",
                   "poison_count": {"low": 10, "high": 120, "log": True, "default": 40},
                   "trigger": {"kind": "patch", "pattern": "checkerboard",
                               "size": {"choices": [3, 4, 6], "default": 4}, "location": "bottom-right"}},
        "defense": {"kind": "none"},
        "search": {"objectives": {"attack_success": "max", "utility": "max", "poison_count": "min"},
                   "sampler": "tpe", "num_samples": args.trials, "max_concurrent": args.slots,
                   "checkpoint_every": args.checkpoint_every},
        "resources": {"cpu": 1, "gpu": 0},
        "storage": {"path": str(folder / "results")},
    }


def record_trial(sweep: Any, folder: Path) -> dict[str, Any]:
    """Trains the sweep's default trial for real (in this process; its clean model lands in the
    sweep's cache) and keeps what it reported: each epoch's metrics, the final metrics, the
    poison plan and the loop state of its last epoch."""
    import pyarrow.parquet as pq

    from sweeps._files import PLAN_FILE
    from trainers import run_trial
    from trainers.resume import write_state

    class Keep:  # a trainers.resume.Checkpointer that keeps the last state in memory
        every, state = 1, None

        def load(self) -> None:
            return None

        def save(self, state: dict[str, Any]) -> None:
            self.state = state

    config = sweep.default_trial
    config = config.model_copy(update={"train": config.train.model_copy(update={"threads": 1})})
    epochs: list[dict[str, Any]] = []
    keep = Keep()
    start = time.perf_counter()
    result = run_trial(config, cache_dir=sweep.storage.cache_dir(), on_epoch=epochs.append, checkpointer=keep)
    seconds = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EPOCHS_FILE).write_text(json.dumps(epochs))
    (folder / FINAL_FILE).write_text(json.dumps(result.metrics))
    pq.write_table(result.plan, folder / PLAN_FILE)
    write_state(folder / STATE_DIR, keep.state)
    size = sum(p.stat().st_size for p in (folder / STATE_DIR).iterdir())
    return {"seconds": seconds, "epoch_metrics": len(epochs[-1]), "final_metrics": len(result.metrics),
            "plan_rows": result.plan.num_rows, "state_mb": size / 2**20}


def fixed_work_trainable(values: dict[str, Any], *, raw: dict[str, Any], dims: dict, cache_dir: str,
                         threads: int, objectives: list[str], every: int = 1, kept: list[str] | None = None,
                         **_: Any) -> None:
    """A trial of ``$SWEEP_OVERHEAD_WORK`` seconds, with :func:`sweeps.launch.trainable`'s
    signature and reports, replaying the recorded real trial (see the module's docstring);
    parameters it has no use for are ignored."""
    import tempfile as _tempfile

    import yaml
    from ray import tune

    from sweeps._files import CONFIG_FILE, METRICS_FILE, PLAN_FILE, epoch_result, final_result
    from sweeps.config._schema import resolve
    from sweeps.launch._trainable import for_worker

    record, work = Path(os.environ[RECORD_ENV]), float(os.environ[WORK_ENV])
    config = for_worker(resolve(raw, dims, values), threads)
    epochs, reports = config.train.epochs, json.loads((record / EPOCHS_FILE).read_text())
    first = 1
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # a retried trial goes on after its last checkpointed epoch
        with checkpoint.as_directory() as folder:
            first = int(json.loads((Path(folder) / "epoch.json").read_text())) + 1
    for epoch in range(first, epochs + 1):
        time.sleep(work / epochs)
        metrics = {**reports[min(epoch, len(reports)) - 1], "epoch": epoch}
        if "poison_count" in metrics:  # epochs report the trial's own count, as its final metrics do
            metrics["poison_count"] = config.attack.poison_count
        if every and (epoch % every == 0 or epoch == epochs):
            with _tempfile.TemporaryDirectory() as folder:  # the real loop state's files, as write_state leaves them
                shutil.copytree(record / STATE_DIR, folder, dirs_exist_ok=True)
                (Path(folder) / "epoch.json").write_text(str(epoch))
                tune.report(epoch_result(metrics, kept), checkpoint=tune.Checkpoint.from_directory(folder))
        else:
            tune.report(epoch_result(metrics, kept))
    final = {**json.loads((record / FINAL_FILE).read_text()), "poison_count": config.attack.poison_count}
    with _tempfile.TemporaryDirectory() as folder:
        shutil.copy(record / PLAN_FILE, Path(folder) / PLAN_FILE)
        (Path(folder) / METRICS_FILE).write_text(json.dumps(final, indent=1))
        (Path(folder) / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        tune.report(final_result(final, kept), checkpoint=tune.Checkpoint.from_directory(folder))


def bare_tune(args: argparse.Namespace, sweep: Any, folder: Path) -> float:
    """Wall time of the same trials through a plain Tuner: no searcher, callbacks or checkpoints."""
    from ray import tune

    def bare(config: dict[str, Any]) -> None:
        for epoch in range(1, args.epochs + 1):
            time.sleep(args.work / args.epochs)
            tune.report({"epoch": epoch})

    tuner = tune.Tuner(
        tune.with_resources(bare, {"cpu": 1}),
        tune_config=tune.TuneConfig(num_samples=args.trials, max_concurrent_trials=args.slots, reuse_actors=True),
        run_config=tune.RunConfig(name="bare", storage_path=str(folder / "bare"), verbose=0),
    )
    start = time.perf_counter()
    tuner.fit()
    return time.perf_counter() - start


def timeline(events: list[tuple[float, int, str]], start: float, end: float, args: argparse.Namespace) -> float:
    """Where the sweep's wall time went, as the driver saw the trials' events; returns the
    steady state's overhead per trial."""
    first = {n: t for t, n, what in reversed(events) if what == "started"}
    done = {n: t for t, n, what in events if what == "done"}
    ends, starts = sorted(done.values()), sorted(first.values())
    gaps = [b - a for a, b in zip(ends, starts[args.slots:])]  # a freed slot until the next trial starts
    cold = [done[n] - first[n] for n in done if n in first and n <= args.slots]
    warm = [done[n] - first[n] for n in done if n in first and n > args.slots]  # actors already started
    gap = sum(gaps) / max(1, len(gaps))
    print(f"poisonsweep: {starts[0] - start:.1f} s before the first trial started, {end - ends[-1]:.1f} s after "
          f"the last ended; the first {args.slots} trials (starting their actors) lasted "
          f"{sum(cold) / max(1, len(cold)):.2f} s, the others {sum(warm) / len(warm):.2f} s (work "
          f"{args.work:g} s); a freed slot waited {gap:.2f} s for the next trial")
    steady = (sum(warm) / len(warm) + gap - args.work) / args.slots
    print(f"steady state (warm actors: a trial's life plus its slot's wait, less its work, over {args.slots} slots): "
          f"{steady:.3f} s overhead per trial, wall/ideal {1 + steady / (args.work / args.slots):.2f}")
    steps: dict[str, list[float]] = {}
    for n in (n for n in done if n > args.slots):
        seen = [(t, what) for t, m, what in events if m == n]
        for (t0, a), (t1, b) in zip(seen, seen[1:]):
            steps.setdefault(f"{a} -> {b}", []).append(t1 - t0)
    print(f"  warm trials, as the driver saw them (each epoch is {args.work / args.epochs:g} s of work): "
          + ", ".join(f"{k} {sum(v) / len(v):.2f} s" for k, v in steps.items()))
    return steady


def check_mlflow(uri: str, outcome: Any, sweep: Any, record: Path, trials: int, epochs: int) -> list[str]:
    """What is missing from MLflow (empty: nothing)."""
    from mlflow.tracking import MlflowClient

    from sweeps.tracking._client import ROLE_TAG

    client, problems = MlflowClient(uri), []
    final_names = set(json.loads((record / FINAL_FILE).read_text()))
    epoch_names = set(json.loads((record / EPOCHS_FILE).read_text())[-1]) - {"epoch"}
    parent = client.get_run(outcome.parent_run_id)
    if parent.info.status != "FINISHED" or not outcome.synced:
        problems.append(f"parent run {parent.info.status}, synced={outcome.synced}")
    children = client.search_runs([outcome.experiment_id], max_results=10000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    by_trial: dict[str, list] = {}
    for child in children:
        by_trial.setdefault(child.data.tags.get("trial_id", "?"), []).append(child)
    if len(by_trial) != trials or any(len(runs) != 1 for runs in by_trial.values()):
        problems.append(f"{len(children)} child runs for {len(by_trial)} trial ids (want {trials}, one each)")
    for trial_id, (child, *_) in by_trial.items():
        run_id, data = child.info.run_id, child.data
        if child.info.status != "FINISHED" or data.tags.get(ROLE_TAG) != "trial":
            problems.append(f"{trial_id}: {child.info.status}")
        missing = final_names - set(data.metrics)
        if missing:
            problems.append(f"{trial_id}: final metrics missing {sorted(missing)[:5]}")
        for name in sorted(epoch_names):
            steps = sorted(m.step for m in client.get_metric_history(run_id, name))
            if steps != list(range(1, epochs + 1)):
                problems.append(f"{trial_id}: {name} at steps {steps}")
                break
        if not {"attack", "trigger", "modality", "defense", "dataset", "model", "seed", "plan_hash"} <= set(data.tags):
            problems.append(f"{trial_id}: tags {sorted(data.tags)}")
        if len(data.params) < 30:
            problems.append(f"{trial_id}: only {len(data.params)} params")
        if "poison_plan.parquet" not in {a.path for a in client.list_artifacts(run_id)}:
            problems.append(f"{trial_id}: no poison_plan.parquet")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=32, help="trials of the sweep (32)")
    parser.add_argument("--work", type=float, default=0.6, help="seconds of work per trial (0.6)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial, each reported and logged (3)")
    parser.add_argument("--slots", type=int, default=2, help="trials at a time, one CPU each (2)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (2)")
    parser.add_argument("--checkpoint-every", type=int, default=1, help="search.checkpoint_every (1)")
    parser.add_argument("--no-bare", action="store_true", help="skip the plain-Tuner reference")
    parser.add_argument("--profile", action="store_true", help="print where the driver's time went")
    parser.add_argument("--keep", help="folder for the stores (default: a temporary one, removed)")
    args = parser.parse_args()

    import logging

    import ray

    from sweeps import _local_ray as local_ray
    from sweeps.config._schema import validate_config
    from sweeps.launch._driver import QUIET_ENV, run_sweep

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    folder = Path(args.keep or tempfile.mkdtemp(prefix="sweep-overhead-")).resolve()
    sweep = validate_config(sweep_config(args, folder))
    record = folder / "record"
    info = record_trial(sweep, record)
    print(f"recorded a real trial ({info['seconds']:.1f} s): {info['epoch_metrics']} metrics per epoch, "
          f"{info['final_metrics']} final, plan of {info['plan_rows']} rows, loop state {info['state_mb']:.1f} MB "
          f"per checkpoint", flush=True)

    os.environ[RECORD_ENV], os.environ[WORK_ENV] = str(record), str(args.work)
    for key, value in QUIET_ENV.items():  # as the driver sets them, before Ray's workers start
        os.environ.setdefault(key, value)
    local_ray.init(num_cpus=args.cpus)
    ideal = args.trials * args.work / args.slots
    rows = []
    try:
        if not args.no_bare:
            rows.append(("bare Tune", bare_tune(args, sweep, folder)))
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        events: list[tuple[float, int, str]] = []  # (time, trial number, started/epoch N/done)

        def printer(line: str) -> None:
            found = re.search(r"trial (\d+)/\d+ (started|done|epoch \d+)", line)
            if found:
                events.append((time.perf_counter(), int(found[1]), found[2]))

        profiler = cProfile.Profile() if args.profile else None
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        outcome = run_sweep(sweep, tracking_uri=uri, printer=printer, trainable=fixed_work_trainable)
        if profiler:
            profiler.disable()
        end = time.perf_counter()
        rows += [("poisonsweep sweep", end - start), ("poisonsweep trials", end - events[0][0])]
    finally:
        ray.shutdown()

    print(f"\n{args.trials} trials of {args.work:g} s ({args.epochs} epochs, checkpoint every "
          f"{args.checkpoint_every}), {args.slots} at a time on {args.cpus} CPUs: ideal {ideal:.1f} s")
    print(f"{'':20s} {'wall s':>8s} {'overhead s/trial':>17s} {'wall/ideal':>11s}")
    for name, wall in rows:
        print(f"{name:20s} {wall:8.1f} {(wall - ideal) / args.trials:17.3f} {wall / ideal:11.2f}")
    steady = timeline(events, start, end, args)
    per_trial = {name: (wall - ideal) / args.trials for name, wall in rows}
    print(f"target: scheduler plus logging at most 0.50 s per trial; steady state {steady:.2f} s, trials phase "
          f"{per_trial['poisonsweep trials']:.2f} s, whole call {per_trial['poisonsweep sweep']:.2f} s (with the "
          f"launch's start-up, spread over {args.trials} trials)")
    problems = check_mlflow(uri, outcome, sweep, record, args.trials, args.epochs)
    finished = sum(r.status == "FINISHED" for r in outcome.rows)
    print(f"\nMLflow: {finished}/{args.trials} trials finished; "
          + ("nothing lost (one FINISHED child run per trial, every epoch's and final metric, tags, "
             "params, plan)" if not problems else f"{len(problems)} problems:\n  " + "\n  ".join(problems[:20])))
    if profiler:
        print("\ndriver profile (cumulative):")
        stats = pstats.Stats(profiler)
        stats.dump_stats(str(folder / "driver.prof"))  # kept with --keep, for pstats' callers/callees
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(
            r"driver.py.*(on_trial|catch_up|_write)|tracking.py|sync.py.*(start|epoch|complete)|"
            r"experiment_state.py|tune_controller.py.*(checkpoint|step)|_flush|log_batch|create_run|log_artifact|"
            r"set_terminated|optuna/.*(suggest|tell|ask)|search/optuna/optuna_search.py")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
