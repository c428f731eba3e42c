"""The cluster set-ups: cluster.yaml against Ray's own schema, the KubeRay RayJob, and a real
two-node Ray cluster on this machine running a sweep submitted with ``ray job submit``.

The real cluster is scoped to this test: its own ports, temp dir and auth token, and a teardown
that stops only the processes it started (never ``ray stop``, which stops every Ray on the
machine, other people's included).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from tests.support import backdoor, free_port, launch_runs

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's: ray, mlflow and poisonsweep all come from here


# -- the configs in the repository ---------------------------------------------------------------

def _launcher_config(name: str = "cluster.yaml") -> dict[str, Any]:
    return yaml.safe_load((ROOT / name).read_text())


def _ray_image(cluster: dict[str, Any]) -> str:
    return cluster["docker"]["image"]


@pytest.mark.parametrize("name", ["cluster.yaml", "deploy/cluster-onprem.yaml"])
def test_launcher_configs_pass_ray_ups_own_validation(name):
    """What ``ray up`` does first: defaults filled in per provider, then Ray's JSON schema
    (ray/autoscaler/ray-schema.json) and its other checks."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    if not (Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").is_file():
        pytest.skip(f"ray {ray.__version__} ships no autoscaler schema")
    util.validate_config(util.prepare_config(_launcher_config(name)))


@pytest.mark.parametrize("name", ["cluster.yaml", "deploy/cluster-onprem.yaml"])
def test_launcher_configs_use_rays_gpu_image_and_join_with_a_token(name):
    cluster = _launcher_config(name)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu", _ray_image(cluster))
    assert _ray_image(cluster) == _ray_image(_launcher_config())
    assert any("pip install" in c and "poisonsweep" in c for c in cluster["setup_commands"])
    (head_start,) = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert "--head" in head_start and "--num-cpus=0" in head_start  # the head runs no trial
    # every node joins with token authentication, the token synced from the launching machine
    assert "/home/ray/.ray/auth_token" in cluster["file_mounts"]
    for command in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        assert command == "ray stop" or "RAY_AUTH_MODE=token ray start" in command


def test_cluster_yaml_head_takes_no_trial_and_gpu_workers_scale_from_zero():
    cluster = _launcher_config()
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    (workers,) = [t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]]
    assert workers["min_workers"] == 0 < workers["max_workers"]
    assert workers["node_config"]["IamInstanceProfile"]  # trials write Tune's storage on S3


def _rayjob_docs() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((ROOT / "deploy" / "kuberay" / "rayjob.yaml").read_text()))


def test_rayjob_has_what_kuberays_crd_requires():
    docs = _rayjob_docs()
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("poisonsweep run ")
    cluster = spec["rayClusterSpec"]
    head, workers = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head runs the driver, no trials
    assert len(workers) == 1 and workers[0]["groupName"]
    assert workers[0]["minReplicas"] < workers[0]["maxReplicas"] and cluster["enableInTreeAutoscaling"]
    head_container = head["template"]["spec"]["containers"][0]
    worker_container = workers[0]["template"]["spec"]["containers"][0]
    assert worker_container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    uri = {e["name"]: e for e in head_container["env"]}["MLFLOW_TRACKING_URI"]
    assert set(uri["valueFrom"]["secretKeyRef"]) == {"name", "key"}
    # the same Ray version and Python as cluster.yaml's image
    tag = _ray_image(_launcher_config()).rpartition(":")[2]
    assert {c["image"].rpartition(":")[2] for c in (head_container, worker_container)} == {tag}
    assert cluster["rayVersion"] == ray.__version__


def test_rayjob_image_is_built_on_the_cluster_yaml_image_and_its_sweep_validates():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"FROM {_ray_image(_launcher_config())}" in dockerfile.splitlines()
    (config_map,) = [d for d in _rayjob_docs() if d["kind"] == "ConfigMap"]
    from sweeps.config._schema import validate_config

    for text in config_map["data"].values():
        validate_config(yaml.safe_load(text), check_data=False)


# -- a real two-node cluster on this machine -----------------------------------------------------

SWEEP = {
    "name": "cluster",
    "seed": 0,
    "data": {"size": 400, "test_size": 48},
    "train": {"epochs": 1, "batch_size": 64, "lr": 2.0e-3},
    "attack": {**backdoor(), "poison_count": {"low": 10, "high": 80, "log": True, "default": 30}},
    "search": {"num_samples": 2, "max_concurrent": 2},
    "resources": {"cpu": 1, "gpu": 0.5},  # only the second node has a GPU: both trials share it
}



