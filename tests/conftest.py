from __future__ import annotations

import os

import pytest

from poison import DataSpec, load_dataset

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")


@pytest.fixture(scope="session")
def small_synthetic():
    """400 training + 40 test pairs of the built-in synthetic set."""
    return load_dataset(DataSpec(dataset="synthetic", size=400, test_size=40, seed=3))


def backdoor(count: int = 20, **trigger) -> dict:
    return {"kind": "backdoor", "target": "blue circle", "poison_count": count,
            "trigger": {"kind": "patch", "size": 4, **trigger}}
