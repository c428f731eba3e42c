from __future__ import annotations

import os
import sys

import pytest

from poison import DataSpec, load_dataset

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")


@pytest.fixture(scope="session")
def small_synthetic():
    """400 training + 40 test pairs of the built-in synthetic set."""
    return load_dataset(DataSpec(dataset="synthetic", size=400, test_size=40, seed=3))


@pytest.fixture(scope="session", autouse=True)
def mlflow_tables_copied(tmp_path_factory):
    """A new SQLite MLflow store in this test process gets its tables as a copy of one store's,
    made by MLflow's own ``_initialize_tables`` once per run, rather than by running its schema
    migrations again (about 1.3 s each, for each of the suite's stores). The copy is
    SQLite's backup of that database: the same tables at the same schema revision. Stores made by
    the processes the tests start (a CLI run, a tracking server) migrate as usual."""
    import contextlib
    import sqlite3

    from mlflow.store.db import utils

    original = utils._initialize_tables
    template = tmp_path_factory.mktemp("mlflow-tables") / "tables.db"

    def initialize(engine):
        path = engine.url.database if engine.dialect.name == "sqlite" else None
        if not path or path == ":memory:":
            return original(engine)
        if not template.exists():
            import sqlalchemy

            made = sqlalchemy.create_engine(f"sqlite:///{template}")
            original(made)
            made.dispose()
        with contextlib.closing(sqlite3.connect(template)) as source, contextlib.closing(sqlite3.connect(path)) as copy:
            source.backup(copy)
        return None

    utils._initialize_tables = initialize
    yield
    utils._initialize_tables = original


@pytest.fixture(scope="session")
def ray_local():
    """Local Ray with two CPUs for the real sweeps in this test process, started by the first test
    that asks and shut down at the end: its servers start, and its workers import torch, once
    rather than once per module."""
    import ray

    from sweeps import _local_ray as local_ray

    if not ray.is_initialized():
        local_ray.init(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def terminal_sweep(tmp_path_factory):
    """One real ``poisonsweep run`` (two one-epoch trials) on a pseudo-terminal, as from a shell,
    with a fresh home (Ray writes its token there) and a fresh MLflow store (its tables are
    created), the listening sockets of everything it starts sampled as it runs: what a person
    sees (tests/e2e/test_terminal.py) and what the network sees (tests/sweeps/test_security.py)
    of one run. (TerminalRun, the home folder.)"""
    import yaml

    from tests.support import backdoor, run_on_a_terminal

    folder = tmp_path_factory.mktemp("terminal")
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "terminal", "seed": 0, "data": {"size": 200, "test_size": 40}, "train": {"epochs": 1, "batch_size": 64},
        "attack": {**backdoor(), "poison_count": {"low": 8, "high": 30, "log": True, "default": 12}},
        "search": {"num_samples": 2, "max_concurrent": 1}, "resources": {"cpu": 1},
        "storage": {"path": str(folder / "results")}}))
    env = {**os.environ, "HOME": str(folder / "home"), "TERM": "xterm"}
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "MLFLOW_LOGGING_LEVEL"):
        env.pop(key, None)
    run = run_on_a_terminal([sys.executable, "-m", "sweeps.cli", "run", str(path), "--tracking-uri",
                             f"sqlite:///{folder / 'mlflow.db'}"], env)
    assert run.code == 0, run.out[-3000:]
    return run, folder / "home"


_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Ends the process with pytest's own exit status once every report is written, skipping
    the interpreter's teardown: there, a thread left by a library (Ray's, Playwright's, gRPC's)
    once jumped into freed code and the process died with SIGSEGV after all its tests had passed
    (exit 139 with "132 passed" printed). Nothing a test asserts runs after this point."""
    if _EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[_EXIT_STATUS])

