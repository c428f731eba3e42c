"""What a person sees in a terminal during ``poisonsweep run``: our lines and a status line redrawn
in place, none of the libraries' own (Ray's token notice, MLflow creating its tables, alembic,
SQLAlchemy). The CLI runs in a subprocess on a pseudo-terminal, as from a shell, with a fresh
home (Ray writes its token there) and a fresh MLflow store (its tables are created): the
``terminal_sweep`` fixture (tests/conftest.py), whose run tests/sweeps/test_security.py reads too."""
import re

import pytest

NOISE = ["Creating initial MLflow database tables", "Updating database tables", "INFO mlflow", "alembic",
         "sqlalchemy", "Token authentication", "Warning", "WARNING", "INFO", "Started a local Ray instance"]


@pytest.mark.slow
def test_a_run_on_a_terminal_shows_our_lines_and_a_live_status_line_only(terminal_sweep):
    out = terminal_sweep[0].out
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
