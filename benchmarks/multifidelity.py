"""Early stopping against full fidelity: the hypervolume each arm's front reaches per epoch spent.

One recipe, the packaged demo (``sweeps/presets/demo.yaml``: a patch backdoor on the synthetic
set, searching ``poison_count`` and the trigger's size; objectives attack success, utility,
poison count) on 4,000 pairs (``--size``; the demo's 8,000 would take twice as long) trained for
``--epochs`` (9: rungs at 1, 3 and 9), swept by the real driver
(``sweeps.launch.run_sweep``: Ray Tune, Optuna, MLflow) in arms, each run once per sweep seed
(``search.seed``; the trials' own seed stays 0, so one configuration trains alike in every arm):

- ``tpe``: (a) full fidelity, TPE, ``--configs`` trials to the last epoch;
- ``tpe-moasha``: (b) TPE with ``search.scheduler: moasha`` (``--grace-period`` 2, reduction
  factor 3: rungs at epochs 2 and 6), ranking attack success at a rung by ``--proxy``
  (``search.rung_metrics``; default ``target_similarity``, what the early-signal table below
  supports);
- ``random-moasha``: (c) random search with the same scheduler and proxy;
- ``tpe-moasha-raw``: (b) ranking attack success by itself (no proxy), to show what the proxy buys;
- ``tpe-moasha-margin1``: (b) with rungs at epochs 1 and 3 ranking by ``target_margin``.

The scheduler's arms start trials until they have spent (a)'s epochs (``search.epoch_budget``
= configs x epochs; running trials finish). Every arm and seed keeps its results under ``--out``
(``<arm>-s<seed>.json``, from the launch's MLflow store; Tune's checkpoints are deleted then), so a
rerun skips what is done and an interrupted launch is resumed (``--resume``): the benchmark runs in
parts.

It prints, per arm, the hypervolume of the front of the finished trials' final metrics against
the epochs spent (``--points`` fractions of (a)'s epochs), over the seeds; and the ratio the
issue asks: the epochs (b) needs to reach 95% of (a)'s final hypervolume over (a)'s epochs, per
seed. Hypervolume: every objective mapped to [0, 1] to be minimised (1 - attack success,
1 - utility, poison count's log position in its range) against the one reference point
(1.1, 1.1, 1.1) for every arm and seed (moocore's ``hypervolume``).

Then the early signals: over (a)'s trials (every seed), Spearman's rank correlation between each
epoch's value of a signal and the final attack success (and between each epoch's utility and the
final utility): attack success itself, ``target_margin``, ``target_similarity`` and the training
loss of the poisoned pairs against the clean ones (``train_loss_clean - train_loss_poisoned``).

    .venv/bin/python benchmarks/multifidelity.py [--seeds 0 1 2] [--arms tpe tpe-moasha random-moasha]
        [--epochs 9] [--size 4000] [--configs 24] [--proxy target_similarity] [--grace-period 2] [--out benchmarks/data/multifidelity]
        [--report-only]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")

ARMS = {  # arm -> (sampler, scheduler, the metric ranking attack success at rungs, grace period)
    "tpe": ("tpe", "none", None, None),
    "tpe-moasha": ("tpe", "moasha", "proxy", "grace"),
    "random-moasha": ("random", "moasha", "proxy", "grace"),
    "tpe-moasha-raw": ("tpe", "moasha", None, "grace"),
    "tpe-moasha-margin1": ("tpe", "moasha", "target_margin", 1),
}
OBJECTIVES = ("attack_success", "utility", "poison_count")
SIGNALS = ("attack_success", "target_margin", "target_similarity", "loss_gap")
EPOCH_METRICS = ("attack_success", "utility", "target_margin", "target_similarity",
                 "train_loss_poisoned", "train_loss_clean")
REFERENCE = (1.1, 1.1, 1.1)


def overrides(arm: str, seed: int, args: argparse.Namespace, folder: Path) -> list[str]:
    sampler, scheduler, proxy, grace = ARMS[arm]
    proxy = args.proxy if proxy == "proxy" else proxy
    grace = args.grace_period if grace == "grace" else grace
    budget = args.configs * args.epochs
    out = [f"name=mf-{arm}-s{seed}", f"data.size={args.size}", f"train.epochs={args.epochs}", *args.set, f"search.seed={seed}",
           f"search.sampler={sampler}", f"search.scheduler={scheduler}", "search.max_concurrent=2",
           f"storage.path={folder}", f"storage.cache={args.out / 'cache'}"]
    if scheduler == "none":
        out.append(f"search.num_samples={args.configs}")
    else:  # trials until (a)'s epochs are spent; num_samples only a cap
        out += [f"search.grace_period={grace}", "search.reduction_factor=3", f"search.num_samples={budget}",
                f"search.epoch_budget={budget}"]
        if proxy:
            out.append(f"search.rung_metrics={{attack_success: {proxy}}}")
    return out


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from sweeps.config import load_config
    from sweeps.launch._driver import run_sweep

    folder = (args.out / f"{arm}-s{seed}").resolve()
    sweep = load_config(ROOT / "sweeps/presets/demo.yaml", overrides(arm, seed, args, folder))
    resume = folder.is_dir() and any(folder.glob("mf-*/launch.json"))
    start = time.perf_counter()
    outcome = run_sweep(sweep, tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", resume=resume,
                        printer=lambda line: print(f"  [{arm} s{seed}] {line}", flush=True))
    result = {"arm": arm, "seed": seed, "wall_s": time.perf_counter() - start, "resumed": resume,
              "low_high": [sweep.dimensions["attack.poison_count"].low, sweep.dimensions["attack.poison_count"].high],
              "trials": read_trials(outcome.tracking_uri, outcome.experiment_id, outcome.parent_run_id)}
    return result


def read_trials(uri: str, experiment_id: str, parent: str) -> list[dict[str, Any]]:
    """Every trial run of the launch: its status, final metrics (finished ones), where the
    scheduler stopped it, and each epoch's metrics with the time MLflow recorded them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([experiment_id], max_results=5000,
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    trials = []
    for run in runs:
        epochs: dict[int, dict[str, float]] = {}
        for name in EPOCH_METRICS:
            for m in client.get_metric_history(run.info.run_id, name):
                row = epochs.setdefault(m.step, {"epoch": m.step, "t": m.timestamp / 1000})
                row.setdefault(name, m.value)  # the epoch's value (a finished run's final one comes later)
                row["t"] = min(row["t"], m.timestamp / 1000)
        trials.append({"number": int(run.data.tags.get("trial_number", -1)), "status": run.info.status,
                       "stopped_at": run.data.tags.get("stopped_at_epoch"),
                       "final": {k: run.data.metrics.get(k) for k in OBJECTIVES} if run.info.status == "FINISHED" else None,
                       "epochs": [epochs[k] for k in sorted(epochs)]})
    return sorted(trials, key=lambda t: t["number"])


