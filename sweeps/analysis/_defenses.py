"""Defense trade-offs of a sweep, read back from MLflow (``poisonsweep defenses``).

One row per attack configuration × defense configuration, replicate seeds averaged (mean and
the half-width of a 95% Student-t interval). An *attack configuration* is every param of a trial
but ``seed``, ``name``, the ``search.*`` copies of drawn values and the ``defense.*`` fields, so
trials differing in, say, ``attack.poison_count`` stay in separate rows (attack success depends
on it too much to average over it); a *defense configuration* is the ``defense.*`` fields.

Attack success and utility *without* the defense come from the trial's own ``predefense_*``
metrics when it has them (a post-training defense: the very model before the defense, seed for
seed), else from the ``defense=none`` trials of the same attack configuration. Compute cost is
``train_seconds + defense_seconds``, and its ratio to the undefended training (the same
baseline's ``train_seconds``). ``pareto`` marks the defenses (``none`` included) that no other
defense of the same attack configuration beats on (attack_success min, utility max).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from poison import ConfigError
from sweeps.analysis._pareto import (
    config_key,
    format_rows,
    latest_sweep_run,
    load_trials,
    log_analysis,
    mean_ci,
    nondominated,
    pyplot,
    replicate_stats,
)

METRICS = ("attack_success", "utility", "utility_drop", "train_seconds", "defense_seconds", "cost_seconds",
           "predefense_attack_success", "predefense_utility", "filter_removed", "filter_poison_recall",
           "filter_precision")
REQUIRED = ("attack_success", "utility")
KEYS = ["attack", "attack_config", "defense", "defense_config"]
NOT_ATTACK = ("seed", "name")  # with search.* and defense.*: what an attack configuration is not
UNDEFENDED = "none"


def defense_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The defenses of every attack configuration, from ``load_trials``' rows (one per trial run).

    Example:
        >>> runs = pd.DataFrame({"run_id": ["a", "b"], "params.attack.kind": ["backdoor"] * 2,
        ...     "params.defense.kind": ["none", "similarity-filter"], "metrics.attack_success": [0.9, 0.1],
        ...     "metrics.utility": [0.8, 0.79], "metrics.train_seconds": [10.0, 9.0],
        ...     "metrics.defense_seconds": [float("nan"), 3.0]})
        >>> defense_table(runs)[["defense", "attack_success_without", "cost_ratio", "pareto"]].values.tolist()
        [['none', 0.9, 1.0, True], ['similarity-filter', 0.9, 1.2, True]]
    """
    trials = _trials(runs)
    rows = replicate_stats(trials, KEYS, list(METRICS))
    rows = _with_baselines(rows)
    rows["pareto"] = _front(rows)
    labels = trials.groupby(KEYS, sort=False)[["attack_params", "defense_params"]].first().reset_index()
    rows = rows.merge(labels, on=KEYS, how="left")
    order = rows.assign(_undefended=rows["defense"] != UNDEFENDED)
    order = order.sort_values(["attack", "attack_params", "_undefended", "defense", "defense_params"])
    return rows.loc[order.index].reset_index(drop=True)


