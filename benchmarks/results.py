"""Reference results: every attack and defense at its packaged preset's default point, over seeds.

Each row is a preset (``sweeps/presets/``) at the default of every search dimension, with a few
``--set`` overrides (the defense, for the defense rows), trained with ``trainers.run_trial`` (no
Ray, no MLflow) once per seed, with the sweep's clean model of the same seed as the baseline. The
table gives, per row, the mean and 95% interval (Student's t over the seeds, shown within [0, 1];
``sweeps.analysis.replicate_stats``) of ``attack_success`` and
``utility``, the clean model's, the paper's own claim and whether it reproduces here by the row's
stated criterion, and the command that reruns the row.

Every finished trial is kept as JSON under ``--cache`` (default ``poisonsweep_results/results``),
so a rerun resumes where it stopped and ``--row NAME`` runs (or re-reads) one row. The page is
written to ``--output`` (default ``docs/results.md``) from the cache, with the command, the date,
the commit and the machine; rows without all their seeds are listed as missing, never guessed.

    .venv/bin/python benchmarks/results.py [--seeds 0,1,2] [--row NAME ...] [--workers 2]
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import multiprocessing as mp
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Row:
    name: str
    preset: str
    overrides: tuple[str, ...]
    claim: str  # the paper's own claim, in a line
    reproduces: Callable[[dict, dict | None], bool]  # (this row's means, the undefended row's) -> verdict
    criterion: str  # the verdict's rule, in words
    undefended: str | None = None  # the row this defense is compared with
    sets: tuple[str, ...] = field(default=())
    needs: str | None = None  # a row away from the defaults: what it changes, for a defense that did not reproduce


def _attack_works(m: dict, _: dict | None) -> bool:
    return m["attack_success"] >= 0.9 and m["clean_attack_success"] <= 0.1


def _defense_holds(m: dict, base: dict | None) -> bool:
    return base is not None and m["attack_success"] <= 0.1 and m["utility"] >= base["utility"] - 0.01


ATTACK_RULE = "attack success >= 0.9 with the clean model's <= 0.1"
DEFENSE_RULE = "attack success <= 0.1 at a utility cost <= 0.01 against the undefended row"
ATTACKS = (  # (row and preset name, the paper's claim)
    ("backdoor", "Carlini & Terzis 2022: a patch backdoor from 0.01% of the pairs (300 of 3M)"),
    ("targeted", "Carlini & Terzis 2022: a few pairs hijack a chosen image's label"),
    ("text-backdoor", "Yang et al. 2023: poisoning the text side hijacks retrieval"),
    ("dual-backdoor", "both modalities at once"),
    ("mm-single-image", "Yang et al. 2023, attack I: one target image retrieved for a class's captions"),
    ("mm-single-label", "Yang et al. 2023, attack II: a class's images retrieved for another class's captions"),
    ("mm-multi-label", "Yang et al. 2023, attack III: two such goals at once"),
)
ROWS = [
    *(Row(name, f"{name}.yaml", (), claim, _attack_works, ATTACK_RULE) for name, claim in ATTACKS),
    *(Row(f"backdoor + {kind}", "backdoor.yaml", (f"defense.kind={kind}",), claim, _defense_holds,
          DEFENSE_RULE, undefended="backdoor")
      for kind, claim in (
          ("clean-finetune", "Yang et al. 2023 / Bansal et al. 2023: clean fine-tuning removes the attack at "
                             "about 1% of utility"),
          ("cleanclip", "Bansal et al. 2023: CleanCLIP removes the backdoor at about 1% of utility"),
          ("similarity-filter", "Yang et al. 2023: dropping the least similar pairs removes the poison"),
          ("outlier-filter", "ours: embedding-space outliers dropped (no paper claim)"),
          ("roclip", "Yang, Gao & Mirzasoleiman 2023: RoCLIP defends at little utility cost"),
          ("safeclip", "Yang et al. 2024: SafeCLIP defends at little utility cost"))),
    # 96 px images: about nine times a 32 px row's training
    Row("backdoor-carlini-scale", "backdoor-carlini-scale.yaml", (), "Carlini & Terzis 2022's patch backdoor at "
        "their patch-to-image scale (16 px on 224 px)", _attack_works, ATTACK_RULE),
    # what the defenses that do not reproduce at their defaults need here
    Row("backdoor + clean-finetune, training lr, 30 epochs", "backdoor.yaml",
        ("defense.kind=clean-finetune", "defense.lr=2e-3", "defense.epochs=30"),
        "Yang et al. 2023 / Bansal et al. 2023: clean fine-tuning removes the attack at about 1% of utility",
        _defense_holds, DEFENSE_RULE, undefended="backdoor",
        needs="the model's own training lr (2e-3, not its 1/50) and three times the authors' 10 epochs"),
    Row("backdoor + cleanclip, training lr", "backdoor.yaml", ("defense.kind=cleanclip", "defense.lr=2e-3"),
        "Bansal et al. 2023: CleanCLIP removes the backdoor at about 1% of utility", _defense_holds, DEFENSE_RULE,
        undefended="backdoor", needs="the model's own training lr (2e-3, not its 1/50), the authors' 10 epochs"),
]
METRICS = ("attack_success", "utility", "clean_attack_success", "clean_utility")


def trial_config(row: Row, seed: int):
    from sweeps.config._schema import load_config

    with resources.as_file(resources.files("sweeps.presets") / row.preset) as path:
        sweep = load_config(path, [*row.overrides, *row.sets])
    config = sweep.resolve()
    return config.model_copy(update={"seed": seed})


def run_one(args: tuple[Row, int, str]) -> tuple[str, int, dict]:
    """One trial of one row and seed, through the shared model cache (clean models are shared)."""
    import torch

    from trainers import run_trial

    row, seed, cache = args
    torch.set_num_threads(1)
    metrics = run_trial(trial_config(row, seed), cache_dir=str(Path(cache) / "models")).metrics
    return row.name, seed, metrics


def _file(cache: Path, row: Row | str, seed: int) -> Path:
    """The cached trial: under the presets as packaged, or under a hash of the ``--set`` overrides."""
    sets = row.sets if isinstance(row, Row) else ()
    tag = "presets" if not sets else "set-" + hashlib.sha1("\n".join(sets).encode()).hexdigest()[:10]
    name = row.name if isinstance(row, Row) else row
    return cache / "trials" / tag / name.replace(" ", "").replace("+", "_") / f"seed-{seed}.json"


def run(rows: list[Row], seeds: list[int], cache: Path, workers: int) -> None:
    todo = [(r, s, str(cache)) for r in rows for s in seeds if not _file(cache, r, s).is_file()]
    by_name = {r.name: r for r in rows}
    print(f"{len(todo)} trials to run ({len(rows) * len(seeds) - len(todo)} cached)", flush=True)
    if not todo:
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        for name, seed, metrics in pool.imap_unordered(run_one, todo):
            path = _file(cache, by_name[name], seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(metrics, indent=1))
            print(f"{name} seed {seed}: attack_success {metrics['attack_success']:.3f} "
                  f"utility {metrics['utility']:.3f}", flush=True)


def table(rows: list[Row], seeds: list[int], cache: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """Each row's line of the page (Markdown) and each finished row's means."""
    import pandas as pd

    from sweeps.analysis._pareto import replicate_stats

    lines, means = {}, {}
    for row in sorted(rows, key=lambda r: r.undefended is not None):  # a defense row after its undefended one
        files = [_file(cache, row, s) for s in seeds]
        if not all(f.is_file() for f in files):
            lines[row.name] = f"| {row.name} | missing: {sum(f.is_file() for f in files)} of {len(seeds)} seeds | | | | |"
            continue
        frame = pd.DataFrame([{"run_id": f"seed-{s}", "row": row.name,
                               **{m: json.loads(f.read_text()).get(m, float("nan")) for m in METRICS}}
                              for s, f in zip(seeds, files)])
        stats = replicate_stats(frame, ["row"], list(METRICS)).iloc[0]
        means[row.name] = {m: stats[m] for m in METRICS}

        def cell(name: str, stats=stats) -> str:  # every metric is a share: its interval shown within [0, 1]
            low, high = max(0.0, stats[f"{name}_low"]), min(1.0, stats[f"{name}_high"])
            return f"{stats[name]:.3f} [{low:.3f}, {high:.3f}]"

        base = means.get(row.undefended) if row.undefended else None
        if row.undefended and base is None:
            verdict = f"n/a: row {row.undefended!r} is missing"
        else:
            verdict = "yes" if row.reproduces(means[row.name], base) else "no"
        command = f"`benchmarks/results.py --row '{row.name}'`"
        name = f"{row.name}: {row.needs}" if row.needs else row.name
        lines[row.name] = (f"| {name} (`{row.preset}`{''.join(f', `{o}`' for o in row.overrides)}) | "
                           f"{cell('attack_success')} ({cell('clean_attack_success')}) | "
                           f"{cell('utility')} ({cell('clean_utility')}) | {row.claim} | {verdict} | {command} |")
    return lines, means


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_page(rows: list[Row], seeds: list[int], cache: Path, output: Path, command: str) -> None:
    lines, _ = table(rows, seeds, cache)
    header = ["| row | attack_success (clean) | utility (clean) | the paper's claim | reproduces here | rerun |",
              "| --- | --- | --- | --- | --- | --- |"]
    machine = f"{platform.machine()}, {mp.cpu_count()} CPU cores, {platform.system()} {platform.release()}"
    page = [
        "# Reference results",
        "",
        "Every attack and defense at its packaged preset's default point, trained with",
        "`trainers.run_trial` once per seed, each trial against the clean model of its own seed. Cells:",
        f"mean [95% interval] over seeds {', '.join(map(str, seeds))} (Student's t, shown within [0, 1]),",
        "the clean model's in brackets. A defense row is judged",
        f"against its undefended row. Attacks: {ATTACK_RULE}. Defenses: {DEFENSE_RULE}.",
        "",
        f"Written by `{command}` from the trials in its cache on {datetime.date.today().isoformat()}, "
        f"commit {_commit()}, {machine}. A missing row has not all its seeds in the cache yet.",
        "",
        *header,
        *(lines[r.name] for r in rows if not r.needs),
        "",
        "## What the defenses that do not reproduce need",
        "",
        "The same attack with the defense's settings changed as each row says, against the same undefended",
        "row: what it takes here for the defense to hold.",
        "",
        *header,
        *(lines[r.name] for r in rows if r.needs),
        "",
        "RoCLIP and SafeCLIP train on the authors' augmented views (SimCLR-style crops, colour jitter,",
        "greyscale and blur of the images; EDA variants of the captions). On these synthetic pairs, whose",
        "captions name colours and positions that such views change, their utility rows above show what",
        "the views cost; the same defenses on a pretrained model fine-tuned on Fashion-MNIST, with and",
        "without RoCLIP's views, are in [results-pretrained.md](results-pretrained.md)",
        "(`benchmarks/pretrained_defenses.py`).",
        "",
    ]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(page))
    print(f"wrote {output}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3 for the page)")
    parser.add_argument("--row", action="append", default=[], help="run only this row (repeatable)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "poisonsweep_results" / "results")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--page-only", action="store_true", help="write the page from the cache, run nothing")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override every row's config (a smaller run; its page says so in the command)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = {r.name for r in ROWS}
    unknown = [r for r in args.row if r not in names]
    if unknown:
        parser.error(f"--row: unknown {unknown}; rows: {', '.join(sorted(names))}")
    rows = [Row(**{**r.__dict__, "sets": tuple(args.sets)}) for r in ROWS]
    chosen = [r for r in rows if not args.row or r.name in args.row]
    needed = {r.undefended for r in chosen if r.undefended} - {r.name for r in chosen}
    chosen += [r for r in rows if r.name in needed]  # a defense row needs its undefended row
    if not args.page_only:
        run(chosen, seeds, args.cache, args.workers)
    write_page(rows, seeds, args.cache, args.output, shlex.join(["benchmarks/results.py", *(argv or sys.argv[1:])]))


if __name__ == "__main__":
    main()