# ------------------------------------------------------------------------------- the analysis

def point(final: dict[str, float], low: float, high: float) -> tuple[float, float, float]:
    """A trial's final objectives as minimised coordinates in [0, 1] (see the module)."""
    count = min(max(final["poison_count"], low), high)
    return (1 - final["attack_success"], 1 - final["utility"], math.log(count / low) / math.log(high / low))


def hypervolume(points: list[tuple[float, float, float]]) -> float:
    import moocore
    import numpy as np

    return float(moocore.hypervolume(np.array(points), ref=np.array(REFERENCE))) if points else 0.0


def curve(result: dict[str, Any]) -> list[tuple[int, float]]:
    """(epochs spent, hypervolume of the finished trials' front) after each trial that finished,
    in the order MLflow recorded their last epochs; epochs spent counts every trial's epochs
    (stopped ones too) recorded by then."""
    low, high = result["low_high"]
    times = sorted(e["t"] for t in result["trials"] for e in t["epochs"])
    done = sorted((t["epochs"][-1]["t"], point(t["final"], low, high)) for t in result["trials"]
                  if t["final"] is not None and t["final"]["attack_success"] is not None and t["epochs"])
    out, points = [], []
    for when, p in done:
        points.append(p)
        out.append((sum(1 for s in times if s <= when), hypervolume(points)))
    return out


