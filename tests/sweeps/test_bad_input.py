"""Bad input to ``poisonsweep run``, one row per kind: each ends in one line
``poisonsweep: error: <file or key>: ...`` with exit status 2, before anything starts (no results
folder, no tracking store, no Ray)."""
import pytest
import yaml

from sweeps.cli import main

CONFIG = {"name": "bad-input", "data": {"size": 200, "test_size": 32}, "train": {"epochs": 1},
          "attack": {"kind": "backdoor", "target": "blue circle", "poison_count": 10,
                     "trigger": {"kind": "patch"}},
          "search": {"objectives": {"attack_success": "max"}, "num_samples": 1}}
BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def config_text(**changes) -> str:
    return yaml.safe_dump({**CONFIG, **changes})


@pytest.mark.parametrize("text, args, env, expected", [
    (config_text() + "train: {epochs: 5}\n", [], {}, "{config}: line 17: key 'train' given twice in one mapping (first on line 15)"),
    (BOMB, [], {}, "{config}: 4.9e+08 nodes once its aliases are expanded, more than 100,000 (an alias bomb?)"),
    ("name: caf\xe9\n".encode("latin-1"), [], {}, "{config}: not UTF-8 text (byte 9)"),
    (config_text(name="../elsewhere"), [], {}, "name: a sweep's name is its folder under storage.path"),
    (config_text(storage={"path": "{file}"}), [], {}, "storage.path: '{file}' is a file; give a folder"),
    (config_text(), ["--tracking-uri", "s3://bucket/runs"], {},
     "--tracking-uri: 's3://bucket/runs': MLflow cannot keep runs at a s3:// URI"),
    (config_text(), ["--tracking-uri", "./mlruns"], {}, "--tracking-uri: './mlruns' is a file store"),
    (config_text(), [], {"MLFLOW_TRACKING_URI": "ftp://u:hunter2@host/x"},
     "MLFLOW_TRACKING_URI: 'ftp://u:***@host/x': MLflow cannot keep runs at a ftp:// URI"),
    (config_text(tracking={"uri": "file:///tmp/mlruns"}), [], {}, "tracking.uri: 'file:///tmp/mlruns' is a file store"),
], ids=["duplicate-key", "alias-bomb", "not-utf8", "name-with-separator", "storage-is-a-file", "uri-scheme",
        "uri-file-store", "uri-from-environment", "uri-in-config"])
