"""Pareto fronts of a sweep, read back from MLflow.

``pareto_front`` averages replicate seeds of one configuration, then marks the
non-dominated configurations per group (moocore's ``is_nondominated``) and
measures each group's front by its hypervolume against one common reference
point, so groups compare on the same scale: the worst mean value of each objective
over all groups, moved a further tenth of the objective's range (REFERENCE_MARGIN)
away, so a front's extreme points count too (against the worst values themselves,
a two-point front would measure 0).
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import moocore
import numpy as np
import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from scipy import stats

from poison import ConfigError
from sweeps.config import Constraint
from sweeps.tracking import ROLE_TAG

DEFAULT_OBJECTIVES = {"attack_success": "max", "utility": "max", "poison_count": "min"}
REPLICATE_PARAMS = ("seed", "search.seed", "search.replicate")
SEARCH_PAGE = 5000  # configurations differing only here are replicates
RUN_COLUMNS = ("run_id", "run_name", "status", "start_time", "end_time")  # load_trials' first columns

REFERENCE_MARGIN = 0.1  # the hypervolume reference lies this fraction of each range beyond the worst


@dataclass
class Front:
    """Every configuration with its mean objectives, ``pareto`` flag and group; hypervolume per group."""

    table: pd.DataFrame
    hypervolume: dict[str, float]
    objectives: dict[str, str]


def parse_objectives(text: str | None) -> dict[str, str]:
    """``"attack_success:max,utility:max"`` → {"attack_success": "max", "utility": "max"}."""
    if not text:
        return dict(DEFAULT_OBJECTIVES)
    out = {}
    for item in text.split(","):
        name, _, direction = item.strip().partition(":")
        if direction not in ("max", "min") or not name:
            raise ConfigError(f"--objectives: {item.strip()!r} is not NAME:max or NAME:min")
        out[name] = direction
    return out


def load_trials(client: MlflowClient, experiment: str, parent_run_id: str | None = None, *,
                finished: bool = True) -> tuple[str, pd.DataFrame]:
    """The experiment's finished trial runs (every trial run without ``finished``; of one launch,
    with ``parent_run_id``), one row each: ``run_id``, ``run_name``, ``status``, ``start_time``,
    ``end_time``, then ``params.*``, ``metrics.*`` (each metric's last value) and ``tags.*``."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise ConfigError(f"--experiment: no MLflow experiment {experiment!r}; experiments: {names}")
    query = f"tags.`{ROLE_TAG}` = 'trial'" + (" and attributes.status = 'FINISHED'" if finished else "")
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    rows, token = [], None
    while True:  # the client's own paging; mlflow.search_runs would use the global tracking URI
        page = client.search_runs([found.experiment_id], filter_string=query, max_results=SEARCH_PAGE,
                                  page_token=token)
        rows += [_flat(run) for run in page]
        token = page.token
        if not token:
            return found.experiment_id, pd.DataFrame(rows, columns=None if rows else list(RUN_COLUMNS))


def _flat(run: Run) -> dict[str, object]:
    info = run.info
    row: dict[str, object] = {"run_id": info.run_id, "run_name": info.run_name, "status": info.status,
                              "start_time": _time(info.start_time), "end_time": _time(info.end_time)}
    row.update({f"params.{k}": v for k, v in run.data.params.items()})
    row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
    row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
    return row


def _time(milliseconds: int | None) -> pd.Timestamp:
    """MLflow's milliseconds since the epoch as a UTC timestamp (NaT when unset)."""
    return pd.to_datetime(milliseconds, unit="ms", utc=True) if milliseconds else pd.NaT


def pareto_front(runs: pd.DataFrame, objectives: dict[str, str], group_by: str | None = None,
                 constraints: Sequence[Constraint] = ()) -> Front:
    """Averages replicates, then finds each group's non-dominated configurations.

    With ``constraints`` (``search.constraints``), a configuration is ``feasible`` when its mean
    metrics satisfy all of them, and a group's front is that of its feasible configurations
    (of all of them when none is feasible, each then shown infeasible).

    Example:
        >>> runs = pd.DataFrame({"run_id": ["a", "b"], "params.x": ["1", "2"],
        ...                      "metrics.u": [0.9, 0.5], "metrics.c": [10.0, 5.0]})
        >>> pareto_front(runs, {"u": "max", "c": "min"}).table["pareto"].tolist()
        [True, True]
    """
    missing = [o for o in objectives if f"metrics.{o}" not in runs.columns]
    if missing or runs.empty:
        raise ConfigError(f"--objectives: no finished trial reports {', '.join(missing) or 'anything'}")
    limits = [c.metric for c in constraints if c.metric not in objectives]
    missing = [m for m in limits if f"metrics.{m}" not in runs.columns]
    if missing:
        raise ConfigError(f"--constraint: no finished trial reports {', '.join(missing)}")
    configs = _average_replicates(runs, objectives, group_by, limits)
    configs["feasible"] = [all(c.value(float(row[c.metric])) <= 0 for c in constraints)
                           for _, row in configs.iterrows()]
    values = configs[list(objectives)].to_numpy(dtype=float)
    maximise = [d == "max" for d in objectives.values()]
    span = values.max(axis=0) - values.min(axis=0)
    margin = REFERENCE_MARGIN * np.where(span > 0, span, np.maximum(np.abs(values.max(axis=0)), 1.0))
    reference = np.where(maximise, values.min(axis=0) - margin, values.max(axis=0) + margin)
    configs["pareto"] = False
    volumes = {}
    for group, rows in configs.groupby("group", sort=True).groups.items():
        feasible = configs.loc[rows, "feasible"].to_numpy(dtype=bool)
        if feasible.any():  # the feasible configurations' front; the infeasible are on none
            rows = rows[feasible]
        pts = values[configs.index.get_indexer(rows)]
        mask = nondominated(pts, list(objectives.values()))
        configs.loc[rows[mask], "pareto"] = True
        volumes[str(group)] = float(moocore.hypervolume(pts[mask], ref=reference, maximise=maximise))
    return Front(configs, volumes, dict(objectives))


def nondominated(values: np.ndarray, directions: list[str]) -> np.ndarray:
    """Mask of the rows of ``values`` no other row dominates (ties kept), each column ``max`` or ``min``."""
    return moocore.is_nondominated(values, maximise=[d == "max" for d in directions], keep_weakly=True)


def config_key(runs: pd.DataFrame, params: list[str]) -> pd.Series:
    """One string per run joining its values of the ``params.*`` columns ``params`` (missing as empty)."""
    if not params:
        return pd.Series("", index=runs.index)
    return runs[params].fillna("").astype(str).agg("|".join, axis=1)


def replicate_stats(frame: pd.DataFrame, keys: list[str], metrics: list[str], *,
                    student_t: bool = True, per_run: frozenset[str] | set[str] = frozenset()) -> pd.DataFrame:
    """Per group of rows sharing ``keys``: each metric's mean, ``_std`` and ``_ci95`` (half-width
    of the mean's 95% interval: Student's t with n - 1 degrees of freedom, as a handful of seeds
    needs, or the normal approximation without ``student_t``; 0 for one value), ``replicates``
    (rows) and their sorted ``run_id`` joined by commas. NaNs are skipped.

    ``_low`` and ``_high`` bound the 95% interval of the mean: the mean ∓ ``_ci95``, except for
    the metrics in ``per_run``, each run's success or failure (Carlini & Terzis's targeted
    poisoning, one target per run), where every value is 0 or 1: the mean is then a success rate
    over runs and its interval Wilson's score interval (scipy's ``binomtest``), ``_interval``
    saying which. (A proportion over test images that happens to be 0 or 1 in every run is not
    such an outcome.)

    Example:
        >>> f = pd.DataFrame({"run_id": ["a", "b"], "k": [1, 1], "m": [0.5, 0.7]})
        >>> replicate_stats(f, ["k"], ["m"])[["m", "replicates", "run_id"]].values.tolist()
        [[0.6, 2, 'a,b']]
    """
    named = {name: (name, "mean") for name in metrics}
    named.update({f"{name}_std": (name, "std") for name in metrics})
    named.update({f"{name}_n": (name, "count") for name in metrics})
    named["replicates"] = ("run_id", "count")
    grouped = frame.groupby(keys, sort=False)
    out = grouped.agg(**named).join(grouped["run_id"].agg(lambda r: ",".join(sorted(r)))).reset_index()
    for name in metrics:
        n = out.pop(f"{name}_n").to_numpy(dtype=float)
        factor = stats.t.ppf(0.975, np.maximum(n - 1, 1)) if student_t else 1.96
        out[f"{name}_ci95"] = factor * out[f"{name}_std"].fillna(0) / np.sqrt(np.maximum(n, 1))
        binary = (grouped[name].agg(lambda v: bool(len(v.dropna())) and v.dropna().isin((0.0, 1.0)).all()).to_numpy()
                  & (name in per_run))
        low, high = out[name] - out[f"{name}_ci95"], out[name] + out[f"{name}_ci95"]
        for i in np.flatnonzero(binary):
            runs = int(n[i])
            interval = stats.binomtest(int(round(out[name].iloc[i] * runs)), runs).proportion_ci(0.95, "wilson")
            low.iloc[i], high.iloc[i] = interval.low, interval.high
        out[f"{name}_low"], out[f"{name}_high"] = low, high
        out[f"{name}_interval"] = np.where(binary, "wilson", "t" if student_t else "normal")
    return out


def _average_replicates(runs: pd.DataFrame, objectives: dict[str, str], group_by: str | None,
                        extra: Sequence[str] = ()) -> pd.DataFrame:
    params = sorted(c for c in runs.columns if c.startswith("params.")
                    and c.removeprefix("params.") not in REPLICATE_PARAMS)
    frame = runs[["run_id"]].copy()
    frame["config"] = config_key(runs, params)
    frame["group"] = _group_column(runs, group_by)
    metrics = [*objectives, *extra]
    for name in metrics:
        frame[name] = runs[f"metrics.{name}"].astype(float)
    frame = frame.dropna(subset=metrics)
    return replicate_stats(frame, ["group", "config"], metrics, per_run=_per_run_outcomes(runs))


def _per_run_outcomes(runs: pd.DataFrame) -> set[str]:
    """The metrics that are one success or failure per run: a targeted attack's with one target
    image (Carlini & Terzis's protocol), for every trial."""
    kinds, targets = runs.get("params.attack.kind"), runs.get("params.attack.targets")
    if kinds is None or targets is None or not ((kinds == "targeted") & (targets == "1")).all():
        return set()
    return {"attack_success", "targeted_success"}


def _group_column(runs: pd.DataFrame, group_by: str | None) -> pd.Series:
    if not group_by:
        return pd.Series("all", index=runs.index)
    for column in (f"tags.{group_by}", f"params.{group_by}"):
        if column in runs.columns:
            return runs[column].fillna("none").astype(str)
    raise ConfigError(f"--group-by: trials have no tag or param {group_by!r}")


def format_front(front: Front, *, only_front: bool = True) -> str:
    """A plain-text table of the front (mean ± 95% interval), with each group's hypervolume."""
    rows = front.table[front.table["pareto"]] if only_front else front.table
    constrained = "feasible" in rows and not rows["feasible"].all()
    head = (["group", *front.objectives, "replicates", "runs"] + ([] if only_front else ["pareto"])
            + (["feasible"] if constrained else []))
    body = []
    for _, r in rows.sort_values(["group", *front.objectives]).iterrows():
        cells = [rate_ci(r, o) if r[f"{o}_interval"] == "wilson" and r["replicates"] > 1
                 else mean_ci(r[o], r[f"{o}_ci95"]) for o in front.objectives]
        extra = ([] if only_front else ["yes" if r["pareto"] else ""]) + (
            ["yes" if r["feasible"] else "no"] if constrained else [])
        body.append([str(r["group"]), *cells, str(int(r["replicates"])), _short(r["run_id"]), *extra])
    volumes = "  ".join(f"{g}: {v:.4g}" for g, v in front.hypervolume.items())
    return "\n".join([format_rows(head, body), f"hypervolume  {volumes}"])


def format_rows(head: list[str], body: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart, the header first."""
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line.format(*head), *(line.format(*b) for b in body)])


def mean_ci(mean: float, ci: float) -> str:
    """``0.8 ± 0.2``; the mean alone without an interval, ``-`` without a mean."""
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.4g}" if not ci or math.isnan(ci) else f"{mean:.4g} ± {ci:.2g}"


def rate_ci(row: pd.Series, name: str) -> str:
    """A success rate over runs with its Wilson interval: ``0.35 [0.18, 0.57] of 20``."""
    return f"{row[name]:.3g} [{row[f'{name}_low']:.2g}, {row[f'{name}_high']:.2g}] of {int(row['replicates'])}"


def _short(run_ids: str) -> str:
    ids = run_ids.split(",")
    return ids[0][:8] + (f" +{len(ids) - 1}" if len(ids) > 1 else "")


def latest_sweep_run(client: MlflowClient, experiment_id: str) -> str | None:
    parents = client.search_runs([experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    return parents[0].info.run_id if parents else None


def sweep_constraints(client: MlflowClient, parent: str | None) -> list[str]:
    """The ``search.constraints`` a launch (its parent run) was run with."""
    if parent is None:
        return []
    text = client.get_run(parent).data.params.get("search.constraints", "none")
    return [] if text == "none" else [t.strip() for t in text.split(";") if t.strip()]


def record(client: MlflowClient, parent: str | None, front: Front) -> None:
    """Tags every trial run ``pareto=true/false``; logs the front's CSV, plots and hypervolumes to ``parent``."""
    for _, row in front.table.iterrows():
        for run_id in row["run_id"].split(","):
            client.set_tag(run_id, "pareto", "true" if row["pareto"] else "false")
    if parent is None:
        return
    log_analysis(client, parent, lambda folder: [_csv(front.table, folder / "pareto.csv"), *_plots(front, folder)])
    for group, volume in front.hypervolume.items():
        client.log_metric(parent, f"hypervolume.{group}" if len(front.hypervolume) > 1 else "hypervolume", volume)


def log_analysis(client: MlflowClient, parent: str, write: Callable[[Path], list[Path]]) -> None:
    """Logs under ``analysis/`` of run ``parent`` the files ``write(folder)`` makes in a temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        for path in write(Path(folder)):
            client.log_artifact(parent, str(path), "analysis")


def _csv(table: pd.DataFrame, path: Path) -> Path:
    table.to_csv(path, index=False)
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plots(front: Front, folder: Path) -> list[Path]:
    """One PNG per pair of objectives (every configuration, its group's front highlighted),
    and an interactive HTML for three objectives."""
    plt = pyplot()
    names, out = list(front.objectives), []
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            fig, ax = plt.subplots(figsize=(5, 4))
            for group, rows in front.table.groupby("group"):
                ax.scatter(rows[x], rows[y], alpha=0.35, label=f"{group}")
                top = rows[rows["pareto"]]
                ax.scatter(top[x], top[y], edgecolors="black", linewidths=1.2, label=f"{group} (front)")
            ax.set_xlabel(f"{x} ({front.objectives[x]})")
            ax.set_ylabel(f"{y} ({front.objectives[y]})")
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = folder / f"pareto_{x}_vs_{y}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            out.append(path)
    if len(names) == 3:
        out.append(_html_3d(front, folder))
    return out


def _html_3d(front: Front, folder: Path) -> Path:
    """An interactive 3-D scatter (plotly, self-contained HTML) with the front marked."""
    import plotly.express as px

    x, y, z = front.objectives
    table = front.table.assign(front=front.table["pareto"].map({True: "front", False: "dominated"}))
    fig = px.scatter_3d(table, x=x, y=y, z=z, color="group", symbol="front", hover_data=["run_id", "replicates"],
                        labels={n: f"{n} ({d})" for n, d in front.objectives.items()})
    path = folder / "pareto_3d.html"
    fig.write_html(path, include_plotlyjs=True)
    return path
