"""The defenses where their papers put them, over seeds: the table in the docstring of
``tests/e2e/test_defenses_pretrained_e2e.py``, regenerated.

A clean tiny-rn pretrained on 4,000 trusted Fashion-MNIST pairs (seed 0, as the test) is
fine-tuned on 2,000 pairs plus a patch backdoor, once per seed and sweep point of the test's
``SWEEP`` (the undefended attack at 150 and at 60 pairs, both filters, SafeCLIP, RoCLIP), with
``trainers.run_trial`` (no Ray, no MLflow; the same trial function the sweep's workers call).
Writes one Markdown row per point to ``--output`` (default ``docs/results-pretrained.md``), with the
command, date, commit and machine: attack success / utility at each seed, and the detectors' AUROC
where the defense scores pairs. Every finished trial is kept as JSON under ``--cache``, so a rerun
resumes.

    .venv/bin/python benchmarks/pretrained_defenses.py [--seeds 0,1,2] [--workers 2] [--cache DIR]

Needs Debian's ``dataset-fashion-mnist``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, the sweep point: poison_count, epochs, defense kind, fields beside the sweep's)
POINTS = (("undefended (150 pairs, 2 epochs)", 150, 2, "none", {}),
          ("similarity-filter (fraction 0.1)", 150, 2, "similarity-filter", {}),
          ("outlier-filter (k-distance, 0.1)", 150, 2, "outlier-filter", {}),
          ("safeclip (the authors' views; splits from epoch 1)", 150, 2, "safeclip", {}),
          ("undefended (60 pairs, 4 epochs)", 60, 4, "none", {}),
          ("roclip (pool 512, period 2, the authors' views)", 60, 4, "roclip", {"augment": True}),
          ("roclip (pool 512, period 2, no views)", 60, 4, "roclip", {"augment": False}))


def pretrained(cache: Path) -> tuple[str, float]:
    """The test's pretrained model (trained once, cached): its checkpoint path and zero-shot top-1."""
    from tests.test_defenses_pretrained_e2e import PRETRAINING

    from trainers import parse_trial_config
    from trainers.trial import reference_model

    model = reference_model(parse_trial_config(PRETRAINING), 4000, cache_dir=str(cache / "pretraining"))
    (checkpoint,) = (cache / "pretraining" / "reference").glob("*/model.pt")
    return str(checkpoint), model.metrics["utility"]


def trial(args: tuple[str, int, int, str, dict, int, str, str]) -> tuple[str, int, dict]:
    import torch
    from tests.test_defenses_pretrained_e2e import SWEEP

    from trainers import parse_trial_config, run_trial

    label, count, epochs, kind, extra, seed, checkpoint, cache = args
    torch.set_num_threads(1)
    defense = {k: v for k, v in SWEEP["defense"].items() if k != "kind"}
    fields = {"similarity-filter": ("fraction",), "outlier-filter": ("fraction",),
              "safeclip": ("inmodal_epochs", "clip_epochs"), "roclip": ("pool_size", "augment")}.get(kind, ())
    config = parse_trial_config({
        "seed": seed, "data": SWEEP["data"], "model": {"arch": "tiny-rn", "pretrained": checkpoint},
        "train": {**SWEEP["train"], "epochs": epochs},
        "attack": {**SWEEP["attack"], "poison_count": count},
        "defense": {"kind": kind, **{f: defense[f] for f in fields if f in defense}, **extra}})
    return label, seed, run_trial(config, cache_dir=cache).metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "poisonsweep_results" / "pretrained-defenses")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results-pretrained.md")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    checkpoint, top1 = pretrained(args.cache)

    number = {label: i for i, (label, *_) in enumerate(POINTS)}

    def saved(label: str, seed: int) -> Path:
        return args.cache / "trials" / f"{number[label]}-seed-{seed}.json"

    jobs = [(label, count, epochs, kind, extra, seed, checkpoint, str(args.cache / "models"))
            for label, count, epochs, kind, extra in POINTS for seed in seeds if not saved(label, seed).is_file()]
    print(f"{len(jobs)} trials to run", flush=True)
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for label, seed, metrics in pool.imap_unordered(trial, jobs):
            saved(label, seed).parent.mkdir(parents=True, exist_ok=True)
            saved(label, seed).write_text(json.dumps(metrics, indent=1))
            print(f"{label} seed {seed}: {metrics['attack_success']:.3f} / {metrics['utility']:.3f}", flush=True)
    lines = [f"| defense | {' | '.join(f'seed {s}' for s in seeds)} |", f"| --- |{' --- |' * len(seeds)}"]
    for label, *_ in POINTS:
        cells = []
        for s in seeds:
            m = json.loads(saved(label, s).read_text())
            auroc = f", AUROC {m['filter_auroc']:.3f}" if "filter_auroc" in m else ""
            cells.append(f"{m['attack_success']:.3f} / {m['utility']:.3f}{auroc}")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    from results import _commit  # benchmarks/results.py

    machine = f"{platform.machine()}, {mp.cpu_count()} CPU cores, {platform.system()} {platform.release()}"
    command = shlex.join(["benchmarks/pretrained_defenses.py", *sys.argv[1:]])
    args.output.write_text("\n".join([
        "# Defenses on a pretrained model",
        "",
        "The threat model of Yang et al. 2023: a clean pretrained CLIP (tiny-rn, 6 epochs on 4,000",
        f"trusted Fashion-MNIST pairs, zero-shot top-1 {top1:.3f}) fine-tuned on a poisoned scrape (2,000 pairs",
        "plus a 6 px checkerboard backdoor, target `bag`; 150 pairs over 2 epochs, or 60 over 4 for",
        "RoCLIP) at lr 1e-3, each defense at the settings of `tests/e2e/test_defenses_pretrained_e2e.py`.",
        "Cells: attack success / zero-shot top-1 at each seed, and the AUROC of a defense's scores",
        "of the poisoned pairs against the plan.",
        "",
        f"Written by `{command}` on {datetime.date.today().isoformat()}, commit {_commit()}, {machine}.",
        "",
        *lines,
        "",
    ]))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