def test_bad_input_is_one_line_before_anything_starts(tmp_path, monkeypatch, capsys, text, args, env, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    file = tmp_path / "a-file"
    file.write_text("")
    config = tmp_path / "sweep.yaml"
    if isinstance(text, bytes):
        config.write_bytes(text)
    else:
        config.write_text(text.replace("{file}", str(file)))
    assert main(["run", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("poisonsweep: error: " + expected.format(config=config, file=file)), err
    assert len(err.splitlines()) == 1 and len(err) < 400 and "hunter2" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "sweep.yaml"]  # nothing written


@pytest.mark.parametrize("output, expected", [
    ("missing/metrics.json", "--output: missing/metrics.json: the folder missing does not exist"),
    (".", "--output: . is a folder; give a file path"),
], ids=["folder-missing", "a-folder"])
def test_an_output_that_cannot_be_written_is_refused_before_training(tmp_path, monkeypatch, capsys, output, expected):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "sweep.yaml"
    config.write_text(config_text())
    assert main(["train", str(config), "--output", output]) == 2
    err = capsys.readouterr().err
    assert err == f"poisonsweep: error: {expected}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]  # no model trained, no cache


@pytest.mark.parametrize("content, expected", [
    (b'{"run_name": "s-1", "experim', "not a poisonsweep launch file (JSONDecodeError: Unterminated string"),
    (b"\xff\xfe", "not a poisonsweep launch file (UnicodeDecodeError"),
    (b'["a list"]', "not a poisonsweep launch file (expected a JSON object with run_name, experiment"),
], ids=["cut-short", "not-utf8", "not-an-object"])
def test_a_broken_launch_file_is_one_line_naming_it(tmp_path, capsys, content, expected):
    from sweeps._files import LAUNCH_FILE

    (tmp_path / LAUNCH_FILE).write_bytes(content)
    assert main(["sync", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"poisonsweep: error: {tmp_path / LAUNCH_FILE}: {expected}"), err
    assert len(err.splitlines()) == 1 and len(err) < 400


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_is_down_is_exit_3_in_one_line_without_its_password(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://ana:hunter2@127.0.0.1:{_closed_port()}"
    assert main(["pareto", "--experiment", "x", "--tracking-uri", uri]) == 3
    err = capsys.readouterr().err
    assert err.startswith("poisonsweep: error: MlflowException: ") and "ana:***@127.0.0.1" in err, err
    assert len(err.splitlines()) == 1 and len(err) <= 1100 and "hunter2" not in err


def test_the_machine_and_our_own_bugs_are_told_apart(monkeypatch, capsys):
    import errno

    import sweeps.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/results/x")

    def bug(args):
        raise KeyError("https://ana:hunter2@mlflow.example.org oops")

    monkeypatch.setattr(cli, "_defenses", full)
    assert main(["defenses", "--experiment", "x"]) == 3
    err = capsys.readouterr().err
    assert err == "poisonsweep: error: OSError: [Errno 28] No space left on device: '/results/x'\n"
    monkeypatch.setattr(cli, "_defenses", bug)
    assert main(["defenses", "--experiment", "x"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError" in err and "hunter2" not in err
    assert err.rstrip().endswith("poisonsweep: this is a bug in poisonsweep; please report it with the traceback above")
    with pytest.raises(KeyError):  # --debug: the traceback itself, for the developer
        main(["--debug", "defenses", "--experiment", "x"])
    monkeypatch.setenv("POISONSWEEP_DEBUG", "1")
    with pytest.raises(OSError):
        monkeypatch.setattr(cli, "_defenses", full)
        main(["defenses", "--experiment", "x"])


def test_resume_takes_only_its_own_sweeps_launches(tmp_path):
    from poison import ConfigError
    from sweeps.config._schema import validate_config
    from sweeps.launch._driver import find_launch
    from sweeps.tracking._mirror import Launch

    def sweep(name):
        return validate_config({**CONFIG, "name": name, "storage": {"path": str(tmp_path)}}, check_data=False)

    def launch(name, stamp):
        Launch(f"{name}-{stamp}", "e", "r", "sqlite:///x", sweep(name).to_yaml()).write(tmp_path / f"{name}-{stamp}")

    launch("demo-backdoor", "20261206-101010")  # another sweep whose name starts with "demo-"
    with pytest.raises(ConfigError, match="--resume: no launch of sweep 'demo' in storage.path"):
        find_launch(sweep("demo"))
    launch("demo", "20261206-090909")
    launch("demo", "20261206-091010")
    folder, found = find_launch(sweep("demo"))
    assert folder.name == found.run_name == "demo-20261206-091010"  # its own, the latest
    assert find_launch(sweep("demo-backdoor"))[0].name == "demo-backdoor-20261206-101010"


def test_sync_writes_to_the_store_its_launch_wrote_to(tmp_path, monkeypatch):
    import sweeps.tracking._client as client
    from sweeps.cli import sync_launch
    from sweeps.config._schema import validate_config
    from sweeps.tracking._mirror import Launch

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = validate_config({**CONFIG, "storage": {"path": str(tmp_path)}}, check_data=False)
    own = f"sqlite:///{tmp_path / 'own.db'}"
    Launch("l", "e", "r", "sqlite:///x", sweep.to_yaml(), tracking_uri=own).write(tmp_path / "l")
    used = []

    class Stop(Exception):
        pass

    def tracker(uri, sweep):
        used.append(uri)
        raise Stop

    monkeypatch.setattr(client, "Tracker", tracker)
    for flag, expected in ((None, own), ("sqlite:///other.db", "sqlite:///other.db")):
        with pytest.raises(Stop):
            sync_launch(tmp_path / "l", flag)
        assert used[-1] == expected  # the launch's own store, unless --tracking-uri says otherwise


@pytest.mark.slow
def test_a_launch_stopped_before_tunes_state_resumes_and_a_failed_start_leaves_no_running_parent(
        tmp_path, ray_local, monkeypatch):
    """The launch file is written, then the start fails before Tune writes anything (a kill there
    is the same for Tune): the parent run is FAILED, not RUNNING; ``--resume`` starts Tune afresh
    under the same parent run, and the sweep ends with its trials in MLflow. About a minute."""
    import sweeps.launch._driver as driver
    from sweeps._files import LAUNCH_FILE
    from sweeps.config._schema import load_config
    from tests.support import TINY, launch_runs, write_sweep

    sweep = load_config(write_sweep(tmp_path, "early", train={**TINY["train"], "epochs": 1},
                               search={**TINY["search"], "num_samples": 1}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def stopped(*args, **kwargs):
        raise RuntimeError("stopped before Tune started")

    monkeypatch.setattr(driver, "tuner", stopped)
    with pytest.raises(RuntimeError, match="stopped before Tune started"):
        driver.run_sweep(sweep, tracking_uri=uri, printer=lambda line: None)
    (launch_file,) = (tmp_path / "results").glob(f"early-*/{LAUNCH_FILE}")
    assert sorted(p.name for p in launch_file.parent.iterdir()) == [LAUNCH_FILE]  # no Tune state
    _, parent, _ = launch_runs(uri, "early", "sweep")
    assert parent.info.status == "FAILED"
    monkeypatch.undo()
    outcome = driver.run_sweep(sweep, tracking_uri=uri, printer=lambda line: None, resume=True)
    assert outcome.synced and [r.status for r in outcome.rows] == ["FINISHED"]
    _, resumed, children = launch_runs(uri, "early", "sweep")
    assert resumed.info.run_id == parent.info.run_id and resumed.info.status == "FINISHED"
    assert [c.info.status for c in children] == ["FINISHED"]
