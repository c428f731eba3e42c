import textwrap

import pytest
from optuna.trial import FixedTrial

from poison import ConfigError
from sweeps.config import apply_override, flatten, load_config, validate_config
from sweeps.space import define_by_run
from tests.conftest import backdoor

BASE = {"name": "t", "data": {"size": 400, "test_size": 40}, "attack": backdoor(20)}


def with_(**parts):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    raw.update(parts)
    return raw


def error_of(raw) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return str(info.value)


def test_fixed_values_and_dimensions_with_defaults():
    cfg = validate_config(with_(
        train={"lr": {"low": 1e-4, "high": 1e-2, "log": True, "default": 2e-3}, "epochs": {"low": 1, "high": 3}},
        attack={**backdoor(), "poison_count": {"low": 5, "high": 50, "log": True, "default": 10},
                "trigger": {"kind": "patch", "size": {"choices": [2, 4, 6], "default": 4}}},
    ))
    dims = cfg.dimensions
    assert set(dims) == {"train.lr", "train.epochs", "attack.poison_count", "attack.trigger.size"}
    assert [dims[k].kind for k in sorted(dims)] == ["int", "categorical", "int", "float"]
    assert cfg.defaults() == {"train.lr": 2e-3, "train.epochs": 2, "attack.poison_count": 10,
                              "attack.trigger.size": 4}
    trial = cfg.resolve({"attack.poison_count": 33})
    assert trial.attack.poison_count == 33 and trial.train.lr == 2e-3 and trial.attack.trigger.size == 4
    assert cfg.default_trial.attack.poison_count == 10


def test_the_optuna_space_draws_every_dimension_by_key_path():
    cfg = validate_config(with_(attack={**backdoor(), "poison_count": {"low": 5, "high": 50, "log": True}}))
    params = {"attack.poison_count": 17}
    trial = FixedTrial(params)
    define_by_run(cfg.dimensions)(trial)
    assert trial.params == params


def test_count_above_the_data_names_the_key_and_the_extreme():
    msg = error_of(with_(attack={**backdoor(), "poison_count": {"low": 10, "high": 10**9, "default": 10}}))
    assert msg.startswith("attack.poison_count: high (1000000000): 1,000,000,000 exceeds the 385 non-target")
    # without a default, the midpoint is the default, and it is named as such
    msg = error_of(with_(attack={**backdoor(), "poison_count": {"low": 10, "high": 10**9}}))
    assert msg.startswith("attack.poison_count: default (500000005): 500,000,005 exceeds the")


def test_a_bad_choice_is_named():
    msg = error_of(with_(attack={**backdoor(), "trigger": {"kind": "patch", "size": {"choices": [4, 40]}}}))
    assert msg.startswith("attack.trigger.size: choice 40: a 40px patch does not fit 32px images")


@pytest.mark.parametrize("raw,expected", [
    (with_(train={"epochs": "many"}), "train.epochs: expected a valid integer"),
    (with_(train={"epochz": 3}), "train.epochz: unknown key"),
    (with_(bogus=1), "bogus: unknown key; valid: name, seed"),
    (with_(train={"lr": {"low": 1, "high": 0.1}}), "train.lr: low < high must hold, but got low=1, high=0.1"),
    (with_(train={"lr": {"low": 0.1, "high": 0.1}}), "train.lr: low < high must hold"),
    (with_(train={"lr": {"low": 0, "high": 1, "log": True}}), "train.lr: a log range needs low > 0"),
    (with_(train={"epochs": {"choices": []}}), "train.epochs.choices: empty list"),
    (with_(train={"epochs": {"low": 1, "high": 3, "default": 9}}), "train.epochs: default 9 is outside [1, 3]"),
    (with_(attack={"kind": "nope"}), "attack.kind: unknown attack 'nope'; valid: backdoor, none"),
    (with_(attack={**backdoor(), "trigger": {"kind": "star"}}), "attack.trigger.kind: unknown trigger 'star'"),
    (with_(model={"arch": "nope"}), "model.arch: unknown architecture 'nope'; valid: tiny-rn, tiny-vit"),
    (with_(model={"arch": "tiny-rn", "pretrained": "/no/such.pt"}), "model.pretrained: checkpoint file /no/such.pt not found"),
    (with_(data={"dataset": "cifar"}), "data.dataset: unknown dataset 'cifar'; valid: fashion-mnist, synthetic"),
    (with_(data={"dataset": "fashion-mnist", "path": "/no/where"}), "data.path: /no/where/train-images"),
    (with_(search={"num_samples": 0}), "search.num_samples: expected greater than or equal to 1"),
    (with_(search={"objectives": {"attack_success": "up"}}), "search.objectives.attack_success: expected 'max' or 'min'"),
    (with_(search={"objectives": {"speed": "max"}}), "search.objectives: unknown metric 'speed'"),
    (with_(resources={"gpu": 1.5}), "resources.gpu: a fraction must be below 1"),
    (with_(search={"points": [{"train.lr": 1}]}), "search.points[0]: train.lr: not a search dimension"),
])
def test_bad_input_gives_one_clear_message(raw, expected):
    assert expected in error_of(raw)


