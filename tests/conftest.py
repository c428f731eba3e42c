from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

from poison import DataSpec, load_dataset

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")


@pytest.fixture(scope="session")
def small_synthetic():
    """400 training + 40 test pairs of the built-in synthetic set."""
    return load_dataset(DataSpec(dataset="synthetic", size=400, test_size=40, seed=3))


@pytest.fixture(scope="module")
def ray_local():
    """Local Ray with two CPUs for the real sweeps of one test module (shut down after it)."""
    import ray

    from sweeps import _local_ray as local_ray

    local_ray.init(num_cpus=2)
    yield
    ray.shutdown()


def launch_runs(uri: str, experiment: str, role: str) -> tuple:
    """The MLflow client, the one parent run of ``role`` in ``experiment`` and its trial runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("poisonsweep.role") == role]
    assert len(parents) == 1, [r.data.tags.get("poisonsweep.role") for r in runs]
    children = [r for r in runs if r.data.tags.get("poisonsweep.role") == "trial"]
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    return client, parents[0], children


def backdoor(count: int = 20, **trigger) -> dict:
    return {"kind": "backdoor", "target": "blue circle", "poison_count": count,
            "trigger": {"kind": "patch", "size": 4, **trigger}}


_PICKED: set[int] = set()


def free_port() -> int:
    """A loopback TCP port free now, below the kernel's ephemeral range and never handed out
    twice in this process: a server started from it cannot lose it to a port the OS assigns
    meanwhile (Ray's workers and gRPC servers bind port 0, which draws from that range; a port
    from ``bind(0)`` could be taken between this call and the server's own bind)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(1000):
        port = random.randrange(10000, max(low, 10001))
        if port in _PICKED:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PICKED.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")