def at(points: list[tuple[int, float]], epochs: float) -> float:
    """The hypervolume reached within ``epochs`` (0 before the first finished trial)."""
    return max([hv for spent, hv in points if spent <= epochs], default=0.0)


def first_reaching(points: list[tuple[int, float]], target: float) -> int | None:
    return next((spent for spent, hv in points if hv >= target), None)


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return math.nan
    rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
    return float(rho)


def partial_spearman(x: list[float | None], y: list[float], z: list[float]) -> float:
    """Spearman's correlation of ``x`` and ``y`` with ``z`` partialled out: the Pearson correlation
    of their ranks' residuals after a least-squares line on ``z``'s rank."""
    import numpy as np
    from scipy.stats import rankdata

    keep = [i for i, v in enumerate(x) if v is not None and math.isfinite(v)]
    if len(keep) < 4:
        return math.nan
    rx, ry, rz = (rankdata(np.array([seq[i] for i in keep], float)) for seq in (x, y, z))
    residual = [r - np.polyval(np.polyfit(rz, r, 1), rz) for r in (rx, ry)]
    if not all(np.std(r) > 0 for r in residual):
        return math.nan
    return float(np.corrcoef(*residual)[0, 1])


def signal(row: dict[str, float], name: str) -> float | None:
    if name == "loss_gap":
        clean, poisoned = row.get("train_loss_clean"), row.get("train_loss_poisoned")
        return None if clean is None or poisoned is None else clean - poisoned
    return row.get(name)


