"""The sweep report: one self-contained HTML page per launch (``analysis/report.html``).

:func:`write_report` reads a launch's finished trials back from MLflow and draws, with plotly,

- the Pareto front of each pair of objectives, one point per trial coloured by the third
  objective, the pair's front (configurations with replicate seeds averaged) as a line, and
  each replicated configuration's mean with its 95% interval;
- the clean model's utility and attack success as reference lines on those axes;
- the defense trade-off (attack success against utility per attack × defense configuration)
  when the launch has defenses;
- the budget curve (success against ``poison_count``, the fitted dose-response, the threshold
  and the estimate with its interval) for a ``poisonsweep budget`` launch;
- the trial table, every trial linked to its run in the MLflow UI.

plotly.js is inlined once, so the page needs no network. Every figure is also drawn as a PNG
(matplotlib, from the plotly figure's own traces and lines) for papers. Everything is written to
a folder and logged to the launch's parent run under ``analysis/``.

Run links. MLflow's artifact viewer shows an HTML artifact in a sandboxed iframe loaded from a
``blob:`` URL, where no relative link resolves; the links are therefore absolute, to the UI at
``ui_url`` (default: the tracking server for an ``http(s)`` store, else where ``poisonsweep ui``
listens by default), and a script in the page points them at the server that shows it when it is
shown by one (the ``blob:`` or ``http(s)`` origin of the page). They open in a new tab, except
inside the viewer, whose sandbox (scripts only) lets the page open no window: there the page says
so, and a link is copied from the context menu (or the downloaded file opened).
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from poison import ConfigError
from sweeps.analysis._pareto import load_trials, pareto_front, parse_objectives, pyplot
from sweeps.tracking import ROLE_TAG

DEFAULT_UI = "http://127.0.0.1:5000/"  # where `poisonsweep ui` listens unless told otherwise
LAUNCH_ROLES = ("sweep", "budget")
REFERENCES = {"utility": "clean_utility", "attack_success": "clean_attack_success"}  # objective → clean metric
REPORT = "report.html"
TAGS = ("attack", "defense")  # the trial tags the table shows where they vary


@dataclass
class Report:
    """The page's parts: its figures (title, slug, plotly figure) and notes in order."""

    title: str
    trials: int
    figures: list[tuple[str, str, Any]] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)


