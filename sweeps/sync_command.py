"""``poisonsweep sync FOLDER``: a launch's results from Tune's storage into MLflow, by hand."""
from __future__ import annotations

import os
from pathlib import Path

from sweeps import local_ray
from sweeps.config import read_yaml, validate_config
from sweeps.driver import Printer, TrialLogger, summary_csv
from sweeps.sync import LAUNCH_FILE, Launch
from sweeps.tracking import Tracker, redact, tracking_uri


def sync_launch(folder, cli_uri: str | None, *, printer: Printer = print) -> int:
    """Brings every trial of the launch in ``folder`` into MLflow and finishes its parent run;
    0 when MLflow has it all, 3 when the tracking store still fails. The store: ``--tracking-uri``,
    else the one the launch wrote to (its launch file says which), else as ``poisonsweep run``
    chooses one."""
    import ray

    launch = Launch.read(folder)
    sweep = validate_config(read_yaml(launch.config_yaml, str(Path(folder) / LAUNCH_FILE)), check_data=False)
    uri = tracking_uri(cli_uri or launch.tracking_uri, sweep)
    tracker = Tracker(uri, sweep)
    tracker.reopen_parent(launch.parent_run_id)
    logger = TrialLogger(sweep, tracker, printer)
    logger.reattach()
    before = {t: r.status for t, r in logger.mirror.runs.items()}
    if not ray.is_initialized():  # Tune reads its experiment state through a Ray session
        if os.environ.get("RAY_ADDRESS"):  # on a cluster node or inside `ray job submit`: join it
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        else:
            local_ray.init(num_cpus=1)
    if not logger.catch_up(folder):
        printer(f"MLflow at {redact(uri)} still fails; nothing lost: run this again when it answers")
        return 3
    tracker.finish_parent(summary_csv(logger.rows(), sweep))
    launch.finished = True
    launch.write(folder)
    changed = sum(before.get(t) != r.status for t, r in logger.mirror.runs.items())
    printer(f"{launch.run_name}: {len(logger.mirror.runs)} trial runs in MLflow ({changed} written now), "
            f"parent run {launch.parent_run_id} finished")
    return 0