def _trials(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per usable trial: its keys, readable labels of them and its metrics (NaN if absent)."""
    if runs.empty:
        raise ConfigError("--experiment: no finished trial runs to compare")
    missing = [m for m in REQUIRED if f"metrics.{m}" not in runs.columns]
    if missing:
        raise ConfigError(f"--experiment: no finished trial reports {', '.join(missing)}")
    runs = runs.dropna(subset=[f"metrics.{m}" for m in REQUIRED])
    if runs.empty:
        raise ConfigError(f"--experiment: no finished trial reports both {' and '.join(REQUIRED)}")
    params = sorted(c for c in runs.columns if c.startswith("params."))
    attack_params = [c for c in params if not _is_defense(c) and not c.startswith("params.search.")
                     and c.removeprefix("params.") not in NOT_ATTACK]
    defense_params = [c for c in params if _is_defense(c)]
    frame = pd.DataFrame({"run_id": runs["run_id"],
                          "attack": _kind(runs, "attack", UNDEFENDED), "defense": _kind(runs, "defense", UNDEFENDED),
                          "attack_config": config_key(runs, attack_params),
                          "defense_config": config_key(runs, defense_params)})
    for name in METRICS:
        column = f"metrics.{name}"
        frame[name] = runs[column].astype(float) if column in runs.columns else np.nan
    frame["cost_seconds"] = frame["train_seconds"] + frame["defense_seconds"].fillna(0.0)
    frame["attack_params"] = _labels(runs, frame["attack"], attack_params, "params.attack.")
    frame["defense_params"] = _labels(runs, frame["defense"], defense_params, "params.defense.")
    return frame


def _is_defense(column: str) -> bool:
    return column.startswith("params.defense.")


def _kind(runs: pd.DataFrame, name: str, default: str) -> pd.Series:
    """The ``attack``/``defense`` tag, else the ``<name>.kind`` param."""
    for column in (f"tags.{name}", f"params.{name}.kind"):
        if column in runs.columns:
            return runs[column].fillna(default).astype(str)
    return pd.Series(default, index=runs.index)


def _labels(runs: pd.DataFrame, kinds: pd.Series, params: list[str], prefix: str) -> pd.Series:
    """``poison_count=250 trigger.size=4``: the params that vary among the trials of one kind."""
    values = runs[params].fillna("").astype(str) if params else pd.DataFrame(index=runs.index)
    out = pd.Series("", index=runs.index)
    for _, index in kinds.groupby(kinds).groups.items():
        part = values.loc[index]
        varying = [c for c in part.columns if part[c].nunique() > 1 and not c.endswith(".kind")]
        out.loc[index] = part[varying].apply(
            lambda r: " ".join(f"{c.removeprefix(prefix).removeprefix('params.')}={v}"
                               for c, v in r.items() if v != ""), axis=1) if varying else ""
    return out


def _with_baselines(rows: pd.DataFrame) -> pd.DataFrame:
    """Adds ``attack_success_without``, ``utility_without`` (with ``_ci95``), ``baseline``
    (``predefense`` or ``none``), ``attack_success_removed`` and ``cost_ratio``."""
    undefended = rows[rows["defense"] == UNDEFENDED]
    undefended = undefended.groupby(["attack", "attack_config"], sort=False).first()  # one none config each
    out, lost = [], []
    for _, row in rows.iterrows():
        own = row["defense"] != UNDEFENDED and not math.isnan(row["predefense_attack_success"])
        key = (row["attack"], row["attack_config"])
        if not own and key not in undefended.index:
            lost.append(row)
            continue
        base = row if own else undefended.loc[key]
        prefix = "predefense_" if own else ""
        out.append({"baseline": "predefense" if own else UNDEFENDED,
                    "attack_success_without": base[f"{prefix}attack_success"],
                    "attack_success_without_ci95": base[f"{prefix}attack_success_ci95"],
                    "utility_without": base[f"{prefix}utility"],
                    "utility_without_ci95": base[f"{prefix}utility_ci95"],
                    "baseline_train_seconds": base["train_seconds"]})
    if lost:
        raise ConfigError(_no_baseline(lost))
    extra = pd.DataFrame(out, index=rows.index)
    rows = pd.concat([rows, extra], axis=1)
    rows["attack_success_removed"] = rows["attack_success_without"] - rows["attack_success"]
    rows["cost_ratio"] = rows["cost_seconds"] / rows["baseline_train_seconds"]
    return rows


def _no_baseline(lost: list[pd.Series]) -> str:
    row = lost[0]
    defenses = sorted({r["defense"] for r in lost if r["attack"] == row["attack"]})
    return (f"no defense=none baseline for attack {row['attack']!r} (one configuration of it has trials of "
            f"{', '.join(defenses)} only, without predefense_attack_success): run defense.kind=none "
            f"with the same attack config")


def _front(rows: pd.DataFrame) -> pd.Series:
    """Per attack configuration: the defenses not dominated on (attack_success min, utility max)."""
    flags = pd.Series(False, index=rows.index)
    for _, index in rows.groupby(["attack", "attack_config"], sort=False).groups.items():
        values = rows.loc[index, ["attack_success", "utility"]].to_numpy(dtype=float)
        flags.loc[index] = nondominated(values, ["min", "max"])
    return flags


def format_table(table: pd.DataFrame) -> str:
    """The table as printed: mean ± 95% interval over seeds."""
    head = ["attack", "config", "defense", "defense config", "seeds", "attack_success w/o", "attack_success",
            "utility w/o", "utility", "utility_drop", "cost s", "× undefended", "front"]
    body = [[r["attack"], r["attack_params"] or "-", r["defense"], r["defense_params"] or "-",
             str(int(r["replicates"])),
             _cell(r, "attack_success_without") + (" (pre)" if r["baseline"] == "predefense" else ""),
             _cell(r, "attack_success"), _cell(r, "utility_without"), _cell(r, "utility"),
             _cell(r, "utility_drop"), _cell(r, "cost_seconds"), _ratio(r["cost_ratio"]),
             "yes" if r["pareto"] else ""] for _, r in table.iterrows()]
    note = ("w/o: without the defense, from the defense=none trials of the same attack config, or (pre) from the\n"
            "same trials' model before their post-training defense. front: not dominated on (attack_success min,\n"
            "utility max) among the defenses of that attack config. Mean ± 95% t-interval over seeds.")
    return format_rows(head, body) + "\n" + note


def _cell(row: pd.Series, name: str) -> str:
    mean = row[name]
    return mean_ci(0.0 if abs(mean) < 1e-12 else mean, row[f"{name}_ci95"])  # no -3.7e-17 for a zero


def _ratio(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3g}×"


def record(client: MlflowClient, parent: str, table: pd.DataFrame) -> None:
    """Logs ``analysis/defenses.csv`` and ``analysis/defenses.png`` to the run ``parent``."""
    def write(folder: Path) -> list[Path]:
        csv = folder / "defenses.csv"
        table.drop(columns=["attack_config", "defense_config"]).to_csv(csv, index=False)
        return [csv, _plot(table, folder / "defenses.png")]

    log_analysis(client, parent, write)


def _plot(table: pd.DataFrame, path: Path) -> Path:
    """attack_success against utility, one panel per attack configuration, one point per defense
    with its 95% intervals as bars; the front's points edged in black."""
    plt = pyplot()
    groups = list(table.groupby(["attack", "attack_config"], sort=False))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {d: palette[i % len(palette)] for i, d in enumerate(dict.fromkeys(table["defense"]))}
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.8 * rows), squeeze=False)
    for ax, ((attack, _), part) in zip(axes.flat, groups):
        for _, r in part.iterrows():
            label = f"{r['defense']} {r['defense_params']}".strip()
            ax.errorbar(r["attack_success"], r["utility"], xerr=r["attack_success_ci95"], yerr=r["utility_ci95"],
                        fmt="o", capsize=3, color=colours[r["defense"]], label=label + (" (front)" if r["pareto"] else ""),
                        markeredgecolor="black" if r["pareto"] else None, markeredgewidth=1.5)
        ax.set_title(f"{attack} {part['attack_params'].iloc[0]}".strip(), fontsize=9)
        ax.set_xlabel("attack_success (min)")
        ax.set_ylabel("utility (max)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_defenses(client: MlflowClient, experiment: str, parent: str | None = None, *,
                  log: bool = False) -> pd.DataFrame:
    """:func:`defense_table` of the experiment's finished trials (of launch ``parent`` if given).
    With ``log``, its CSV and plot go to ``parent`` (default: the latest sweep run). ``attrs``:
    ``trials`` (the finished trial runs read) and ``logged_to`` (the run logged to, or None)."""
    experiment_id, runs = load_trials(client, experiment, parent)
    if runs.empty:
        of = f" of parent run {parent}" if parent else ""
        raise ConfigError(f"--experiment: {experiment!r} has no finished trial runs{of}")
    table = defense_table(runs)
    target = (parent or latest_sweep_run(client, experiment_id)) if log else None
    if target is not None:
        record(client, target, table)
    table.attrs.update(trials=len(runs), logged_to=target)
    return table


def describe_defenses(experiment: str, table: pd.DataFrame) -> str:
    """The printed report of :func:`load_defenses`' table: a line saying what it holds, then the table."""
    target = table.attrs.get("logged_to")
    where = f"; logged analysis/defenses.csv and defenses.png to run {target}" if target else ""
    return (f"Defenses of {experiment} ({table.attrs.get('trials', int(table['replicates'].sum()))} trials, "
            f"{len(table)} attack × defense configurations{where}):\n" + format_table(table))


def defenses_report(client: MlflowClient, experiment: str, parent: str | None = None) -> str:
    """Reads the experiment's finished trials (of launch ``parent`` if given), logs the table's CSV
    and plot to ``parent`` (default: the latest sweep run) and returns the printed table."""
    return describe_defenses(experiment, load_defenses(client, experiment, parent, log=True))
