"""The sweep report (``analysis/report.html``) as MLflow's artifact viewer shows it, in headless
Chromium, over a finished 2-trial sweep: ``poisonsweep run`` logs the report at its end, and the
page is read from what the browser rendered inside the viewer's frame.

Time budget: 90 s, measured at 67 to 85 s on a 2-core machine shared with other work (the store
and the UI 18 s, the sweep with its report 32 to 52 s, the report checked in the viewer 5 to 7 s and
as a file 2 s; Chromium loads MLflow's app while the sweep runs). The same file opened on its own
is checked too: its links then go to ``poisonsweep ui``'s default address.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from sweeps.analysis._report import DEFAULT_UI
from sweeps.cli import main
from tests.e2e.test_browser import CHROMIUM, SWEEP, _close_assistant, serving_ui
from tests.support import launch_runs

EXPERIMENT = "report-browser"
PAIRS = ["attack_success-vs-utility", "attack_success-vs-poison_count", "utility-vs-poison_count"]

# per plot: its div id and, per trace, its name, its points (plotly's own parsed data), the run id of
# each point (customdata[0], where it names runs) and the points drawn in the SVG
PLOTS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(el => ({
  id: el.id,
  traces: el._fullData.map((t, i) => ({
    name: t.name,
    points: t.x ? t.x.length : 0,
    runs: Array.isArray(t.customdata) ? t.customdata.map(c => String(c[0])) : [],
    drawn: el.querySelectorAll('.scatterlayer .trace')[i]
      ? el.querySelectorAll('.scatterlayer .trace')[i].querySelectorAll('path.point').length : 0,
  })),
}))"""


@pytest.fixture(scope="module")
def report_server(tmp_path_factory):
    """`poisonsweep ui` over a fresh SQLite store, launched beside ray.init and up while the sweep runs."""
    with serving_ui(tmp_path_factory.mktemp("report-browser")) as server:
        yield server


@pytest.mark.slow
def test_the_report_in_mlflows_artifact_viewer(report_server, ray_local, tmp_path):
    from playwright.sync_api import sync_playwright  # the test extra

    server, clock = report_server, report_server.clock
    server.launch.result()
    clock.step("store created")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "name": EXPERIMENT, "storage": {"path": str(tmp_path / "results")}}))
    with ThreadPoolExecutor(1) as pool, sync_playwright() as pw:
        sweep = pool.submit(main, ["run", str(path), "--tracking-uri", server.uri])
        browser = pw.chromium.launch(executable_path=str(CHROMIUM))
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(90_000)  # parsing MLflow's bundle is slow on a busy 2-core machine
        server.wait_ready()
        page.goto(f"{server.url}/#/experiments")
        page.get_by_role("link", name="Experiments").first.wait_for()
        clock.mark("app loaded")
        assert sweep.result() == 0
        clock.step("sweep")
        client, parent, children = launch_runs(server.uri, EXPERIMENT, "sweep")
        trials = sorted(c.info.run_id for c in children)
        assert len(trials) == 2
        logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "analysis")}
        assert {"report.html", *(f"report-pareto-{p}.png" for p in PAIRS)} <= logged, logged

        experiment = parent.info.experiment_id
        page.goto(f"{server.url}/#/experiments/{experiment}/runs/{parent.info.run_id}/artifacts/analysis/report.html")
        page.locator("iframe").first.wait_for()
        _close_assistant(page)
        frame = next(f for f in page.frames if f.url.startswith("blob:"))  # the viewer's sandboxed frame
        linked = _check_report(frame, trials, f"{server.url}/#/experiments/{experiment}/runs/")  # the showing server
        assert linked == {*trials, parent.info.run_id}
        assert all(client.get_run(run).info.experiment_id == experiment for run in linked)
        assert frame.locator("#viewer-note").is_visible()  # the viewer blocks new windows: the page says so

        first = frame.locator("#figure-pareto-attack_success-vs-utility .scatterlayer .trace").first
        first.locator("path.point").first.hover(force=True)  # plotly's drag layer above takes the pointer
        hover = frame.locator("#figure-pareto-attack_success-vs-utility .hoverlayer .hovertext").first
        hover.wait_for()
        names = {c.info.run_name for c in children}
        assert any(name in hover.text_content() for name in names), hover.text_content()
        screenshot = tmp_path / "report.png"
        page.screenshot(path=str(screenshot), full_page=True)
        clock.step("report checked")

        # the same file opened on its own: its links go to where `poisonsweep ui` listens by default
        local = Path(client.download_artifacts(parent.info.run_id, "analysis/report.html", str(tmp_path)))
        errors = []
        opened = browser.new_page()
        opened.on("pageerror", lambda error: errors.append(str(error)))
        opened.goto(local.as_uri())
        assert _check_report(opened, trials, f"{DEFAULT_UI}#/experiments/{experiment}/runs/") == linked
        assert not opened.locator("#viewer-note").is_visible() and not errors, errors
        clock.step("file checked")
        browser.close()
    print(f"\nscreenshot: {screenshot}")
    print(clock.breakdown())


def _check_report(page, trials: list[str], base: str) -> set[str]:
    """One point per trial in every pair of objectives (plotly's parsed data and the SVG it drew),
    each with its trial's run id; every link pointing at ``base`` + a run id. Returns the linked ids."""
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length > 0 && Array.from("
                           "document.querySelectorAll('.js-plotly-plot')).every(el => el._fullData)")
    plots = {p["id"]: {t["name"]: t for t in p["traces"]} for p in page.evaluate(PLOTS)}
    assert set(plots) == {f"figure-pareto-{p}" for p in PAIRS}  # no defense, not a budget launch
    for pair in PAIRS:
        points = plots[f"figure-pareto-{pair}"]["trials"]
        assert points["points"] == points["drawn"] == len(trials), (pair, points)
        assert sorted(points["runs"]) == trials
    hrefs = page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
    assert hrefs and all(h.startswith(base) for h in hrefs), hrefs
    return {re.fullmatch(r"[0-9a-f]{32}", h.removeprefix(base)).group(0) for h in hrefs}
