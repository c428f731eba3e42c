"""A sweep under a seeded schedule of faults: trial workers killed, the tracking server killed and
restarted, the whole launch killed and resumed. It ends with every trial in MLflow exactly once
with all its epochs, and prints what it held and survived.

The trials are fixed, short work (a few tenths of a second per epoch, a checkpoint of a few bytes
per epoch) through poisonsweep's real driver, Tune, Optuna, trial logger and MLflow client: what
is tested is the machinery, not the training (``tests/e2e/test_faults.py`` kills real trials)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sweeps.tracking import LOST_TAG
from tests.e2e.test_faults import TrackingServer
from tests.support import TINY, children, kill_family, launch_runs

pytestmark = pytest.mark.slow

TRIALS, EPOCHS = 50, 3
SEED = int(os.environ.get("CHAOS_SEED", 2026))  # another schedule of faults: CHAOS_SEED=7 pytest ...
WORKER_KILLS, SERVER_RESTARTS, DRIVER_KILLS = 6, 2, 2
CHECKPOINT_GONE = "Could not recover from checkpoint as it does not exist on storage anymore"  # Tune's words

#: The launch: poisonsweep's own driver with a trainable of fixed work (by value: defined here).
DRIVER = '''
import functools, json, sys, tempfile, time
from pathlib import Path

def trainable(values, *, raw, dims, cache_dir, threads, objectives, every=1, **_):
    import pyarrow.parquet as pq
    import yaml
    from ray import tune
    from poison.attacks import empty_plan
    from sweeps._files import CONFIG_FILE, METRICS_FILE, PLAN_FILE
    from sweeps.config import resolve

    from sweeps.launch._trainable import report_final_again

    if report_final_again():  # restored from its final checkpoint, as the real trainable does
        return
    config = resolve(raw, dims, values)
    first = 1
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            first = int((Path(folder) / "epoch").read_text()) + 1
    for epoch in range(first, config.train.epochs + 1):
        time.sleep(WORK)
        metrics = {"epoch": epoch, "loss": 1.0 / epoch, "utility": 0.5, "attack_success": 0.1 * epoch}
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "epoch").write_text(str(epoch))
            tune.report({"epoch_metrics": metrics}, checkpoint=tune.Checkpoint.from_directory(folder))
    final = {"utility": 0.5, "attack_success": 0.3, "poison_count": config.attack.poison_count}
    with tempfile.TemporaryDirectory() as folder:
        pq.write_table(empty_plan(), Path(folder) / PLAN_FILE)
        (Path(folder) / METRICS_FILE).write_text(json.dumps(final))
        (Path(folder) / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict()))
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(folder))

if __name__ == "__main__":
    import sweeps.tracking._logger as logger
    from sweeps.config import load_config
    from sweeps.launch import run_sweep
    from sweeps.tracking import Backoff

    WORK = float(sys.argv[4])
    logger.Backoff = functools.partial(Backoff, seconds=1.0)  # live writes retry after 1 s, not 15
    outcome = run_sweep(load_config(sys.argv[1]), tracking_uri=sys.argv[2], resume=sys.argv[3] == "resume",
                        trainable=trainable, printer=lambda line: print(line, flush=True))
    print(f"SYNCED {outcome.synced}", flush=True)
'''


class Driver:
    """One launch of the sweep in its own process group; its lines read as they come."""

    def __init__(self, script: Path, config: Path, uri: str, resume: bool) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(config), uri, "resume" if resume else "new", "0.15"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        self.lines: list[str] = []

    def line(self) -> str:
        line = self.proc.stdout.readline()
        self.lines.append(line)
        return line

    def workers(self) -> list[int]:
        return [p for p, cmd in children(self.proc.pid).items() if "ImplicitFunc" in cmd]

    def kill(self) -> None:
        kill_family(self.proc)


def test_a_sweep_survives_a_seeded_schedule_of_faults_and_loses_nothing(tmp_path):
    """50 trials of 3 epochs, 2 at a time. At epoch reports drawn with a fixed seed: 6 trial
    workers are SIGKILLed, the tracking server is killed twice (restarted 3 s later), and the whole
    launch is SIGKILLed twice and resumed with ``--resume``. MLflow ends with one FINISHED run per
    trial of Tune's record, each epoch once (each runs to its end, see below), a KILLED run for each
    trial a killed driver started but Tune never recorded, and the parent run FINISHED. About 2-3
    minutes on 2 cores."""
    server = TrackingServer(tmp_path)
    server.start()
    config = tmp_path / "chaos.yaml"
    config.write_text(yaml.safe_dump({
        **TINY, "name": "chaos", "train": {**TINY["train"], "epochs": EPOCHS},
        "search": {"num_samples": TRIALS, "max_concurrent": 2, "max_failures": 10, "sampler": "random"},
        "storage": {"path": str(tmp_path / "results")}}))
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    rng = random.Random(SEED)
    # the faults, each at an epoch report drawn with the seed (of the 150 the trials make; a resumed
    # launch reports some again), the driver kills spread out; a fault waits for what it needs
    # (a live trial worker, a tracking server up)
    epochs = TRIALS * EPOCHS
    due = sorted([(n, "worker") for n in rng.sample(range(10, epochs - 30), WORKER_KILLS)]
                 + [(n, "server") for n in rng.sample(range(10, epochs - 30), SERVER_RESTARTS)]
                 + [(rng.randrange(30, 60), "driver"), (rng.randrange(80, 110), "driver")])
    held = {"worker": 0, "server": 0, "driver": 0}
    reports, restart_server_at, log = 0, None, []
    start = time.monotonic()
    driver = Driver(script, config, server.uri, resume=False)
    try:
        while True:
            line = driver.line()
            log.append(line)
            if restart_server_at is not None and time.monotonic() >= restart_server_at:
                server.start()
                restart_server_at = None
            if not line:
                assert driver.proc.wait(60) == 0, "".join(driver.lines[-30:])
                break
            if f"/{EPOCHS}: loss" not in line:
                continue
            reports += 1
            while due and due[0][0] <= reports:
                fault = due[0][1]
                if fault == "worker":
                    workers = driver.workers()
                    if not workers:
                        break  # at the next report
                    os.kill(rng.choice(workers), signal.SIGKILL)
                elif fault == "server":
                    if restart_server_at is not None:
                        break
                    server.stop()
                    restart_server_at = time.monotonic() + 3
                else:
                    time.sleep(1.5)  # Tune saves its experiment state every second
                    driver.kill()
                    if restart_server_at is not None:
                        server.start()
                        restart_server_at = None
                    driver = Driver(script, config, server.uri, resume=True)
                held[fault] += 1
                due.pop(0)
        Path(os.environ.get("CHAOS_LOG", os.devnull)).write_text("".join(log))
        assert "SYNCED True" in "".join(driver.lines)
        assert not any("View run" in line for line in log)  # MLflow's link per ended run, on a server
        seconds = time.monotonic() - start

        client, parent, runs = launch_runs(server.uri, "chaos", "sweep")
        from ray.tune import ExperimentAnalysis

        (folder,) = (tmp_path / "results").glob("chaos-*")
        record = {t.trial_id: t.status for t in ExperimentAnalysis(str(folder)).trials}  # Tune's record
        recorded, done = set(record), {t for t, status in record.items() if status == "TERMINATED"}
        by_trial: dict[str, list] = {}
        for run in runs:
            by_trial.setdefault(run.data.tags["trial_id"], []).append(run)
        finished = [r for r in runs if r.info.status == "FINISHED"]
        lost = len(recorded - set(by_trial))
        duplicated = sum(len(rs) - 1 for rs in by_trial.values())
        # a trial that started in the second before a driver kill, before Tune saved it, is not in
        # Tune's record: its run is KILLED and says why
        abandoned = [r for r in runs if r.data.tags["trial_id"] not in recorded]
        print(f"\nchaos: {len(recorded)} trials of {EPOCHS} epochs in {seconds:.0f} s; faults held: "
              f"{held['worker']} trial workers killed, {held['server']} tracking-server restarts, "
              f"{held['driver']} driver kills resumed; runs lost: {lost}, runs duplicated: {duplicated}; "
              f"trials finished {len(done)}, failed {len(recorded) - len(done)}; runs of trials Tune never "
              f"recorded, marked KILLED: {len(abandoned)}")
        assert held == {"worker": WORKER_KILLS, "server": SERVER_RESTARTS, "driver": DRIVER_KILLS}, due
        assert parent.info.status == "FINISHED"
        assert lost == 0 and duplicated == 0
        # MLflow says what Tune recorded: FINISHED for a finished trial, FAILED for a failed one
        assert {t: rs[0].info.status for t, rs in by_trial.items() if t in recorded} == {
            t: "FINISHED" if status == "TERMINATED" else "FAILED" for t, status in record.items()}
        assert all(r.info.status == "KILLED" and LOST_TAG in r.data.tags for r in abandoned)
        # every trial of Tune's record ran to its end: a dead worker's trial was retried (also one
        # whose reused worker died as it switched trials), a killed driver's were resumed from a
        # checkpoint that still existed, though these trials' epochs (0.15 s) checkpoint several
        # times within one of Tune's state saves (superseded ones wait for the save:
        # sweeps/launch/_tune_fixes.py, defer_checkpoint_deletion)
        unfinished = {t: by_trial[t][0].data.tags.get("error", "") for t, s in record.items() if s != "TERMINATED"}
        assert unfinished == {}, unfinished
        assert not any(CHECKPOINT_GONE in r.data.tags.get("error", "") for r in runs)
        # Tune copies its searcher's state and its trials' apart (a file at a time, from a staging
        # folder): a driver killed between the two can resume with a count of trials drawn that
        # includes one its record lacks, and draw one fewer
        assert TRIALS - held["driver"] <= len(recorded) <= TRIALS
        for run in finished:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), (run.info.run_name, steps)  # each epoch once
            assert [m.step for m in client.get_metric_history(run.info.run_id, "poison_count")] == [EPOCHS]
    finally:
        if driver.proc.poll() is None:
            driver.kill()
        server.stop()
