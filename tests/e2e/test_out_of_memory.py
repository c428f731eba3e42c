"""A trial that runs out of memory, through the whole sweep (kept apart from ``test_faults.py``
so that the two test processes of ``make test`` share the suite's time evenly)."""
from __future__ import annotations

import optuna
import pytest

from tests.support import TINY, launch_runs, write_sweep


@pytest.mark.slow
def test_a_trial_out_of_memory_is_retried_then_failed_everywhere(tmp_path, ray_local, capsys):
    """Out of memory in the allocator (torch raises): the trial is retried once
    (``search.max_failures``), then FAILED in Tune, FAIL in Optuna, FAILED in MLflow with the
    allocator's message, and the sweep ends normally. (Killed for memory by the kernel or by
    Ray's memory monitor, a trial's worker dies as in the test above.)"""
    from sweeps.config._schema import load_config
    from sweeps.launch._driver import run_sweep

    def runs_out_of_memory(values, **kwargs) -> None:  # nested: Ray's workers get it by value
        """Reports its first epoch, then asks torch's allocator for 64 TiB (the machine has far
        less: the allocator refuses, as it does a batch or a model too large)."""
        import torch
        from ray import tune

        tune.report({"epoch_metrics": {"epoch": 1, "loss": 1.0}})
        torch.empty(1 << 46, dtype=torch.uint8)

    sweep = load_config(write_sweep(tmp_path, "oom", train={**TINY["train"], "epochs": 1},
                               search={**TINY["search"], "num_samples": 1}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines: list[str] = []
    outcome = run_sweep(sweep, tracking_uri=uri, printer=lines.append, trainable=runs_out_of_memory)
    out = "\n".join(lines)
    assert [r.status for r in outcome.rows] == ["FAILED"] and outcome.synced
    assert out.count("retrying from its last checkpoint (failure 1 of 1 allowed)") == 1
    assert "can't allocate memory" in outcome.rows[0].error
    client, parent, children = launch_runs(uri, "oom", "sweep")
    assert parent.info.status == "FINISHED" and [c.info.status for c in children] == ["FAILED"]
    assert "can't allocate memory" in children[0].data.tags["error"]
    study_name, _, study_url = parent.data.params["optuna.study"].partition(" in ")
    trials = optuna.load_study(study_name=study_name, storage=study_url).trials
    assert [t.state.name for t in trials] == ["FAIL"] and trials[0].values is None
