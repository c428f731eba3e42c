"""The ``poisonsweep`` command line: run, demo, train, pareto, defenses, report, budget, sync, ui."""
from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from poison import ConfigError, DataError

PRESETS = "sweeps.presets"
#: Where ``poisonsweep ui`` serves by default.
UI_URL = "http://127.0.0.1:5000"


#: The longest error line printed (a longer message is cut; --debug shows it whole).
MAX_ERROR = 1000
#: OSError numbers that are the machine's state, not poisonsweep's: a full or read-only disk, no
#: permission, an I/O error, no memory, a network or peer gone.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOMEM,
                      errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT}
_CREDENTIALS = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]+):[^@\s]+@")


def redact_text(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` in it replaced by ``***``.

    >>> redact_text("cannot reach https://ana:hunter2@mlflow.example.org:8443/api (timeout)")
    'cannot reach https://ana:***@mlflow.example.org:8443/api (timeout)'
    """
    return _CREDENTIALS.sub(r"\1:***@", text)


def _environment_error(err: BaseException) -> bool:
    """A failure of the machine or a server (exit 3), not of the input or of poisonsweep."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
        return True
    mlflow = sys.modules.get("mlflow.exceptions")
    return mlflow is not None and isinstance(err, mlflow.MlflowException)


def _one_line(text: str) -> str:
    line = redact_text(" ".join(text.split()))
    return line if len(line) <= MAX_ERROR else f"{line[:MAX_ERROR]}... ({len(line) - MAX_ERROR} more characters; --debug shows all)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code: 2 for bad input and 3 for the environment (a server
    down, the disk full), each with one line naming the key or file, credentials redacted;
    ``--debug`` (or ``POISONSWEEP_DEBUG=1``) raises instead, with the traceback. Anything else is a
    bug of ours: its traceback (redacted) and a line asking for a report, exit 1."""
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("POISONSWEEP_DEBUG") == "1"
    # our progress lines say what matters: MLflow sets its loggers' level from this variable when
    # imported ("Creating initial MLflow database tables...", alembic's migrations)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (ConfigError, DataError) as err:
        if debug:
            raise
        print(f"poisonsweep: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except Exception as err:
        if debug:
            raise
        if _environment_error(err):
            print(f"poisonsweep: error: {_one_line(f'{type(err).__name__}: {err}')}", file=sys.stderr)
            return 3
        trace = "".join(traceback.format_exception(err))
        print(redact_text(trace) + "poisonsweep: this is a bug in poisonsweep; please report it with the "
              "traceback above", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poisonsweep",
        description="Sweeps of data-poisoning attacks and defenses on CLIP models: Ray Tune runs the trials, "
                    "Optuna draws them, MLflow keeps the results.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of its one line (or POISONSWEEP_DEBUG=1)")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a sweep through Ray Tune + Optuna into MLflow")
    run.add_argument("config", help="sweep config YAML")
    _common(run)
    run.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    run.add_argument("--resume", action="store_true",
                     help="go on with the sweep's last interrupted launch (same config): finished trials "
                          "are kept, unfinished ones go on from their last checkpoint")
    run.set_defaults(func=_run)

    demo = sub.add_parser("demo", help="run the packaged demo sweep (backdoor on the synthetic set)")
    _common(demo)
    demo.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="run one trial without Ray (dimensions at their defaults)")
    train.add_argument("config", help="sweep or trial config YAML")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config field, e.g. --set attack.poison_count=300")
    train.add_argument("--output", help="write the final metrics as a flat JSON object here")
    train.set_defaults(func=_train)

    pareto = sub.add_parser("pareto", help="Pareto front of a sweep's trials (tags them, logs CSV and plots)")
    pareto.add_argument("--experiment", required=True, help="MLflow experiment (the sweep's name)")
    pareto.add_argument("--objectives", help="NAME:max|min,... (default attack_success:max,utility:max,"
                                             "poison_count:min)")
    pareto.add_argument("--group-by", help="a tag or param to compute one front per value of (e.g. defense)")
    pareto.add_argument("--all", action="store_true", help="print every configuration, not only the front")
    pareto.add_argument("--constraint", dest="constraints", action="append", metavar="'METRIC <= BOUND'",
                        help="the front is of the trials meeting every one (repeatable; default: the "
                             "latest launch's search.constraints)")
    pareto.add_argument("--tracking-uri", help="tracking store (default: as for run)")
    pareto.set_defaults(func=_pareto)

    defenses = sub.add_parser("defenses", help="each attack × defense: attack success without and with it, "
                                               "utility drop, cost, the front (logs CSV and a plot)")
    defenses.add_argument("--experiment", required=True, help="MLflow experiment (the sweep's name)")
    defenses.add_argument("--parent", metavar="RUN_ID",
                          help="only this launch's trials, logged to its run (default: every launch's trials, logged "
                               "to the latest launch's run)")
    defenses.add_argument("--tracking-uri", help="tracking store (default: as for run)")
    defenses.set_defaults(func=_defenses)

    report = sub.add_parser("report", help="one HTML page of a finished launch: Pareto fronts, defenses, budget "
                                           "curve, trial table (logged to its run as analysis/report.html)")
    report.add_argument("--experiment", required=True, help="MLflow experiment (the sweep's name)")
    report.add_argument("--parent", metavar="RUN_ID", help="the launch's parent run (default: the latest launch)")
    report.add_argument("--objectives", help="NAME:max|min,... (default: the launch's own search.objectives)")
    report.add_argument("--output", default=".", metavar="DIR",
                        help="folder for report.html and its PNGs (default: the current folder)")
    report.add_argument("--ui-url", help="the MLflow UI the run links open when the file is opened outside it "
                                         "(default: an http(s) tracking URI, else http://127.0.0.1:5000)")
    report.add_argument("--tracking-uri", help="tracking store (default: as for run)")
    report.set_defaults(func=_report)

    budget = sub.add_parser("budget", help="minimal poison_count reaching an attack_success threshold, "
                                           "with a confidence interval (a sequential search of real trials)")
    budget.add_argument("config", help="sweep config YAML: its default point's attack, data and recipe")
    _common(budget)
    budget.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    budget.add_argument("--threshold", type=float, required=True, help="attack_success to reach, in (0, 1)")
    budget.add_argument("--confidence", type=float, default=0.95, help="confidence of the interval (0.95)")
    budget.add_argument("--max-trials", type=int, default=60, help="trial budget of the search (60)")
    budget.add_argument("--replicates", type=int, default=3,
                        help="trials per count and round, each with a seed of its own (seed, seed+1, ...) (3)")
    budget.add_argument("--rel-width", type=float, default=0.5,
                        help="stop when (high - low) / estimate of the interval is at most this (0.5)")
    budget.add_argument("--low", type=int, help="lowest count (default: attack.poison_count's low)")
    budget.add_argument("--high", type=int, help="highest count (default: attack.poison_count's high)")
    budget.set_defaults(func=_budget)

    sync = sub.add_parser("sync", help="write a launch's results from Ray Tune's storage into MLflow "
                                       "(after the tracking server was unreachable); idempotent")
    sync.add_argument("folder", help="the launch's folder in storage.path (the sweep prints it)")
    sync.add_argument("--tracking-uri", help="tracking store (default: as for run)")
    sync.set_defaults(func=_sync)

    ui = sub.add_parser("ui", help="open the MLflow UI over a sweep's tracking store")
    ui.add_argument("--config", help="sweep config, to find its store and experiment")
    ui.add_argument("--experiment", help="the sweep whose latest launch to show (default: the config's, else "
                                         "the experiment of the latest launch in the store)")
    ui.add_argument("--tracking-uri", help="tracking store (default: as for run)")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    ui.add_argument("--workers", type=int, default=1,
                    help="server processes (default 1: one person's browser; mlflow's own default is 4)")
    ui.set_defaults(func=_ui)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set attack.poison_count=300")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, then the config's "
                        "tracking.uri, then SQLite in storage.path)")


def _run(args: argparse.Namespace, config_path: str | None = None) -> int:
    from sweeps import api
    from sweeps.tracking import Console, redact, runs_path, summary_table, tracking_uri

    sweep = api.load(config_path or args.config, overrides=args.overrides)  # all checks before Ray starts
    uri = tracking_uri(args.tracking_uri, sweep)
    replicas = f" x {sweep.search.replicates} seeds" if sweep.search.replicates > 1 else ""
    print(f"sweep {sweep.name}: {sweep.search.num_samples} trials{replicas}, {len(sweep.dimensions)} dimensions, "
          f"tracking {redact(uri)}", flush=True)
    console = Console()
    try:
        outcome = api.run(sweep, tracking_uri=uri, address=args.address, printer=console,
                          resume=getattr(args, "resume", False))
    finally:
        console.close()
    print()
    print(summary_table(outcome.rows, sweep))
    if outcome.synced and any(r.status == "FINISHED" for r in outcome.rows):
        _print_front(uri, sweep.tracking.experiment or sweep.name, sweep.search.objectives, outcome.parent_run_id)
        _log_report(uri, sweep.tracking.experiment or sweep.name, outcome.parent_run_id)
    failed = sum(r.status not in ("FINISHED", "STOPPED") for r in outcome.rows)
    stopped = sum(r.status == "STOPPED" for r in outcome.rows)  # by search.scheduler
    experiment = sweep.tracking.experiment or sweep.name
    print(f"\n{len(outcome.rows) - failed - stopped} trials finished, {failed} failed"
          f"{f', {stopped} stopped early' if stopped else ''}. Open the results with:\n"
          f"  poisonsweep ui --tracking-uri {redact(uri)} --experiment {shlex.quote(experiment)}\n"
          f"and this launch's runs at {UI_URL}/{runs_path(outcome.experiment_id, launch=outcome.launch, objective=next(iter(sweep.search.objectives.items())))}")
    if not outcome.synced:
        return 3  # the trials ran, but MLflow does not have them yet: `poisonsweep sync`
    return 0 if len(outcome.rows) > failed else 1  # a sweep where every trial failed is a failure


def _sync(args: argparse.Namespace) -> int:
    from sweeps._files import LAUNCH_FILE

    folder = Path(args.folder).resolve()
    if not (folder / LAUNCH_FILE).is_file():
        raise ConfigError(f"{folder}: not a poisonsweep launch folder (no {LAUNCH_FILE})")
    return sync_launch(folder, args.tracking_uri, printer=lambda line: print(line, flush=True))


def sync_launch(folder, cli_uri: str | None, *, printer: Callable[[str], None] = print) -> int:
    """Brings every trial of the launch in ``folder`` into MLflow and finishes its parent run;
    0 when MLflow has it all, 3 when the tracking store still fails. The store: ``--tracking-uri``,
    else the one the launch wrote to (its launch file says which), else as ``poisonsweep run``
    chooses one."""
    import ray

    from sweeps import _local_ray as local_ray
    from sweeps._files import LAUNCH_FILE
    from sweeps.config import read_yaml, validate_config
    from sweeps.tracking import Launch, Tracker, TrialLogger, redact, summary_csv, sweep_note, tracking_uri

    launch = Launch.read(folder)
    sweep = validate_config(read_yaml(launch.config_yaml, str(Path(folder) / LAUNCH_FILE)), check_data=False)
    uri = tracking_uri(cli_uri or launch.tracking_uri, sweep)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # as `run` does (QUIET_ENV)
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
    tracker.finish_parent(summary_csv(logger.rows(), sweep), note=sweep_note(sweep, logger.rows(), launch.run_name))
    launch.finished = True
    launch.write(folder)
    changed = sum(before.get(t) != r.status for t, r in logger.mirror.runs.items())
    printer(f"{launch.run_name}: {len(logger.mirror.runs)} trial runs in MLflow ({changed} written now), "
            f"parent run {launch.parent_run_id} finished")
    return 0


def _demo(args: argparse.Namespace) -> int:
    preset = resources.files(PRESETS) / "demo.yaml"
    with resources.as_file(preset) as path:
        return _run(args, config_path=str(path))


def _train(args: argparse.Namespace) -> int:
    from sweeps.config import load_config
    from trainers import run_trial

    sweep = load_config(args.config, args.overrides)
    if args.output:
        check_output(Path(args.output), "--output")  # before training, not after
    config = sweep.default_trial
    result = run_trial(config, cache_dir=sweep.storage.cache_dir(),
                       on_epoch=lambda m: print(json.dumps({k: round(v, 4) for k, v in m.items()}), flush=True))
    text = json.dumps(result.metrics, indent=1, sort_keys=True)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


def check_output(path: Path, flag: str) -> None:
    """Raises ConfigError naming ``flag`` unless ``path`` can be written: its folder exists and
    takes files, and the path is not a folder."""
    if path.is_dir():
        raise ConfigError(f"{flag}: {path} is a folder; give a file path")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"{flag}: {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{flag}: {path} cannot be written (permissions)")


def _pareto(args: argparse.Namespace) -> int:
    from sweeps.analysis import parse_objectives
    from sweeps.tracking import tracking_uri

    objectives = parse_objectives(args.objectives)
    uri = tracking_uri(args.tracking_uri, None)
    return _print_front(uri, args.experiment, objectives, None, group_by=args.group_by, show_all=args.all,
                        constraints=args.constraints)


def _print_front(uri: str, experiment: str, objectives: dict[str, str], parent: str | None, *,
                 group_by: str | None = None, show_all: bool = False, constraints: list[str] | None = None) -> int:
    from sweeps import api
    from sweeps.analysis import Front, format_front

    table = api.pareto(experiment, objectives=objectives, group_by=group_by, tracking_uri=uri, parent=parent,
                       constraints=constraints, log=True)
    front = Front(table, table.attrs["hypervolume"], objectives)
    n_front = int(front.table["pareto"].sum())
    print(f"\nPareto front ({n_front} of {len(front.table)} configurations, "
          f"{', '.join(f'{k} {v}' for k, v in objectives.items())}):")
    print(format_front(front, only_front=not show_all))
    return 0


def _defenses(args: argparse.Namespace) -> int:
    from sweeps import api
    from sweeps.analysis import describe_defenses

    table = api.defenses(args.experiment, tracking_uri=args.tracking_uri, parent=args.parent, log=True)
    print(describe_defenses(args.experiment, table))
    return 0


def _report(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from sweeps.analysis import parse_objectives, write_report
    from sweeps.tracking import tracking_uri

    objectives = parse_objectives(args.objectives) if args.objectives else None
    client = MlflowClient(tracking_uri(args.tracking_uri, None))
    path = write_report(client, args.experiment, args.parent, Path(args.output), objectives=objectives,
                        ui_url=args.ui_url)
    print(path.resolve())
    return 0


def _log_report(uri: str, experiment: str, parent: str) -> None:
    """The launch's report, logged to its parent run as analysis/report.html (with its PNGs)."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from sweeps.analysis import write_report

    with tempfile.TemporaryDirectory() as folder:
        write_report(MlflowClient(uri), experiment, parent, folder)
    print(f"Report logged to run {parent}: analysis/report.html")


def _budget(args: argparse.Namespace) -> int:
    from sweeps import api
    from sweeps.budget import summary
    from sweeps.tracking import Console, redact

    console = Console()
    try:
        outcome = api.minimal_budget(args.config, overrides=args.overrides, threshold=args.threshold,
                                     confidence=args.confidence, max_trials=args.max_trials,
                                     replicates=args.replicates, rel_width=args.rel_width, low=args.low,
                                     high=args.high, tracking_uri=args.tracking_uri, address=args.address,
                                     printer=console)
    finally:
        console.close()
    print()
    print(summary(outcome))
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(outcome.tracking_uri).get_experiment(outcome.experiment_id).name
    if outcome.search.observations:
        _log_report(outcome.tracking_uri, experiment, outcome.parent_run_id)
    print(f"\nOpen the results with:\n  poisonsweep ui --tracking-uri {redact(outcome.tracking_uri)} "
          f"--experiment {shlex.quote(experiment)}")
    return 0 if outcome.search.observations else 1  # every trial failed: a failure


def _ui(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from sweeps.config import load_config
    from sweeps.tracking import latest_launch_path, redact, tracking_uri

    sweep = load_config(args.config) if args.config else None
    uri = tracking_uri(args.tracking_uri, sweep)
    experiment = args.experiment or (sweep and (sweep.tracking.experiment or sweep.name))
    path = latest_launch_path(MlflowClient(uri), experiment)
    if args.experiment and path is None:
        raise ConfigError(f"--experiment: no experiment {args.experiment!r} in {redact(uri)}")
    host = "127.0.0.1" if _any_address(args.host) else args.host  # where a browser on this machine finds it
    url = f"http://{f'[{host}]' if ':' in host else host}:{args.port}/"
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port),
           "--workers", str(args.workers)]
    env = os.environ.copy()
    # MLflow's job runner serves its GenAI features (judges, scorers), which a sweep's runs never use;
    # it starts eight more processes beside the server, seconds of CPU on a laptop
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(" ".join(redact(c) if "://" in c else c for c in cmd), flush=True)
    print(f"{'the latest launch' + (f' of {experiment}' if experiment else '') if path else 'MLflow'}: "
          f"{url}{path or ''}", flush=True)
    return subprocess.call(cmd, env=env)


def _any_address(host: str) -> bool:
    """Whether ``host`` is the address that binds every interface (IPv4's or IPv6's)."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name
        return False


if __name__ == "__main__":
    raise SystemExit(main())
