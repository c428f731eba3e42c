"""What a person sees in a terminal during ``poisonsweep run``: our lines and a status line redrawn
in place, none of the libraries' own (Ray's token notice, MLflow creating its tables, alembic,
SQLAlchemy). The CLI runs in a subprocess on a pseudo-terminal, as from a shell, with a fresh
home (Ray writes its token there) and a fresh MLflow store (its tables are created)."""
import os
import pty
import re
import subprocess
import sys

import pytest
import yaml

from tests.support import backdoor

SWEEP = {"name": "terminal", "seed": 0, "data": {"size": 200, "test_size": 40},
         "train": {"epochs": 1, "batch_size": 64},
         "attack": {**backdoor(), "poison_count": {"low": 8, "high": 30, "log": True, "default": 12}},
         "search": {"num_samples": 2, "max_concurrent": 1}, "resources": {"cpu": 1}}
NOISE = ["Creating initial MLflow database tables", "Updating database tables", "INFO mlflow", "alembic",
         "sqlalchemy", "Token authentication", "Warning", "WARNING", "INFO", "Started a local Ray instance"]


def _run_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
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
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_a_run_on_a_terminal_shows_our_lines_and_a_live_status_line_only(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "storage": {"path": str(tmp_path / "results")}}))
    env = {**os.environ, "HOME": str(tmp_path / "home"), "TERM": "xterm"}
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "MLFLOW_LOGGING_LEVEL"):
        env.pop(key, None)
    code, out = _run_on_a_terminal([sys.executable, "-m", "sweeps.cli", "run", str(path), "--tracking-uri",
                                    f"sqlite:///{tmp_path / 'mlflow.db'}"], env)
    assert code == 0, out[-3000:]
    for noise in NOISE:
        assert noise not in out, (noise, out[-3000:])
    # the status line, redrawn in place (carriage return, erase the line) as the trials go
    statuses = re.findall(r"\r\x1b\[K(\d/2 trials done, \d running, \d failed[^\r\n]*)", out)
    assert "0/2 trials done, 1 running, 0 failed" in statuses
    assert any(re.fullmatch(r"1/2 trials done, [01] running, 0 failed, about \d+:\d\d left", s) for s in statuses)
    assert "2/2 trials done, 0 running, 0 failed" in statuses
    assert "trial 1/2 started:" in out and "trial 2/2 done: attack_success" in out
    assert "2 trials finished, 0 failed. Open the results with:" in out
    assert re.search(r"and this launch's runs at http://127\.0\.0\.1:5000/#/experiments/\d+/runs\?"
                     r"workflowType=machine_learning&searchFilter=tags\.launch%20%3D%20%27terminal-\d{8}-\d{6}%27", out)