def report(results: dict[tuple[str, int], dict[str, Any]], args: argparse.Namespace) -> None:
    seeds = sorted({s for _, s in results})
    arms = [a for a in ARMS if any((a, s) in results for s in seeds)]
    full = args.configs * args.epochs
    curves = {k: curve(r) for k, r in results.items()}
    print(f"\nHypervolume of the finished trials' front against the epochs spent ((a) = tpe: {args.configs} "
          f"configurations x {args.epochs} epochs = {full} epochs per seed) at fractions of those epochs; "
          f"per arm, the mean over its seeds:")
    print(f"{'arm':20s} {'seeds':>6s} {'trials':>7s} {'stopped':>8s}" + "".join(f"{f'@{p:g}':>9s}" for p in args.points))
    for arm in arms:
        here = [k for k in curves if k[0] == arm]
        trials = sum(len(results[k]["trials"]) for k in here) / len(here)
        stopped = sum(sum(1 for t in results[k]["trials"] if t["stopped_at"]) for k in here) / len(here)
        cells = [sum(at(curves[k], p * full) for k in here) / len(here) for p in args.points]
        print(f"{arm:20s} {len(here):6d} {trials:7.1f} {stopped:8.1f}" + "".join(f"{c:9.4f}" for c in cells))
    print("\nFinished trials per seed, those ending with attack success >= 0.5, and the least poison among them:")
    for arm in arms:
        cells = []
        for s in seeds:
            if (arm, s) not in results:
                continue
            done = [t["final"] for t in results[(arm, s)]["trials"] if t["final"] is not None]
            hits = [f["poison_count"] for f in done if f["attack_success"] is not None and f["attack_success"] >= 0.5]
            cells.append(f"seed {s}: {len(done)} finished, {len(hits)} >= 0.5" + (f" (least {min(hits):.0f})" if hits else ""))
        print(f"{arm:20s} " + "; ".join(cells))
    print(f"\nEpochs to reach 95% of (a)'s final hypervolume, over (a)'s epochs ({full}), per seed:")
    print(f"{'arm':20s}" + "".join(f"{f'seed {s}':>14s}" for s in seeds) + f"{'mean':>8s}")
    for arm in arms:
        cells, ratios = [], []
        for s in seeds:
            if (arm, s) not in results or ("tpe", s) not in results:
                cells.append(f"{'-':>14s}")
                continue
            target = 0.95 * at(curves[("tpe", s)], math.inf)
            spent = first_reaching(curves[(arm, s)], target)
            if spent is None:
                cells.append(f"{'not reached':>14s}")
                ratios.append(math.inf)
            else:
                ratios.append(spent / full)
                cells.append(f"{spent / full:14.3f}")
        mean = sum(ratios) / len(ratios) if ratios else math.nan
        print(f"{arm:20s}" + "".join(cells) + f"{mean:8.3f}")
    early = [t for (a, _), r in results.items() if a == "tpe" for t in r["trials"]
             if t["final"] is not None and len(t["epochs"]) == args.epochs]
    if not early:
        return
    print(f"\nEarly signals over (a)'s {len(early)} trials: Spearman's rank correlation of each epoch's value "
          "with the final attack success (utility: with the final utility)")
    print(f"{'signal':20s}" + "".join(f"{f'ep {e}':>7s}" for e in range(1, args.epochs + 1)))
    final_asr = [t["final"]["attack_success"] for t in early]
    for name in SIGNALS:
        rhos = [spearman([signal(t["epochs"][e], name) for t in early], final_asr) for e in range(args.epochs)]
        print(f"{name:20s}" + "".join(f"{r:7.2f}" for r in rhos))
    counts = [t["final"]["poison_count"] for t in early]
    print(f"The same with the poison budget partialled out (the correlation of the ranks' residuals after a "
          f"line on poison_count's rank; poison_count alone: {spearman(counts, final_asr):.2f}):")
    for name in SIGNALS:
        rhos = [partial_spearman([signal(t["epochs"][e], name) for t in early], final_asr, counts)
                for e in range(args.epochs)]
        print(f"{name:20s}" + "".join(f"{r:7.2f}" for r in rhos))
    final_utility = [t["final"]["utility"] for t in early]
    rhos = [spearman([t["epochs"][e].get("utility") for t in early], final_utility) for e in range(args.epochs)]
    print(f"{'utility':20s}" + "".join(f"{r:7.2f}" for r in rhos))
    backdoored = sum(1 for a in final_asr if a >= 0.5)
    print(f"({backdoored} of {len(early)} trials end with attack success >= 0.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=["tpe", "tpe-moasha", "random-moasha"])
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--size", type=int, default=4000, help="the synthetic set's pairs")
    parser.add_argument("--configs", type=int, default=24)
    parser.add_argument("--proxy", default="target_similarity", help="the metric that ranks attack success at a rung")
    parser.add_argument("--grace-period", type=int, default=2, help="the scheduler's first rung (epochs)")
    parser.add_argument("--points", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.6, 1.0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "data" / "multifidelity",
                        help="each arm and seed's results (<arm>-s<seed>.json, kept in the repository) and its "
                             "launch's folder (not kept)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every arm (a smaller recipe to try the benchmark out)")
    parser.add_argument("--report-only", action="store_true", help="print the tables from what --out holds")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    print(f"benchmarks/multifidelity.py, {datetime.date.today()}, commit {commit}, {platform.node()} "
          f"({os.cpu_count()} CPUs); results in {args.out}", flush=True)
    results: dict[tuple[str, int], dict[str, Any]] = {}
    started = False
    for arm in ARMS:  # every arm's results there are; runs the asked arms' missing ones
        for seed in args.seeds:
            path = args.out / f"{arm}-s{seed}.json"
            if path.is_file():
                results[(arm, seed)] = json.loads(path.read_text())
                continue
            if args.report_only or arm not in args.arms:
                continue
            if not started:
                from sweeps import _local_ray as local_ray
                from sweeps.launch._driver import QUIET_ENV

                for key, value in QUIET_ENV.items():
                    os.environ.setdefault(key, value)
                local_ray.init(num_cpus=2)
                started = True
            print(f"{arm}, sweep seed {seed}:", flush=True)
            result = run_arm(arm, seed, args)
            path.write_text(json.dumps(result))
            results[(arm, seed)] = result
            for launch in (args.out / f"{arm}-s{seed}").glob("mf-*"):  # Tune's checkpoints: gigabytes, read
                shutil.rmtree(launch, ignore_errors=True)                # no more (MLflow's store is kept)
            print(f"{arm}, sweep seed {seed}: {len(result['trials'])} trials in {result['wall_s'] / 60:.1f} min", flush=True)
    report(results, args)


if __name__ == "__main__":
    main()
