from __future__ import annotations

import os

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
