"""The MLflow layer against a real tracking server on loopback, over HTTP."""
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sweeps.config._schema import validate_config
from sweeps.tracking._client import Tracker
from tests.support import backdoor, free_port


@pytest.fixture
def server(tmp_path):
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_tracker_writes_parent_child_metrics_and_artifacts_over_http(server, tmp_path):
    sweep = validate_config({"name": "http", "data": {"size": 300, "test_size": 30},
                             "attack": {**backdoor(), "poison_count": {"low": 5, "high": 50, "default": 10}}})
    tracker = Tracker(server, sweep)
    parent = tracker.start_parent()
    child = tracker.start_trial("t1", sweep.resolve({"attack.poison_count": 7}), {"attack.poison_count": 7})
    tracker.log_metrics(child, {"utility": 0.5, "epoch": 1}, step=1)
    plan = tmp_path / "poison_plan.parquet"
    plan.write_bytes(b"PAR1")
    tracker.log_final(child, {"attack_success": 0.9, "poison_count": 7}, 1, tags={"plan_hash": "abc"})
    tracker.finish_trial(child, [plan])
    failed = tracker.start_trial("t2", sweep.default_trial, {})
    tracker.fail_trial(failed, "Traceback...\nFloatingPointError: boom")
    tracker.finish_parent("trial_id\nt1\n")

    client = MlflowClient(server)
    runs = {r.info.run_name: r for r in client.search_runs([tracker.experiment_id])}
    assert runs["t1"].data.tags["mlflow.parentRunId"] == parent
    assert runs["t1"].data.params["attack.poison_count"] == "7"
    assert runs["t1"].data.metrics == {"utility": 0.5, "epoch": 1.0, "attack_success": 0.9, "poison_count": 7.0}
    assert runs["t1"].info.status == "FINISHED" and runs["t2"].info.status == "FAILED"
    assert runs["t2"].data.tags["error"] == "FloatingPointError: boom"
    assert [a.path for a in client.list_artifacts(runs["t1"].info.run_id)] == ["poison_plan.parquet"]
    assert {a.path for a in client.list_artifacts(parent)} == {"config.yaml", "trials.csv"}
