"""The MLflow UI seen in headless Chromium over a finished small sweep: the address `poisonsweep ui`
prints opens the launch's runs, the parent run and its trial runs (named after what they are) with
their attack/defense tags, the parent run's description, and the analysis artifacts on it.

The MLflow UI is a React app: everything asserted here is what the browser rendered (run names,
tag values in the runs table, the artifact tree of a run page). The tracking store is read only to
know the run ids and names to look for.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from sweeps.cli import main
from tests.support import backdoor, free_port, launch_runs

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package: Playwright cannot download its own browser here
EXPERIMENT = "browser"
SWEEP = {
    "name": EXPERIMENT,
    "seed": 0,
    "data": {"size": 200, "test_size": 48},
    "train": {"epochs": 1, "batch_size": 64},
    "attack": {**backdoor(), "poison_count": {"low": 8, "high": 30, "log": True, "default": 12}},
    # one trial at a time: the second reuses the first's actor instead of importing torch again
    "search": {"num_samples": 2, "max_concurrent": 1},
    "resources": {"cpu": 1},
}
TAGS = {"attack": "backdoor", "defense": "none"}
OBJECTIVES = ["attack_success", "utility", "poison_count"]  # shown beside the tags, for the screenshot


@dataclass
class Clock:
    """The test's timing breakdown: steps one after the other, and marks of things done beside them."""
    started: float = field(default_factory=time.perf_counter)
    steps: list[tuple[str, float]] = field(default_factory=list)
    marks: list[tuple[str, float]] = field(default_factory=list)

    def step(self, name: str) -> None:
        self.steps.append((name, time.perf_counter()))

    def mark(self, name: str) -> None:
        self.marks.append((name, time.perf_counter()))

    def breakdown(self) -> str:
        ends = [self.started] + [t for _, t in self.steps]
        steps = ", ".join(f"{name} {end - start:.1f} s" for (name, end), start in zip(self.steps, ends))
        marks = ", ".join(f"{name} at {t - self.started:.1f} s" for name, t in self.marks)
        return f"browser test: {ends[-1] - self.started:.1f} s = {steps}; beside the sweep: {marks}"


@dataclass
class Server:
    """`poisonsweep ui` in its own process group, launched in the background (``launch``)."""
    uri: str
    port: int
    url: str
    log: Path
    launch: Future
    clock: Clock

    def wait_ready(self, timeout: float = 300) -> None:
        proc, deadline = self.launch.result(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"poisonsweep ui exited with {proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"the MLflow UI did not answer within {timeout:.0f} s:\n{self.log.read_text()}")


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is absent (Debian package chromium; .ci/run installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)



def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (poisonsweep, mlflow, uvicorn), SIGKILL to what stays."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        for _ in range(50):
            os.killpg(proc.pid, 0)  # raises once the whole group is gone
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def serving_ui(folder: Path) -> Iterator[Server]:
    """`poisonsweep ui` over a fresh SQLite store in ``folder``, launched in the background (beside
    ray.init, up while the sweep runs) and stopped at the end, whatever happened."""
    _require_chromium()
    uri, port, log = f"sqlite:///{folder / 'mlflow.db'}", free_port(), folder / "ui.log"
    with ThreadPoolExecutor(1) as pool:
        launch = pool.submit(_launch_ui, uri, port, log)
        try:
            yield Server(uri=uri, port=port, url=f"http://127.0.0.1:{port}", log=log, launch=launch, clock=Clock())
        finally:
            _stop(launch.result())


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """The MLflow UI over a fresh SQLite store, launched beside ray.init and up while the sweep runs."""
    with serving_ui(tmp_path_factory.mktemp("browser")) as server:
        yield server


def _launch_ui(uri: str, port: int, log: Path) -> subprocess.Popen:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).search_experiments()  # the schema exists before the server and the sweep both open it
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "sweeps.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_sweep_its_trials_tags_and_analysis(ui_server, ray_local, tmp_path, capsys,
                                                                    monkeypatch):
    from playwright.sync_api import sync_playwright  # the test extra

    server, clock = ui_server, ui_server.clock
    clock.step("ray.init")
    server.launch.result()
    clock.step("store created")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "storage": {"path": str(tmp_path / "results")}}))
    with ThreadPoolExecutor(1) as pool, sync_playwright() as pw:
        sweep = pool.submit(main, ["run", str(path), "--tracking-uri", server.uri])
        # while the sweep trains (mostly one core busy): the server comes up, Chromium loads the app once
        browser = pw.chromium.launch(executable_path=str(CHROMIUM))
        page = browser.new_page(viewport={"width": 1500, "height": 900})
        page.set_default_timeout(90_000)  # parsing MLflow's bundle is slow on a busy 2-core machine
        server.wait_ready()
        clock.mark("UI up")
        assert f"Uvicorn running on {server.url}" in server.log.read_text()  # loopback only
        page.goto(f"{server.url}/#/experiments")
        page.get_by_role("link", name="Experiments").first.wait_for()
        clock.mark("app loaded")
        assert sweep.result() == 0
        run_out = capsys.readouterr().out
        clock.step("sweep")
        assert main(["pareto", "--experiment", EXPERIMENT, "--tracking-uri", server.uri]) == 0
        clock.step("pareto")
        client, parent, children = launch_runs(server.uri, EXPERIMENT, "sweep")  # ids and names to look for
        assert len(children) == 2
        analysis = sorted(Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "analysis"))
        assert "pareto.csv" in analysis and any(name.endswith(".png") for name in analysis)

        assert (client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"]
                == "custom_model_development")
        names = sorted(c.info.run_name for c in children)
        assert [n.split(" ", 1)[0] for n in names] == ["001", "002"]
        assert all(re.fullmatch(r"00[12] backdoor·patch n=\d+ none s0", n) for n in names), names
        address = _ui_address(server, monkeypatch, capsys)
        assert address.removeprefix(server.url) in run_out  # run printed the same page (on the default port)
        page.goto(address)
        page.get_by_role("link", name=parent.info.run_name, exact=True).wait_for()
        assert "workflowType=machine_learning" in page.url and "/runs" in page.url  # the runs table, not GenAI
        search = page.locator("input[data-testid=search-box], [data-testid=search-box] input").first  # runs search
        assert search.input_value() == f"tags.launch = '{parent.data.tags['launch']}'"
        page.get_by_text("3 matching runs").wait_for()  # the parent and its two trials
        assert "orderByKey=metrics.%60attack_success%60" in page.url  # sorted by the first objective, best first:
        for name in names:  # so the trials are listed, not folded under the parent
            page.get_by_role("link", name=name, exact=True).wait_for()
        _check_runs_table(page, parent.info.run_name, names)
        runs_png = tmp_path / "mlflow-runs.png"
        page.screenshot(path=str(runs_png))
        clock.step("runs table")
        experiment = f"{server.url}/#/experiments/{parent.info.experiment_id}"
        page.goto(f"{experiment}/runs/{parent.info.run_id}")
        page.get_by_text("Non-dominated trials", exact=False).first.wait_for()  # the description, rendered
        for name in names:  # listed as child runs
            page.get_by_role("link", name=name, exact=True).first.wait_for()
        page.goto(f"{experiment}/runs/{parent.info.run_id}/artifacts")
        _check_artifacts(page, analysis)
        artifacts_png = tmp_path / "mlflow-artifacts.png"
        page.screenshot(path=str(artifacts_png))
        clock.step("artifacts")
        browser.close()
    print(f"\nscreenshots: {runs_png} {artifacts_png}")
    print(clock.breakdown())


