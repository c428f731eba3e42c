"""Faults a long sweep meets, each for real: a trial's worker killed mid-trial, the driver
killed mid-sweep (then ``run --resume``), the tracking server down (then ``poisonsweep sync``)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from sweeps.cli import main
from tests.support import TINY, LaunchProcess, free_port, launch_runs, write_sweep


@pytest.mark.slow
def test_a_killed_worker_and_a_killed_driver_lose_nothing(tmp_path, ray_local, capsys):
    """Trial 1's worker is SIGKILLed after its first epoch: Tune retries it from that epoch's
    checkpoint. Then the whole launch is SIGKILLed during trial 2: ``run --resume`` goes on
    from trial 2's last checkpoint, trial 1 is not run again, and MLflow ends with exactly
    one complete child run per trial."""
    config, uri = write_sweep(tmp_path, "faults"), f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = LaunchProcess(str(config), "--tracking-uri", uri)
    try:
        # Tune registers an epoch's checkpoint just after the epoch's report reaches the
        # callbacks: once epoch 2 is reported, epoch 1's checkpoint is surely registered
        first.wait_for("trial 1/2 epoch 2/5")
        first.kill_worker()
        first.wait_for("trial 1/2 failed")
        first.wait_for("trial 1/2 done")
        first.wait_for("trial 2/2 epoch 1/5")
        time.sleep(1.5)  # Tune saves its experiment state every second (TUNE_GLOBAL_CHECKPOINT_S)
    finally:
        first.kill_all()
    out = "".join(first.lines)
    assert "retrying from its last checkpoint (failure 1 of 1 allowed)" in out
    assert "trial 1/2 restarted" in out

    assert main(["run", str(config), "--tracking-uri", uri, "--resume"]) == 0
    resumed = capsys.readouterr().out
    assert "resuming faults-" in resumed and "trial 1/2 started" not in resumed and "trial 1/2 restarted" not in resumed
    assert "trial 2/2 restarted" in resumed and "2 trials finished, 0 failed" in resumed

    client, parent, children = launch_runs(uri, "faults", "sweep")
    assert parent.info.status == "FINISHED" and len(children) == 2
    by_number = {c.data.tags["trial_number"]: c for c in children}  # each run named after its number
    assert set(by_number) == {"1", "2"}
    assert {c.info.run_name.split(" ", 1)[0] for c in children} == {"001", "002"}
    for child in children:
        assert child.info.status == "FINISHED"
        # each epoch in MLflow exactly once, though both trials trained some epochs in two processes
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [1, 2, 3, 4, 5]
        assert child.data.metrics["poison_count"] == int(child.data.params["attack.poison_count"])
    # both went on from a checkpoint, not from scratch
    assert by_number["1"].data.metrics["resumed_from_epoch"] >= 1
    assert by_number["2"].data.metrics["resumed_from_epoch"] >= 1
    study_name, _, study_url = parent.data.params["optuna.study"].partition(" in ")
    study = optuna.load_study(study_name=study_name, storage=study_url)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE"]
    # a finished launch has nothing to resume
    assert main(["run", str(config), "--tracking-uri", uri, "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err



class TrackingServer:
    """``mlflow server`` on loopback over a SQLite store, stopped and started again at will."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.proc = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runner: fewer processes
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            self.proc = None


@pytest.mark.slow
def test_a_tracking_server_down_mid_sweep_loses_nothing(tmp_path, ray_local, monkeypatch):
    """The MLflow server dies during trial 1 and is back when trial 2 starts: the driver writes
    what MLflow missed from Tune's storage as soon as it answers (live writes pause 1 s after a
    failure here, 15 s by default). It dies again during trial 2 and stays down to the end: the
    sweep still runs every trial, says how to sync, and ``poisonsweep sync`` then writes exactly
    what Tune recorded once the server is back (no run twice, no epoch twice)."""
    import functools

    import sweeps.tracking._logger as logger
    from sweeps.config._schema import load_config
    from sweeps.launch._driver import run_sweep
    from sweeps.tracking._mirror import Backoff

    monkeypatch.setattr(logger, "Backoff", functools.partial(Backoff, seconds=1.0))
    server = TrackingServer(tmp_path)
    server.start()
    lines: list[str] = []
    sweep = load_config(write_sweep(tmp_path, "outage", train={**TINY["train"], "epochs": 2}))

    def printer(line: str) -> None:
        lines.append(line)
        if "trial 1/2 epoch 1/2" in line or "trial 2/2 epoch 1/2" in line:
            server.stop()  # after the trial's run and first epoch reached MLflow
        elif "trial 2/2 started" in line:
            server.start()  # the driver waits for it here; trial 2 goes on once it answers

    def check(client, child, row) -> None:
        assert child.info.status == "FINISHED" and child.data.tags["trial_id"] == row.trial_id
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [1, 2]
        assert child.data.metrics["attack_success"] == row.metrics["attack_success"]
        assert {"poison_plan.parquet", "trial_config.yaml"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
    try:
        outcome = run_sweep(sweep, tracking_uri=server.uri, printer=printer)
        assert not outcome.synced and [r.status for r in outcome.rows] == ["FINISHED"] * 2
        out = "\n".join(lines)
        assert out.count("MLflow unreachable (") >= 2 and f"poisonsweep sync {outcome.folder}" in out
        back = out.index("MLflow answers again")  # caught up while the sweep ran
        assert out.index("trial 2/2 started") < back < out.index("trial 2/2 epoch 1/2")
        server.start()
        client, parent, children = launch_runs(server.uri, "outage", "sweep")
        first = min(children, key=lambda c: c.info.run_name)
        check(client, first, outcome.rows[0])  # trial 1 is complete already, without a sync
        assert main(["sync", outcome.folder, "--tracking-uri", server.uri]) == 0
        assert main(["sync", outcome.folder, "--tracking-uri", server.uri]) == 0  # idempotent
        client, parent, children = launch_runs(server.uri, "outage", "sweep")
        assert parent.info.status == "FINISHED" and len(children) == 2
        assert "trials.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
        for child, row in zip(sorted(children, key=lambda c: c.info.run_name), outcome.rows):
            check(client, child, row)
    finally:
        server.stop()