def _wait(what: str, check: Callable[[], Any], timeout: float, procs: list[subprocess.Popen] = ()) -> Any:
    """Polls ``check`` until it returns something truthy; fails naming ``what`` on timeout or
    when one of ``procs`` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            pytest.fail(f"{what}: {dead[0][:3]} exited")
        time.sleep(0.25)
    pytest.fail(f"{what}: not within {timeout:g} s")


class _Cluster:
    """A Ray head (1 CPU, no GPU) and a second node (2 CPUs, 1 declared GPU), plus an MLflow
    tracking server, all on loopback; every process is started here and stopped here."""

    def __init__(self, tmp: Path) -> None:
        # one temp dir per node, as on separate machines (a shared one makes each node's runtime-env
        # agent delete the other's unpacked --working-dir); short, for Unix socket paths
        self.temp_dirs = {name: tempfile.mkdtemp(prefix=f"raycl-{name}-", dir="/tmp") for name in ("head", "gpu")}
        self.tmp, self.token, self.procs, self.logs = tmp, uuid.uuid4().hex, [], []
        self.ray_nodes: list[subprocess.Popen] = []  # the two ``ray start --block``
        self.gcs, self.dashboard, self.mlflow_port = free_port(), free_port(), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                        RAY_enable_metrics_collection="0",
                        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        self.logs.append(log)
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=self.tmp)
        self.procs.append(proc)
        return proc

    def _ray_start(self, name: str, args: list[str]) -> subprocess.Popen:
        """``ray start --block`` of node ``name`` (its own ports and temp dir) with ``args``."""
        ports = {"node-manager-port": free_port(), "object-manager-port": free_port(),
                 "dashboard-agent-listen-port": free_port(), "dashboard-agent-grpc-port": free_port(),
                 "runtime-env-agent-port": free_port(), "metrics-export-port": free_port(),
                 "min-worker-port": 0, "max-worker-port": 0}  # 0: ports the OS picks
        node = self._start(name, [
            str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dirs[name]}",
            "--object-store-memory=100000000", "--disable-usage-stats", "--include-log-monitor=false",
            *args, *(f"--{k}={v}" for k, v in ports.items())])
        self.ray_nodes.append(node)
        return node

    def start_head(self) -> subprocess.Popen:
        return self._ray_start("head", [
            "--head", f"--port={self.gcs}", "--num-cpus=1", "--num-gpus=0", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard}", f"--ray-client-server-port={free_port()}"])

    def start_gpu_node(self, cpus: int = 2, gpus: int = 1) -> subprocess.Popen:
        return self._ray_start("gpu", [f"--address=127.0.0.1:{self.gcs}", f"--num-cpus={cpus}", f"--num-gpus={gpus}"])

    def kill_node(self, node: subprocess.Popen) -> list[int]:
        """SIGKILLs every process of ``node`` (its ``ray start``, raylet and workers: they share
        its session), as when a machine is lost; returns their pids."""
        pids = [pid for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()) if _session(pid) == node.pid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        node.wait(30)
        return pids

    def start_mlflow(self) -> subprocess.Popen:
        self.env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner: six processes fewer
        return self._start("mlflow", [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
            "--backend-store-uri", f"sqlite:///{self.tmp / 'mlflow.db'}",
            "--artifacts-destination", str(self.tmp / "artifacts"), "--workers", "1"])

    def api(self, path: str) -> Any:
        """GET on the dashboard's HTTP API, with the cluster's token."""
        request = urllib.request.Request(f"{self.dashboard_url}{path}",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def nodes(self) -> list[dict[str, Any]]:
        found = self.api("/api/v0/nodes?detail=1&limit=100")["data"]["result"]["result"]
        return [n for n in found if n["state"] == "ALIVE"]

    def ray(self, *args: str) -> subprocess.Popen:
        """Starts the ``ray`` CLI against this cluster (its output in ``<args[1]>.log``: submit.log)."""
        return self._start(args[1], [str(BIN / "ray"), *args])

    def stop(self) -> None:
        """SIGTERM to every process started here (a ``ray start --block`` then stops its node's
        processes), then SIGKILL to anything left in their sessions or naming one of this
        cluster's temp dirs; never ``ray stop``, which stops every Ray on the machine."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        sessions = {p.pid for p in self.procs}
        for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
            if pid != os.getpid() and (_session(pid) in sessions
                                       or any(d in part for d in self.temp_dirs.values()
                                              for part in _cmdline(pid) or ())):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for folder in self.temp_dirs.values():
            shutil.rmtree(folder, ignore_errors=True)
        for log in self.logs:
            log.close()


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _cmdline(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return None


class _Laps:
    """Wall time per step, printed as the test's timing breakdown."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.mark = time.monotonic()

    def __call__(self, name: str) -> None:
        self.times[name], self.mark = time.monotonic() - self.mark, time.monotonic()

    def __str__(self) -> str:
        steps = ", ".join(f"{k} {v:.1f}" for k, v in self.times.items())
        return f"timing (s): {steps}; total {sum(self.times.values()):.1f}"


def _bring_up_and_submit(cluster: _Cluster, config: Path, lap: _Laps) -> str:
    """Starts the MLflow server, the head and the GPU node, and submits the sweep as a job; its id."""
    mlflow, head = cluster.start_mlflow(), cluster.start_head()  # all three start at once
    _wait("the Ray head's GCS", lambda: socket.create_connection(("127.0.0.1", cluster.gcs), 1), 60, [head])
    node = cluster.start_gpu_node()
    _wait("the Ray job server", lambda: cluster.api("/api/jobs/") is not None, 60, [head])
    lap("ray head up")
    # The README's command, submitted while the GPU node joins and the MLflow server starts:
    # the driver's imports take longer, and MLflow's client retries a refused connection.
    job = f"sweep-{uuid.uuid4().hex[:8]}"
    submit = cluster.ray("job", "submit", "--address", cluster.dashboard_url, "--submission-id", job,
                         "--no-wait", "--working-dir", str(ROOT), "--", "poisonsweep", "run", str(config),
                         "--address", "auto", "--tracking-uri", cluster.tracking_uri)
    _wait("the MLflow server", lambda: urllib.request.urlopen(f"{cluster.tracking_uri}/health", timeout=1),
          60, [mlflow])
    assert submit.wait(timeout=60) == 0, (cluster.tmp / "submit.log").read_text()
    lap("ray job submit + mlflow server up")
    _wait("the GPU node", lambda: [n for n in cluster.nodes() if n["resources_total"].get("GPU")], 60, [head, node])
    lap("gpu node up (waited for)")
    return job


def _run_to_the_end(cluster: _Cluster, job: str) -> tuple[str, list[str] | None]:
    """Waits for the job's end; its status and its driver's command line (seen while it ran)."""
    driver: dict[str, Any] = {}

    def finished() -> str | None:
        info = cluster.api(f"/api/jobs/{job}")
        if info.get("driver_info") and "cmdline" not in driver:
            driver["cmdline"] = _cmdline(int(info["driver_info"]["pid"]))
        return info["status"] if info["status"] in {"SUCCEEDED", "FAILED", "STOPPED"} else None

    status = _wait("the sweep job", finished, 300, cluster.ray_nodes)
    return status, driver.get("cmdline")


def _placement(cluster: _Cluster) -> dict[str, set[str]]:
    """The nodes ("head", "gpu") that ran the trials, the clean-model task and the job's driver."""
    role = {n["node_id"]: "head" if n["is_head_node"] else "gpu" for n in cluster.nodes()}
    actors = cluster.api("/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
    tasks = cluster.api("/api/v0/tasks?detail=1&limit=1000")["data"]["result"]["result"]
    return {
        "trials": {role[a["node_id"]] for a in actors if a["class_name"] == "ImplicitFunc"},  # Tune's trainable
        "clean model": {role[t["node_id"]] for t in tasks if t["name"] == "train_clean"},
        "driver": {role[a["node_id"]] for a in actors if a["class_name"] == "JobSupervisor"},
    }


@pytest.mark.slow
def test_a_submitted_sweep_runs_its_trials_on_the_gpu_node_into_an_mlflow_server(tmp_path):
    lap = _Laps()
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**SWEEP, "storage": {"path": str(tmp_path / "results")}}))
    cluster = _Cluster(tmp_path)
    try:
        job = _bring_up_and_submit(cluster, config, lap)
        status, driver = _run_to_the_end(cluster, job)
        lap("job ran")
        logs = cluster.api(f"/api/jobs/{job}/logs")["logs"]
        print(logs)
        assert status == "SUCCEEDED", logs[-3000:]
        assert driver and Path(driver[0]).parent == BIN, driver  # the venv's Python ran poisonsweep

        client, parent, children = launch_runs(cluster.tracking_uri, "cluster", "sweep")
        assert parent.info.status == "FINISHED"
        assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
        assert all("attack_success" in c.data.metrics for c in children)
        assert _placement(cluster) == {"trials": {"gpu"}, "clean model": {"gpu"}, "driver": {"head"}}
        # half a GPU each: the node's one GPU held both trials at once, each in an actor of its own
        # (one at a time, the second trial would have reused the first one's actor: reuse_actors)
        actors = cluster.api("/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
        assert len([a for a in actors if a["class_name"] == "ImplicitFunc"]) == 2, actors
        lap("checks")
    finally:
        cluster.stop()
        lap("teardown")
        print(lap)


@pytest.mark.slow
def test_a_node_lost_mid_trial_its_trial_resumes_elsewhere_from_its_checkpoint(tmp_path):
    """Two trials on a head and a second node of one CPU each, one trial per node; the second
    node is SIGKILLed (raylet, workers and all) once both trials have checkpointed epoch 2. Its
    trial is retried on the head from that checkpoint, the other is not disturbed, and MLflow
    ends with one complete child run per trial.

    Should the first trial end before the second reaches epoch 3 (under load a trial's start lags
    by several seconds), the kill would hit no trial: the scenario is then tried once more on a
    fresh cluster, and two such runs fail the test."""
    if not _lose_a_node_mid_trial(tmp_path / "first"):
        assert _lose_a_node_mid_trial(tmp_path / "second"), "the two trials never ran side by side"


def _lose_a_node_mid_trial(tmp_path: Path) -> bool:
    """The scenario and its checks; False, before any kill, when the trials did not overlap."""
    from tests.support import LaunchProcess

    tmp_path.mkdir()
    lap = _Laps()
    # room after epoch 3: at 6 epochs of 256 pairs one CI run's second-node trial ended first, and at 8
    # under load (the other shard training) the second trial started 6-10 s after the first, which
    # then ended before the second reached epoch 3
    epochs = 20
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        **SWEEP, "name": "lost-node", "storage": {"path": str(tmp_path / "results")},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 2.0e-3},
        "search": {"num_samples": 2, "max_concurrent": 2, "max_failures": 1},
        "resources": {"cpu": 1}}))
    cluster = _Cluster(tmp_path)
    # the GCS declares a silent node dead after 3 missed health checks 0.5 s apart (default: 5, 3 s)
    cluster.env.update(RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="500",
                       RAY_health_check_failure_threshold="3")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        head = cluster.start_head()
        _wait("the Ray head's GCS", lambda: socket.create_connection(("127.0.0.1", cluster.gcs), 1), 60, [head])
        second = cluster.start_gpu_node(cpus=1, gpus=0)
        _wait("the second node", lambda: len(cluster.nodes()) == 2, 60, [head, second])
        lap("cluster up")
        launch = LaunchProcess(str(config), "--address", f"127.0.0.1:{cluster.gcs}", "--tracking-uri", uri, env=cluster.env)
        try:
            for trial in (1, 2):  # once epoch 3 is reported, epoch 2's checkpoint is registered
                if not any(f"trial {trial}/2 epoch 3/{epochs}" in line for line in launch.lines):
                    launch.wait_for(f"trial {trial}/2 epoch 3/{epochs}", timeout=240)
            if any(f"trial {trial}/2 done" in line for line in launch.lines for trial in (1, 2)):
                print("the trials ran one after the other:", "".join(launch.lines[-20:]))
                return False
            lap("both trials past epoch 2")
            assert cluster.kill_node(second)
            assert launch.finish(timeout=300) == 0, "".join(launch.lines[-40:])
            lap("sweep finished without the node")
        finally:
            if launch.proc.poll() is None:
                launch.kill_all()
        out = "".join(launch.lines)
        assert out.count("retrying from its last checkpoint (failure 1 of 1 allowed)") == 1, out[-3000:]
        assert "2 trials finished, 0 failed" in out

        client, parent, children = launch_runs(uri, "lost-node", "sweep")
        assert parent.info.status == "FINISHED" and len(children) == 2
        for child in children:
            assert child.info.status == "FINISHED"
            steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
            assert steps == list(range(1, epochs + 1))  # every epoch once, though one trial trained on two nodes
        # the lost trial went on from its checkpoint; the head's trial ran once, from the start
        resumed = [c.data.metrics["resumed_from_epoch"] for c in children if "resumed_from_epoch" in c.data.metrics]
        assert len(resumed) == 1 and resumed[0] >= 2, resumed
        assert [n["is_head_node"] for n in cluster.nodes()] == [True]  # the sweep ended on the head alone
        return True
    finally:
        cluster.stop()
        lap("teardown")
        print(lap)
