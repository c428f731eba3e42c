"""Training throughput of a poisonsweep trial against open_clip's own reference training script
(``open_clip_train``), side by side in one run, on the same CSV data, model and batch size.

Data: 6,000 pairs of the built-in synthetic set written out as 32 px JPEG files and a CSV of
path and caption, the layout both programs read. Model: the bundled ``tiny-rn`` (registered in
open_clip for both). Batch 256, fp32 on the CPU, torch's threads as given (default 2), one
loader worker for open_clip_train (its data loader decodes and transforms every image every
epoch in that worker); a poisonsweep trial decodes the files once into its memory-mapped image
cache (before training: not counted), then stamps, normalises and batches in the training
process.

Measured per program over its last epoch (``--epochs``, default 2: the first pays for worker and
allocator start-up): samples/s = the epoch's samples / its training time (open_clip_train: the
sum of its per-step ``Batch (t)``, logged every step; poisonsweep: the epoch's
``epoch_seconds``), and the data pipeline's share of that time (open_clip_train: its
``Data (t)``, the wait for the loader; poisonsweep: ``epoch_data_seconds``, the wait for the
next batch). The poisonsweep trial runs twice per round: with its default
``train.loader_threads: auto`` (on the CPU 0: each batch prepared in the training thread,
between steps) and with 1 (batches prepared ahead in a background thread, the default on a
GPU). The programs alternate ``--rounds`` times (default 2) and the medians are compared.

Run: .venv/bin/python benchmarks/throughput.py [--pairs 6000] [--epochs 2] [--rounds 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from poison import DataSpec, load_dataset

ROOT = Path(__file__).resolve().parents[1]
BATCH = 256

OPEN_CLIP_TRAIN = """
import sys, open_clip
open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
main(sys.argv[2:])
"""

TRIAL = """
import json, sys
from trainers import parse_trial_config, run_trial
raw = json.loads(sys.argv[1])
config = parse_trial_config(raw)
per_epoch = []
result = run_trial(config, cache_dir=sys.argv[2], baseline=False, on_epoch=lambda e: per_epoch.append(e))
print("RESULT " + json.dumps([result.metrics, per_epoch[-1]]))
"""


def write_csv(folder: Path, pairs: int) -> Path:
    """``pairs`` synthetic pairs as JPEG files and a CSV (filepath, title)."""
    data = load_dataset(DataSpec(dataset="synthetic", size=pairs, test_size=256, image_size=32, seed=0))
    train = data.split("train")
    images, captions = train["image"].to_numpy(), train["caption"].to_pylist()
    (folder / "img").mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.csv"
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["filepath", "title"])
        for i, (row, caption) in enumerate(zip(images, captions)):
            name = f"img/{i:06d}.jpg"
            Image.fromarray(np.asarray(data.images[row])).save(folder / name, quality=95)
            out.writerow([str(folder / name), caption])
    return path


def run_open_clip_train(csv_path: Path, logs: Path, epochs: int, threads: int) -> dict[str, float]:
    args = ["--train-data", str(csv_path), "--dataset-type", "csv", "--csv-separator", ",",
            "--csv-img-key", "filepath", "--csv-caption-key", "title", "--model", "tiny-rn",
            "--batch-size", str(BATCH), "--workers", "1", "--epochs", str(epochs), "--lr", "2e-3",
            "--warmup", "10", "--precision", "fp32", "--save-frequency", "0", "--report-to", "",
            "--logs", str(logs), "--name", f"run{len(list(logs.glob('*')))}", "--log-every-n-steps", "1",
            "--seed", "0"]
    env = {"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", OPEN_CLIP_TRAIN, str(ROOT / "trainers" / "model_configs"), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if f"Train Epoch: {epochs - 1} " in line]
    if proc.returncode or not lines:
        raise RuntimeError(f"open_clip_train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    # one line per step (--log-every-n-steps 1): its meters are reset after each line, so each
    # line's times are that step's
    data_t = sum(float(re.search(r"Data \(t\): ([0-9.]+)", line).group(1)) for line in lines)
    batch_t = sum(float(re.search(r"Batch \(t\): ([0-9.]+)", line).group(1)) for line in lines)
    last = float(re.search(r"Batch \(t\): ([0-9.]+)", lines[-1]).group(1))
    return {"samples_per_second": BATCH * len(lines) / batch_t, "data_fraction": data_t / batch_t,
            "last_step_samples_per_second": BATCH / last}


def run_poisonsweep(csv_path: Path, cache: Path, pairs: int, epochs: int, threads: int,
                    loader_threads: int | str) -> dict[str, float]:
    raw = {"seed": 0, "data": {"dataset": "csv", "path": str(csv_path), "size": pairs - 256, "test_size": 256,
                               "image_size": 32},
           "model": {"arch": "tiny-rn"}, "train": {"epochs": epochs, "batch_size": BATCH, "lr": 2e-3,
                                                    "threads": threads, "precision": "fp32",
                                                    "loader_threads": loader_threads}}
    env = {"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", TRIAL, json.dumps(raw), str(cache)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not result:
        raise RuntimeError(f"poisonsweep trial failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    m, last = json.loads(result[0][len("RESULT "):])
    if m.get("clean_cache_hit"):
        raise RuntimeError("the trial found its model in the cache: nothing was trained")
    per_epoch = m["samples_per_second"] * m["train_seconds"] / epochs  # every epoch: the same full batches
    return {"samples_per_second": per_epoch / last["epoch_seconds"],
            "data_fraction": last["epoch_data_seconds"] / last["epoch_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        csv_path = write_csv(folder / "data", args.pairs)
        runs: dict[str, list[dict[str, float]]] = {"open_clip_train": [], "poisonsweep": [],
                                                    "poisonsweep, loader_threads 1": []}
        for r in range(args.rounds):
            runs["open_clip_train"].append(run_open_clip_train(csv_path, folder / "logs", args.epochs, args.threads))
            for name, loader_threads in (("poisonsweep", "auto"), ("poisonsweep, loader_threads 1", 1)):
                # a cache of its own: a trial finding this model in the cache would replay its epochs
                cache = folder / f"cache-{len(runs[name])}-{loader_threads}"
                runs[name].append(run_poisonsweep(csv_path, cache, args.pairs, args.epochs, args.threads,
                                                  loader_threads))
            print(f"round {r + 1}: " + "; ".join(
                f"{k} {v[-1]['samples_per_second']:.0f} samples/s, data {v[-1]['data_fraction']:.1%}"
                for k, v in runs.items()), flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    print(f"\n{args.pairs:,} pairs at 32 px, tiny-rn, batch {BATCH}, fp32, {args.threads} torch threads, "
          f"medians of {args.rounds} rounds:")
    for k, v in med.items():
        print(f"  {k:30s} {v['samples_per_second']:7.0f} samples/s   data pipeline {v['data_fraction']:6.1%} of step time")
    print(f"  (open_clip_train's last step alone: {med['open_clip_train']['last_step_samples_per_second']:.0f} "
          "samples/s; its loader worker has then run out of work and no longer competes for the CPU)")
    ratio = med["poisonsweep"]["samples_per_second"] / med["open_clip_train"]["samples_per_second"]
    print(f"  ratio poisonsweep / open_clip_train: {ratio:.2f}x  (target >= 1.5x; data pipeline < 10%)")


if __name__ == "__main__":
    main()