def test_fractional_gpus_are_allowed():
    assert validate_config(with_(resources={"cpu": 2, "gpu": 0.25})).resources.gpu == 0.25


def test_overrides_set_any_field_including_new_dimensions():
    raw = {"attack": {"poison_count": 3}}
    apply_override(raw, "attack.poison_count=300")
    apply_override(raw, "train.lr={low: 0.001, high: 0.01, log: true}")
    apply_override(raw, "model.pretrained=null")
    assert raw == {"attack": {"poison_count": 300}, "train": {"lr": {"low": 0.001, "high": 0.01, "log": True}},
                   "model": {"pretrained": None}}
    with pytest.raises(ConfigError, match="--set 'attack': expected key.path=value"):
        apply_override(raw, "attack")


def test_load_config_file_with_overrides_and_yaml_errors(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent("""
        name: t
        data: {size: 400, test_size: 40}
        attack: {kind: backdoor, target: blue circle, poison_count: 20, trigger: {kind: patch}}
    """))
    cfg = load_config(path, ["attack.poison_count=33", "search.num_samples=3"])
    assert cfg.default_trial.attack.poison_count == 33 and cfg.search.num_samples == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"attack.poison_count: .* exceeds"):
        load_config(path, ["attack.poison_count=100000"])


def test_params_are_the_flattened_full_config():
    params = flatten(validate_config(BASE).default_trial.to_dict())
    for key in ("name", "seed", "data.dataset", "data.size", "model.arch", "model.pretrained", "train.epochs",
                "train.batch_size", "train.lr", "attack.kind", "attack.poison_count", "attack.target",
                "attack.trigger.kind", "attack.trigger.size", "defense.kind"):
        assert key in params, key


@pytest.mark.parametrize("raw,expected", [
    (with_(seed=-1), "seed: expected greater than or equal to 0"),
    (with_(train={"epochs": {"low": 1, "high": 5, "default": "x"}}), "train.epochs: default 'x' is not a number"),
    (with_(train={"epochs": {"low": 1, "high": 5, "step": 0}}), "train.epochs: step must be positive"),
    (with_(attack={**backdoor(), "poison_count": {"low": 10, "high": 90, "log": True, "step": 10}}),
     "attack.poison_count: a log range takes no step"),
    (with_(attack={**backdoor(), "trigger": {"kind": "patch", "colour": [300, 0, 0]}}),
     "attack.trigger.colour.0: expected less than or equal to 255"),
    (with_(attack={**backdoor(), "trigger": {"kind": "patch", "size": 1.7}}),
     "attack.trigger.size: a size of 1 or more is in whole pixels, got 1.7"),
    (with_(data={"size": 400, "image_size": 16}), "data.image_size: tiny-rn needs a multiple of 32 pixels, got 16"),
    (with_(data={"size": 400, "image_size": 36}, model={"arch": "tiny-vit"}),
     "data.image_size: tiny-vit needs a multiple of 8 pixels, got 36"),
    (with_(attack={"kind": "none"}), "search.objectives.attack_success: attack.kind 'none' does not report attack_success"),
    (with_(attack={**backdoor(), "poison_count": {"low": 10, "high": 50}}, search={"points": [{"attack.poison_count": 10**6}]}),
     "search.points[0]: attack.poison_count: 1,000,000 exceeds the"),
])
def test_more_bad_input_is_caught_before_anything_runs(raw, expected):
    assert expected in error_of(raw)


def test_a_clean_only_sweep_can_optimise_utility():
    cfg = validate_config(with_(attack={"kind": "none"}, search={"objectives": {"utility": "max"}},
                                train={"lr": {"low": 1e-4, "high": 1e-2, "log": True}}))
    assert cfg.default_trial.attack.kind == "none"


PRESETS = sorted(p.name for p in __import__("importlib").resources.files("sweeps.presets").iterdir()
                 if p.name.endswith(".yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_packaged_preset_validates(name):
    from importlib import resources
    from pathlib import Path

    if "fashion-mnist" in name and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    with resources.as_file(resources.files("sweeps.presets") / name) as path:
        cfg = load_config(path)
    assert cfg.search.num_samples >= 8 and cfg.dimensions
