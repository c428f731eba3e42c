"""The defenses where their papers put them, over seeds: the table in the docstring of
``tests/test_defenses_pretrained_e2e.py``, regenerated.

A clean tiny-rn pretrained on 4,000 trusted Fashion-MNIST pairs (seed 0, as the test) is
fine-tuned on 2,000 pairs plus a patch backdoor, once per seed and sweep point of the test's
``SWEEP`` (the undefended attack at 150 and at 60 pairs, both filters, SafeCLIP, RoCLIP), with
``trainers.run_trial`` (no Ray, no MLflow; the same trial function the sweep's workers call).
Prints one Markdown row per point: attack success / utility at each seed, and the detectors'
AUROC where the defense scores pairs.

    .venv/bin/python benchmarks/pretrained_defenses.py [--seeds 0,1,2] [--workers 2] [--cache DIR]

Needs Debian's ``dataset-fashion-mnist``.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, the sweep point: poison_count, epochs, defense kind)
POINTS = (("undefended (150 pairs, 2 epochs)", 150, 2, "none"),
          ("similarity-filter (fraction 0.1)", 150, 2, "similarity-filter"),
          ("outlier-filter (k-distance, 0.1)", 150, 2, "outlier-filter"),
          ("safeclip (the authors' splits from epoch 1)", 150, 2, "safeclip"),
          ("undefended (60 pairs, 4 epochs)", 60, 4, "none"),
          ("roclip (the authors' schedule, pool 512, period 2)", 60, 4, "roclip"))


def pretrained(cache: Path) -> str:
    """The test's pretrained model (trained once, cached), as a checkpoint path."""
    from tests.test_defenses_pretrained_e2e import PRETRAINING
    from trainers import parse_trial_config
    from trainers.trial import reference_model

    reference_model(parse_trial_config(PRETRAINING), 4000, cache_dir=str(cache / "pretraining"))
    (checkpoint,) = (cache / "pretraining" / "reference").glob("*/model.pt")
    return str(checkpoint)


def trial(args: tuple[str, int, int, str, int, str, str]) -> tuple[str, int, dict]:
    import torch

    from tests.test_defenses_pretrained_e2e import SWEEP
    from trainers import parse_trial_config, run_trial

    label, count, epochs, kind, seed, checkpoint, cache = args
    torch.set_num_threads(1)
    defense = {k: v for k, v in SWEEP["defense"].items() if k != "kind"}
    fields = {"similarity-filter": ("fraction",), "outlier-filter": ("fraction",),
              "safeclip": ("inmodal_epochs", "clip_epochs"), "roclip": ("pool_size",)}.get(kind, ())
    config = parse_trial_config({
        "seed": seed, "data": SWEEP["data"], "model": {"arch": "tiny-rn", "pretrained": checkpoint},
        "train": {**SWEEP["train"], "epochs": epochs},
        "attack": {**SWEEP["attack"], "poison_count": count},
        "defense": {"kind": kind, **{f: defense[f] for f in fields}}})
    return label, seed, run_trial(config, cache_dir=cache).metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "poisonsweep_results" / "pretrained-defenses")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    checkpoint = pretrained(args.cache)
    jobs = [(label, count, epochs, kind, seed, checkpoint, str(args.cache / "models"))
            for label, count, epochs, kind in POINTS for seed in seeds]
    results: dict[tuple[str, int], dict] = {}
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for label, seed, metrics in pool.imap_unordered(trial, jobs):
            results[label, seed] = metrics
            print(f"{label} seed {seed}: {metrics['attack_success']:.3f} / {metrics['utility']:.3f}", flush=True)
    print(f"\n| defense | {' | '.join(f'seed {s}' for s in seeds)} |\n| --- |{' --- |' * len(seeds)}")
    for label, *_ in POINTS:
        cells = []
        for s in seeds:
            m = results[label, s]
            auroc = f", AUROC {m['filter_auroc']:.3f}" if "filter_auroc" in m else ""
            cells.append(f"{m['attack_success']:.3f} / {m['utility']:.3f}{auroc}")
        print(f"| {label} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
