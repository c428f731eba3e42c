"""Helpers the tests share: configs, processes, files and MLflow reads (fixtures are in conftest.py)."""
from __future__ import annotations

import gzip
import io
import os
import pty
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from PIL import Image

# -- configs and MLflow ------------------------------------------------------------------------

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


# -- sweeps in their own process ---------------------------------------------------------------

TINY = {
    "seed": 0,
    "data": {"size": 256, "test_size": 48},
    "train": {"epochs": 5, "batch_size": 64, "lr": 2.0e-3},
    "attack": {**backdoor(), "poison_count": {"low": 10, "high": 40, "log": True, "default": 20}},
    "search": {"num_samples": 2, "max_concurrent": 1, "max_failures": 1, "sampler": "random"},
    "resources": {"cpu": 1},
}


def write_sweep(tmp_path: Path, name: str, **extra) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, "name": name, "storage": {"path": str(tmp_path / "results")}, **extra}))
    return path


def children(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` with its command line (from /proc)."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError, ValueError):
                continue
    found, todo = {}, [pid]
    while todo:
        current = todo.pop()
        for child, parent in parents.items():
            if parent == current and child not in found:
                found[child] = commands[child]
                todo.append(child)
    return found


def kill_family(proc: subprocess.Popen) -> None:
    """SIGKILLs ``proc`` (started in a session of its own) and every process it started, those
    that left its process group included (Ray's), then reaps it."""
    family = list(children(proc.pid))
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)


class LaunchProcess:
    """``poisonsweep run`` in its own process group, its output read line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
        self.lines: list[str] = []

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                pytest.fail(f"the sweep ended before {text!r}:\n" + "".join(self.lines[-40:]))
            self.lines.append(line)
            if text in line:
                return
        pytest.fail(f"no {text!r} within {timeout} s:\n" + "".join(self.lines[-40:]))

    def kill_worker(self) -> None:
        """SIGKILLs the Ray worker process running the trial (Tune's function-trainable actor)."""
        workers = [p for p, cmd in children(self.proc.pid).items() if "ImplicitFunc" in cmd]
        assert len(workers) == 1, children(self.proc.pid)
        os.kill(workers[0], signal.SIGKILL)

    def kill_all(self) -> None:
        """SIGKILLs the driver and every process it started (Ray's included), like a lost head node."""
        kill_family(self.proc)

    def finish(self, timeout: float = 600) -> int:
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines.append(out)
        return self.proc.returncode


@dataclass
class TerminalRun:
    """A command run on a pseudo-terminal: its exit status, what the terminal showed, and what its
    process tree listened on while it ran (sampled every 0.25 s)."""
    code: int
    out: str
    listening: set[tuple[str, str, int]] = field(default_factory=set)  # (process name, address, port)
    gcs_auth_modes: set[str | None] = field(default_factory=set)     # RAY_AUTH_MODE in the GCS's environment


def listening_sockets(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``root`` and its descendants."""
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = proc.name()
            sockets = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        found |= {(name, s.laddr.ip, s.laddr.port) for s in sockets if s.status == psutil.CONN_LISTEN}
    return found


def run_on_a_terminal(args: list[str], env: dict[str, str], timeout: float = 600) -> TerminalRun:
    """Runs ``args`` with a pseudo-terminal as stdout and stderr, as from a shell, reading it to the
    end while a thread samples the listening sockets of the process and everything it starts."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    run, stop = TerminalRun(code=-1, out=""), threading.Event()

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set() and proc.poll() is None:
            try:
                run.listening.update(listening_sockets(root))
                run.gcs_auth_modes.update(p.environ().get("RAY_AUTH_MODE") for p in root.children(recursive=True)
                                          if p.name() == "gcs_server")
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    run.code = proc.wait(timeout=timeout)
    stop.set()
    sampler.join()
    run.out = b"".join(chunks).decode(errors="replace")
    return run


# -- files -------------------------------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}


def noisy_image(colour: tuple[int, int, int], size: tuple[int, int] = (24, 18), seed: int = 0) -> Image.Image:
    noise = np.random.default_rng(seed).integers(-8, 9, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))


def encoded_image(colour: tuple[int, int, int], fmt: str = "JPEG", seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    noisy_image(colour, seed=seed).save(buffer, fmt)
    return buffer.getvalue()


def write_image(path: Path, colour: tuple[int, int, int], seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded_image(colour, "PNG" if path.suffix == ".png" else "JPEG", seed))
    return path


def mean_colour(image: np.ndarray) -> np.ndarray:
    return image.reshape(-1, 3).mean(0)
