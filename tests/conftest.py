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


@pytest.fixture(scope="module")
def ray_local():
    """Local Ray with two CPUs for the real sweeps of one test module (shut down after it)."""
    import ray

    from sweeps import _local_ray as local_ray

    local_ray.init(num_cpus=2)
    yield
    ray.shutdown()


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