def _ui_address(server: Server, monkeypatch, capsys) -> str:
    """The address `poisonsweep ui` prints for the experiment, on the test server's port (the
    server itself already runs: the command's `mlflow ui` is not started again)."""
    import sweeps.cli

    monkeypatch.setattr(sweeps.cli.subprocess, "call", lambda cmd, env: 0)
    assert main(["ui", "--tracking-uri", server.uri, "--experiment", EXPERIMENT, "--port", str(server.port)]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith(f"the latest launch of {EXPERIMENT}: {server.url}/#/experiments/"), line
    return line.split(": ", 1)[1]


def _check_runs_table(page, parent: str, children: list[str]) -> None:
    """The parent run, its trial runs under it, and their attack/defense/pareto tags as columns."""
    page.get_by_role("link", name=parent, exact=True).wait_for()
    _close_assistant(page)
    if not page.get_by_role("link", name=children[0], exact=True).count():
        # nested runs start folded under their parent: its row's expander shows them
        page.locator("[role=gridcell][col-id='attributes.`Run Name`']", has_text=parent).locator("button").click()
    for name in children:
        page.get_by_role("link", name=name, exact=True).wait_for()
    _toggle_columns(page, [*TAGS, "pareto", *OBJECTIVES], hide=["Dataset", "Source", "Models"])  # empty here
    for name in (parent, *children):
        cells = _row_text(page, name)
        if name == parent:
            assert not set(TAGS.values()) & set(cells), cells  # trial tags belong to the trials
        else:
            assert set(TAGS.values()) <= set(cells) and {"true", "false"} & set(cells), (name, cells)
    assert any("true" in _row_text(page, name) for name in children)  # the front has a member


def _toggle_columns(page, names: list[str], hide: list[str]) -> None:
    """Ticks columns in the runs table's column selector (found by their exact names), and unticks
    those attribute columns of ``hide`` that this MLflow has (listed first, so not searched for)."""
    page.get_by_test_id("column-selection-dropdown").first.click()
    search = page.get_by_placeholder("Search columns")
    for name in hide + names:
        search.fill(name if name in names else "")
        # a tree node whose whole text is the name: searching "utility" also lists clean_utility
        node = page.locator("[role=dialog] [class*=treenode]").filter(has_text=re.compile(rf"^{re.escape(name)}$"))
        if name in names or node.count():
            node.click()
    page.keyboard.press("Escape")
    for tag in TAGS:
        page.locator("[role=columnheader]", has_text=tag).first.wait_for()


def _row_text(page, run_name: str) -> list[str]:
    """The cell texts of one run's row: the grid draws pinned and scrolling columns as separate rows
    that share a row id."""
    link = page.get_by_role("link", name=run_name, exact=True)
    row_id = page.locator("[role=row][row-id]", has=link).get_attribute("row-id")
    return [text for row in page.locator(f"[role=row][row-id='{row_id}']").all()
            for text in row.inner_text().split("\n")]


def _check_artifacts(page, analysis: list[str]) -> None:
    """The parent run's artifact tree: the config, the trials table and the analysis folder's files;
    the first plot opened in the preview."""
    for name in ("config.yaml", "trials.csv", "analysis"):
        page.get_by_text(name, exact=True).first.wait_for()
    _close_assistant(page)
    page.get_by_text("analysis", exact=True).first.click()
    for name in analysis:
        page.get_by_text(name, exact=True).first.wait_for()
    plot = next(name for name in analysis if name.endswith(".png"))
    page.get_by_text(plot, exact=True).first.click()
    image = page.get_by_alt_text(f"analysis/{plot}", exact=True).first
    image.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())


def _close_assistant(page) -> None:
    """Closes the assistant panel that MLflow 3 opens beside every page (it hides half the table)."""
    close = page.get_by_role("button", name="Close")
    if close.count() and close.first.is_visible():
        close.first.click()
