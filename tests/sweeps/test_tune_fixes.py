"""The repair of Tune's lost trial when a reused actor dies in its reset
(``sweeps/launch/_tune_fixes.py``), through real Ray Tune: without it, the second trial here ends
in ERROR with 1 failure of 2 allowed, the defect the chaos test met."""
from __future__ import annotations

import os
from pathlib import Path

from ray import tune
from ray.tune.execution.tune_controller import TuneController

from sweeps.launch._tune_fixes import repair_reset_failures


def test_a_trial_whose_reused_actor_dies_in_its_reset_is_retried_not_failed(tmp_path, ray_local):
    class Steps(tune.Trainable):
        """Two steps per trial; the first reset of an actor for a new trial kills its worker."""

        def setup(self, config):
            self.steps = 0

        def step(self):
            self.steps += 1
            return {"steps": self.steps, "done": self.steps >= 2}

        def save_checkpoint(self, folder):
            Path(folder, "steps").write_text(str(self.steps))

        def load_checkpoint(self, folder):
            self.steps = int(Path(folder, "steps").read_text())

        def reset_config(self, config):
            marker = Path(config["marker"])
            if not marker.exists():
                marker.write_text("died")
                os._exit(1)
            self.steps = 0
            return True

    repair_reset_failures()
    repair_reset_failures()  # once is enough: a second call does not wrap the wrapper
    assert not getattr(TuneController._trial_task_failure.__wrapped__, "poisonsweep_repair", False)
    marker = tmp_path / "marker"
    results = tune.Tuner(
        Steps, param_space={"marker": str(marker), "i": tune.grid_search([0, 1, 2])},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "results"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=2))).fit()
    assert marker.read_text() == "died"  # the fault happened: trial 1's reset killed its worker
    assert results.num_errors == 0
    assert sorted(r.config["i"] for r in results) == [0, 1, 2]
    assert [r.metrics["steps"] for r in results] == [2, 2, 2]