def write_report(client: MlflowClient, experiment: str, parent: str | None = None, folder: Path | str = ".", *,
                 objectives: dict[str, str] | None = None, ui_url: str | None = None, log: bool = True) -> Path:
    """Writes ``report.html`` and ``report-*.png`` for launch ``parent`` (default: the experiment's
    latest launch) into ``folder``, logs them to the parent run under ``analysis/`` (with ``log``)
    and returns the HTML's path. ``objectives`` defaults to the launch's own (its
    ``search.objectives`` param), else attack_success:max, utility:max, poison_count:min."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output: {folder} is not a folder")
    if not folder.parent.is_dir():
        raise ConfigError(f"--output: {folder}: the folder {folder.parent} does not exist")
    experiment_id, parent_run = _launch(client, experiment, parent)
    folder.mkdir(exist_ok=True)  # once the launch is found: a bad experiment leaves no folder behind
    parent_id = parent_run.info.run_id if parent_run else None
    _, runs = load_trials(client, experiment, parent_id)
    if runs.empty:
        of = f" of launch {parent_id}" if parent_id else ""
        raise ConfigError(f"--experiment: {experiment!r} has no finished trial runs{of}")
    base = _ui_base(ui_url, client)
    runs = runs.assign(url=[f"{base}#/experiments/{experiment_id}/runs/{r}" for r in runs["run_id"]],
                       trial=_names(runs)).sort_values("trial").reset_index(drop=True)
    role = parent_run.data.tags.get(ROLE_TAG) if parent_run else None
    name = parent_run.info.run_name if parent_run else experiment
    chosen = objectives or parse_objectives(parent_run.data.params.get("search.objectives") if parent_run else None)
    present = {k: v for k, v in chosen.items() if f"metrics.{k}" in runs.columns and runs[f"metrics.{k}"].notna().any()}
    report = Report(f"{name}: {len(runs)} trials", len(runs))
    for x, y in combinations(present, 2):
        third = next((o for o in present if o not in (x, y)), None)
        report.figures.append((f"Pareto front: {x} against {y}", f"pareto-{x}-vs-{y}",
                               pair_figure(runs, present, x, y, third)))
    defense = defense_figure(runs)
    if defense is not None:
        report.figures.append(("Defense trade-off", "defenses", defense))
    if role == "budget":
        report.figures.append(("Budget curve", "budget", budget_figure(runs, parent_run)))
    table = trial_table(runs, present)
    launch_link = (f'<a class="run" href="{base}#/experiments/{experiment_id}/runs/{parent_id}" target="_blank" '
                   f'rel="noopener" data-run-id="{parent_id}">{html.escape(name)}</a>' if parent_id else "(every run)")
    page = render(report, experiment, launch_link, table, base)
    path = folder / REPORT
    path.write_text(page, encoding="utf-8")
    files = [path] + [draw_png(fig, folder / f"report-{slug}.png") for _, slug, fig in report.figures]
    if log and parent_id:
        for file in files:
            client.log_artifact(parent_id, str(file), "analysis")
    return path


def _launch(client: MlflowClient, experiment: str, parent: str | None) -> tuple[str, Any]:
    """The experiment's id and the launch's parent run (given, or the latest ``sweep`` or ``budget`` run)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise ConfigError(f"--experiment: no MLflow experiment {experiment!r}; experiments: {names}")
    if parent:
        runs = client.search_runs([found.experiment_id], filter_string=f"attributes.run_id = '{parent}'")
        if not runs:
            raise ConfigError(f"--parent: experiment {experiment!r} has no run {parent}")
        return found.experiment_id, runs[0]
    latest = [run for role in LAUNCH_ROLES
              for run in client.search_runs([found.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{role}'",
                                            order_by=["attributes.start_time DESC"], max_results=1)]
    return found.experiment_id, max(latest, key=lambda run: run.info.start_time, default=None)


def _ui_base(ui_url: str | None, client: MlflowClient) -> str:
    uri = ui_url or (client.tracking_uri if client.tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI)
    return uri.rstrip("/") + "/"


def _names(runs: pd.DataFrame) -> pd.Series:
    for column in ("tags.mlflow.runName", "tags.trial_id"):
        if column in runs.columns:
            return runs[column].fillna(runs["run_id"]).astype(str)
    return runs["run_id"].astype(str)


def _label(name: str, direction: str) -> str:
    return f"{name} ({direction})"


def _hover(runs: pd.DataFrame, names: list[str]) -> tuple[np.ndarray, str]:
    """customdata (run id, trial, url, values) and the hover template naming them."""
    data = np.column_stack([runs["run_id"], runs["trial"], runs["url"],
                            *(runs[f"metrics.{n}"].astype(float) for n in names)])
    lines = [f"{n}: %{{customdata[{3 + i}]:.4g}}" for i, n in enumerate(names)]
    return data, "<b>%{customdata[1]}</b><br>run %{customdata[0]}<br>" + "<br>".join(lines) + "<extra></extra>"


def pair_figure(runs: pd.DataFrame, objectives: dict[str, str], x: str, y: str, third: str | None) -> Any:
    """One point per trial (colour: ``third``), the pair's front over configuration means, each
    replicated configuration's mean with its 95% interval, the clean model's reference lines."""
    import plotly.graph_objects as go

    data, template = _hover(runs, [x, y] + ([third] if third else []))
    marker: dict[str, Any] = {"size": 9, "line": {"width": 0.5, "color": "#333"}}
    if third:
        marker.update(color=runs[f"metrics.{third}"].astype(float), colorscale="Viridis", showscale=True,
                      colorbar={"title": {"text": _label(third, objectives[third])}})
    fig = go.Figure(go.Scatter(x=runs[f"metrics.{x}"].astype(float), y=runs[f"metrics.{y}"].astype(float),
                               mode="markers", name="trials", marker=marker, customdata=data,
                               hovertemplate=template))
    front = pareto_front(runs, {x: objectives[x], y: objectives[y]}).table
    line = front[front["pareto"]].sort_values(x)
    fig.add_trace(go.Scatter(x=line[x], y=line[y], mode="lines", name="Pareto front",
                             line={"color": "#d62728", "width": 2, "shape": "linear"}, hoverinfo="skip"))
    replicated = front[front["replicates"] > 1]
    if not replicated.empty:
        fig.add_trace(go.Scatter(
            x=replicated[x], y=replicated[y], mode="markers", name="mean of seeds (95% interval)",
            marker={"symbol": "diamond-open", "size": 11, "color": "#222"},
            error_x=_interval(replicated, x), error_y=_interval(replicated, y),
            customdata=np.column_stack([replicated["replicates"], replicated["run_id"]]),
            hovertemplate=f"mean of %{{customdata[0]}} seeds<br>{x}: %{{x:.4g}}<br>{y}: %{{y:.4g}}"
                          "<br>runs %{customdata[1]}<extra></extra>"))
    for axis, name in (("x", x), ("y", y)):
        clean = REFERENCES.get(name)
        if clean and f"metrics.{clean}" in runs.columns and runs[f"metrics.{clean}"].notna().any():
            value = float(runs[f"metrics.{clean}"].astype(float).mean())
            text = f"clean model: {name} {value:.3g}"
            style = {"line_dash": "dash", "line_color": "#555", "name": text, "annotation_text": text,
                     "annotation_position": "top left" if axis == "y" else "bottom right"}  # apart
            if axis == "y":
                fig.add_hline(y=value, **style)
            else:
                fig.add_vline(x=value, **style)
    fig.update_layout(xaxis_title=_label(x, objectives[x]), yaxis_title=_label(y, objectives[y]),
                      legend={"orientation": "h", "y": -0.2}, margin={"t": 30}, height=520)
    return fig


def _interval(table: pd.DataFrame, name: str) -> dict[str, Any]:
    """An asymmetric error bar from the ``_low``/``_high`` bounds (Student's t or Wilson's)."""
    return {"type": "data", "symmetric": False, "array": table[f"{name}_high"] - table[name],
            "arrayminus": table[name] - table[f"{name}_low"], "color": "#222"}


def defense_figure(runs: pd.DataFrame) -> Any | None:
    """Attack success against utility per attack × defense configuration (mean, 95% intervals),
    each defense's point joined to the same attack without it; None without defenses."""
    import plotly.graph_objects as go

    from sweeps.analysis._defenses import UNDEFENDED, defense_table

    kinds = runs.get("tags.defense", runs.get("params.defense.kind"))
    if kinds is None or (kinds.fillna(UNDEFENDED) == UNDEFENDED).all():
        return None
    try:
        table = defense_table(runs)
    except ConfigError:  # a defense without its undefended baseline: the table cannot compare it
        return None
    fig = go.Figure()
    table = table.assign(label=(table["attack"] + " " + table["attack_params"]).str.strip())
    for defense, rows in table.groupby("defense", sort=False):
        fig.add_trace(go.Scatter(
            x=rows["attack_success"], y=rows["utility"], mode="markers", name=str(defense),
            marker={"size": 11, "line": {"width": np.where(rows["pareto"], 2, 0), "color": "black"}},
            error_x={"type": "data", "array": rows["attack_success_ci95"].fillna(0)},
            error_y={"type": "data", "array": rows["utility_ci95"].fillna(0)},
            customdata=np.column_stack([rows["label"], rows["defense_params"], rows["replicates"],
                                        rows["cost_ratio"], rows["pareto"].map({True: "yes", False: "no"})]),
            hovertemplate=f"<b>{defense}</b> %{{customdata[1]}}<br>attack %{{customdata[0]}}<br>"
                          "attack_success %{x:.4g}<br>utility %{y:.4g}<br>seeds %{customdata[2]}"
                          "<br>cost %{customdata[3]:.3g}× undefended<br>front %{customdata[4]}<extra></extra>"))
    fig.update_layout(xaxis_title=_label("attack_success", "min"), yaxis_title=_label("utility", "max"),
                      legend={"title": {"text": "defense (front: black edge)"}}, margin={"t": 30}, height=480)
    return fig


def budget_figure(runs: pd.DataFrame, parent: Any) -> Any:
    """Attack success against ``poison_count`` (log): every trial, each count's mean with its 95%
    interval, the fitted dose-response, the threshold, the clean model's success (the curve's
    floor) and the estimated budget with its interval, as the budget search logged them."""
    import plotly.graph_objects as go
    from scipy import stats

    from sweeps.budget._stats import fit_curve

    metrics, params = parent.data.metrics, parent.data.params
    count = runs["metrics.poison_count"] if "metrics.poison_count" in runs.columns else runs["params.attack.poison_count"]
    frame = pd.DataFrame({"count": count.astype(float), "success": runs["metrics.attack_success"].astype(float)})
    data, template = _hover(runs, ["poison_count", "attack_success"] if "metrics.poison_count" in runs.columns
                            else ["attack_success"])
    fig = go.Figure(go.Scatter(x=frame["count"], y=frame["success"], mode="markers", name="trials",
                               marker={"size": 8, "opacity": 0.6, "color": "#1f77b4"}, customdata=data,
                               hovertemplate=template))
    means = frame.groupby("count")["success"].agg(mean="mean", std="std", n="size").reset_index()
    half = stats.t.ppf(0.975, np.maximum(means["n"] - 1, 1)) * means["std"].fillna(0) / np.sqrt(means["n"])
    fig.add_trace(go.Scatter(x=means["count"], y=means["mean"], mode="markers", name="mean per count (95% interval)",
                             marker={"size": 10, "color": "#1f77b4", "symbol": "diamond"},
                             error_y={"type": "data", "array": half}))
    floor = metrics.get("budget_floor", 0.0)
    curve = fit_curve(frame["count"], frame["success"], floor=floor)
    if curve is not None:
        grid = np.geomspace(frame["count"].min(), frame["count"].max(), 200)
        fig.add_trace(go.Scatter(x=grid, y=curve.success(grid), mode="lines", name="fitted dose-response",
                                 line={"color": "#ff7f0e"}))
    if "budget.threshold" in params:
        threshold = float(params["budget.threshold"])
        fig.add_hline(y=threshold, line_dash="dash", line_color="gray", name=f"threshold {threshold:g}",
                      annotation_text=f"threshold {threshold:g}")
    if "budget_floor" in metrics:
        fig.add_hline(y=floor, line_dash="dot", line_color="#555", name=f"clean model: attack_success {floor:.3g}",
                      annotation_text=f"clean model {floor:.3g}", annotation_position="bottom right")
    estimate, low, high = (metrics.get(f"budget_count{s}") for s in ("", "_low", "_high"))
    if estimate is not None and low is not None and high is not None and math.isfinite(high):
        fig.add_vrect(x0=low, x1=high, fillcolor="green", opacity=0.15, line_width=0,
                      name=f"{float(params.get('budget.confidence', 0.95)):.0%} interval")
    if estimate is not None:
        fig.add_vline(x=estimate, line_color="green", name=f"budget {estimate:.0f}",
                      annotation_text=f"budget {estimate:.0f}")
    fig.update_layout(xaxis={"type": "log", "title": {"text": "attack.poison_count"}},
                      yaxis={"title": {"text": "attack_success"}, "range": [-0.02, 1.02]},
                      title={"text": f"minimal budget: {parent.data.tags.get('budget.status', 'unknown')}"},
                      margin={"t": 40}, height=480)
    return fig


def trial_table(runs: pd.DataFrame, objectives: dict[str, str]) -> str:
    """The trials as an HTML table: name, run link, the attack and defense where they vary, the
    drawn values, objectives, clean-model metrics
    and whether the trial's configuration is on the front of all the objectives."""
    shown = [f"tags.{t}" for t in TAGS] + sorted(c for c in runs.columns if c.startswith("params.search."))
    drawn = [c for c in shown if c in runs.columns and runs[c].nunique() > 1]
    extra = [m for m in ("clean_utility", "clean_attack_success", "utility_drop")
             if f"metrics.{m}" in runs.columns and m not in objectives]
    metrics = [m for m in [*objectives, *extra] if f"metrics.{m}" in runs.columns]
    flags = _front_flags(runs, objectives)
    head = ["trial", "run", *(c.removeprefix("params.search.").removeprefix("tags.") for c in drawn), *metrics,
            "front"]
    body = []
    for _, r in runs.iterrows():
        link = (f'<a class="run" href="{html.escape(r["url"])}" target="_blank" rel="noopener" '
                f'data-run-id="{r["run_id"]}">{r["run_id"][:8]}</a>')
        cells = [html.escape(str(r["trial"])), link, *(html.escape(str(r[c])) for c in drawn),
                 *(_number(r[f"metrics.{m}"]) for m in metrics), "yes" if flags.get(r["run_id"]) else ""]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f'<table class="trials"><thead><tr>{header}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _front_flags(runs: pd.DataFrame, objectives: dict[str, str]) -> dict[str, bool]:
    if len(objectives) < 2:
        return {}
    table = pareto_front(runs, objectives).table
    return {run: bool(flag) for ids, flag in zip(table["run_id"], table["pareto"]) for run in ids.split(",")}


def _number(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.4g}"


STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}h2{font-size:1.15em;
margin-top:1.6em}table.trials{border-collapse:collapse;font-size:.85em}table.trials td,table.trials th{border:1px
solid #ccc;padding:2px 6px;text-align:right}table.trials td:first-child,table.trials th:first-child{text-align:left}.note{color:#555;
font-size:.9em}"""

# Links point at the UI that shows the page: in MLflow's artifact viewer the page is a blob: URL
# of the server's origin, opened from the server it is the server itself; a file keeps ui_url.
LINKS = """<script>(function(){var o=null;try{var u=new URL(location.href);
if(u.protocol==="blob:"){o=new URL(u.pathname).origin;document.getElementById("viewer-note").hidden=false;}else if(u.protocol.indexOf("http")===0){o=u.origin;}}catch(e){}
var links=document.querySelectorAll("a.run");if(o){for(var i=0;i<links.length;i++){var h=links[i].getAttribute("href");
links[i].setAttribute("href",o+"/"+h.slice(h.indexOf("#")));}}
var plots=document.querySelectorAll(".js-plotly-plot");for(var j=0;j<plots.length;j++){plots[j].on("plotly_click",
function(ev){var p=ev.points[0];if(!p||!p.customdata||typeof p.customdata[2]!=="string")return;
var h=p.customdata[2];window.open(o?o+"/"+h.slice(h.indexOf("#")):h,"_blank","noopener");});}})();</script>"""


def render(report: Report, experiment: str, launch_link: str, table: str, base: str) -> str:
    """The page: plotly.js once (with the first figure), every figure, the trial table."""
    parts = []
    for i, (title, slug, fig) in enumerate(report.figures):
        div = fig.to_html(full_html=False, include_plotlyjs=i == 0, div_id=f"figure-{slug}",
                          config={"displaylogo": False, "responsive": True})
        parts.append(f'<h2>{html.escape(title)}</h2>\n<p class="note">Static copy: report-{slug}.png</p>\n{div}')
    if not report.figures:
        parts.append('<p class="note">No figure: the trials report fewer than two objectives.</p>')
    links = (f'<p class="note">Run links open the MLflow UI at {html.escape(base)} (or the server showing this page) '
             "in a new tab; clicking a point opens its run.</p>\n"
             '<p class="note" id="viewer-note" hidden>MLflow\'s artifact viewer does not let this page open windows: '
             "copy a run link from the context menu, or download report.html and open it.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(report.title)}</title><style>{STYLE}</style></head><body>\n"
            f"<h1>Sweep report: {html.escape(experiment)}</h1>\n<p>Launch {launch_link}: {report.trials} finished "
            f"trials</p>\n{links}\n" + "\n".join(parts) + f"\n<h2>Trials</h2>\n{table}\n{LINKS}\n</body></html>\n")


def draw_png(fig: Any, path: Path) -> Path:
    """The plotly figure drawn again with matplotlib: its scatter traces (markers, lines, error
    bars, a numeric colour scale), its horizontal and vertical lines and bands, titles, log axes
    and a fixed y range."""
    plt = pyplot()
    out, ax = plt.subplots(figsize=(7, 4.8))
    for trace in fig.data:
        x, y = np.asarray(trace.x, dtype=float), np.asarray(trace.y, dtype=float)
        mode = trace.mode or "markers"
        if "lines" in mode:
            ax.plot(x, y, color=trace.line.color, label=trace.name)
        if "markers" in mode:
            colour, symbol = trace.marker.color, str(trace.marker.symbol or "")
            if colour is not None and np.ndim(colour):  # a numeric scale: one value per point
                dots = ax.scatter(x, y, c=np.asarray(colour, dtype=float), cmap="viridis", edgecolors="#333",
                                  linewidths=0.5, label=trace.name)
                out.colorbar(dots, label=trace.marker.colorbar.title.text)
            elif "open" in symbol:
                ax.scatter(x, y, marker="D", facecolors="none", edgecolors=colour or "#222", label=trace.name)
            else:
                ax.scatter(x, y, color=colour, marker="D" if "diamond" in symbol else "o", label=trace.name)
        xerr, yerr = _errors(trace.error_x), _errors(trace.error_y)
        if xerr is not None or yerr is not None:
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor="#444", capsize=3)
    for shape in fig.layout.shapes:
        style = {"color": shape.line.color or "gray", "linestyle": "--" if shape.line.dash else "-",
                 "label": shape.name}
        if shape.type == "rect":
            ax.axvspan(shape.x0, shape.x1, color=shape.fillcolor or "green", alpha=shape.opacity or 0.15,
                       label=shape.name)
        elif str(shape.xref).endswith("domain"):
            ax.axhline(shape.y0, **style)
        else:
            ax.axvline(shape.x0, **style)
    layout = fig.layout
    ax.set_xlabel(layout.xaxis.title.text or "")
    ax.set_ylabel(layout.yaxis.title.text or "")
    if layout.title.text:
        ax.set_title(layout.title.text, fontsize=10)
    if layout.xaxis.type == "log":
        ax.set_xscale("log")
    if layout.yaxis.range:
        ax.set_ylim(*layout.yaxis.range)
    ax.legend(fontsize=7)
    out.tight_layout()
    out.savefig(path, dpi=120)
    plt.close(out)
    return path


def _errors(bar: Any) -> np.ndarray | None:
    if bar.array is None:
        return None
    high = np.asarray(bar.array, dtype=float)
    low = high if bar.symmetric is not False or bar.arrayminus is None else np.asarray(bar.arrayminus, dtype=float)
    return np.vstack([low, high])

