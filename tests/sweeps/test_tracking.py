"""The MLflow layer on a SQLite store: what a trial run's params say."""
from mlflow.tracking import MlflowClient

from sweeps.config import validate_config
from sweeps.tracking import Tracker
from tests.support import backdoor


def test_a_drawn_value_is_logged_in_its_fields_type_in_both_params(tmp_path):
    """``attack.trigger.size`` is a float field (pixels, or a fraction of the side): an integer
    drawn for it is 5.0 in the config, and its ``search.`` param says the same, not 5."""
    trigger = {"kind": "patch", "size": {"low": 3, "high": 6, "default": 4}}
    sweep = validate_config({"name": "typed", "data": {"size": 300, "test_size": 30},
                             "attack": {**backdoor(), "trigger": trigger}}, check_data=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, sweep)
    tracker.start_parent()
    values = {"attack.trigger.size": 5}
    run_id = tracker.start_trial("t1", sweep.resolve(values), values)
    params = MlflowClient(uri).get_run(run_id).data.params
    assert params["attack.trigger.size"] == params["search.attack.trigger.size"] == "5.0"


def test_a_point_is_resolved_once():
    sweep = validate_config({"name": "once", "data": {"size": 300, "test_size": 30},
                             "attack": {**backdoor(), "poison_count": {"low": 5, "high": 50, "default": 10}}},
                            check_data=False)
    first = sweep.resolve({"attack.poison_count": 7})
    assert sweep.resolve({"attack.poison_count": 7}) is first
    assert sweep.resolve({"attack.poison_count": 8}).attack.poison_count == 8
