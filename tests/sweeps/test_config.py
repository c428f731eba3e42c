import textwrap

import pytest
from optuna.trial import FixedTrial

from poison import ATTACKS, DATASETS, ConfigError
from sweeps.config._schema import apply_override, flatten, load_config, validate_config
from sweeps.config._space import define_by_run
from tests.support import backdoor
from trainers.models import bundled_archs

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
    (with_(attack={"kind": "nope"}), f"attack.kind: unknown attack 'nope'; valid: {', '.join(ATTACKS.names())}"),
    (with_(attack={**backdoor(), "trigger": {"kind": "star"}}), "attack.trigger.kind: unknown trigger 'star'"),
    (with_(model={"arch": "nope"}), f"model.arch: unknown architecture 'nope'; valid: {', '.join(bundled_archs())}"),
    (with_(model={"arch": "tiny-rn", "pretrained": "/no/such.pt"}), "model.pretrained: checkpoint file /no/such.pt not found"),
    (with_(data={"dataset": "cifar"}), f"data.dataset: unknown dataset 'cifar'; valid: {', '.join(DATASETS.names())}"),
    (with_(data={"dataset": "fashion-mnist", "path": "/no/where"}), "data.path: /no/where/train-images"),
    (with_(search={"num_samples": 0}), "search.num_samples: expected greater than or equal to 1"),
    (with_(search={"objectives": {"attack_success": "up"}}), "search.objectives.attack_success: expected 'max' or 'min'"),
    (with_(search={"objectives": {"speed": "max"}}), "search.objectives: unknown metric 'speed'"),
    (with_(resources={"gpu": 1.5}), "resources.gpu: a fraction must be below 1"),
    (with_(storage={"path": "s3://bucket/sweeps"}), "storage.path: 's3://bucket/sweeps' is a URI"),
    (with_(tracking={"uri": "https://ana:hunter2@mlflow.example.org"}), "tracking.uri: holds a password"),
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


@pytest.mark.parametrize("text, message", [
    # a second section silently replaced the first
    ("name: t\ntrain: {epochs: 1}\nseed: 0\ntrain: {lr: 0.1}\n",
     "c.yaml: line 4: key 'train' given twice in one mapping (first on line 2)"),
    ("train:\n  epochs: 1\n  epochs: 2\n", "c.yaml: line 3: key 'epochs' given twice in one mapping (first on line 2)"),
    # "billion laughs": nine levels of nine aliases, 4.9e8 nodes in all
    ('a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
     "c.yaml: 4.9e+08 nodes once its aliases are expanded, more than 100,000 (an alias bomb?)"),
    ("a: &r [*r]\n", "c.yaml: a recursive alias (an anchor used inside itself)"),
])
def test_a_config_with_a_duplicate_key_or_an_alias_bomb_is_one_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{tmp_path}/{message}"


def test_anchors_merge_keys_and_non_utf8_configs(tmp_path):
    from sweeps.config._schema import read_yaml

    # anchors, aliases and merge keys still work (a merged key may be overridden)
    assert read_yaml("a: &x {k: 1, j: 2}\nb:\n  <<: *x\n  k: 3\nc: *x\n", "c.yaml") == {
        "a": {"k": 1, "j": 2}, "b": {"k": 3, "j": 2}, "c": {"k": 1, "j": 2}}
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: not UTF-8 text (byte 9); save the config as UTF-8"


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
    (with_(train={"loader_threads": -1}), "train.loader_threads: 'auto' or a number of threads from 0 to 32, got -1"),
    (with_(train={"loader_threads": "many"}), "train.loader_threads: 'auto' or a number of threads from 0 to 32, got 'many'"),
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


def _patch_trigger(name: str) -> bool:
    import yaml

    trigger = (yaml.safe_load((__import__("importlib").resources.files("sweeps.presets") / name).read_text())
               .get("attack") or {}).get("trigger") or {}
    kind = trigger.get("kind")
    return "patch" in (kind.get("choices", []) if isinstance(kind, dict) else [kind])


@pytest.mark.parametrize("name", [p for p in PRESETS if _patch_trigger(p)])
def test_every_preset_states_its_patch_against_carlini_and_terzis(name):
    """Each patch size a preset can draw is stated in it as a share of the side and an area ratio
    against Carlini & Terzis's 16 px on 224 px (the line ``PatchTrigger.scale`` writes), so the
    statement cannot drift from the config; one preset is at their scale."""
    from importlib import resources

    import yaml

    from poison.triggers import PatchTrigger

    text = (resources.files("sweeps.presets") / name).read_text()
    trigger = yaml.safe_load(text)["attack"]["trigger"]
    size = trigger.get("size", PatchTrigger.model_fields["size"].default)
    image_size = yaml.safe_load(text)["data"].get("image_size", 224)
    for side in (size["choices"] if isinstance(size, dict) else [size]):
        assert f"# patch trigger, {PatchTrigger(size=side).scale(image_size)}" in text, side
    if name == "backdoor-carlini-scale.yaml":
        assert PatchTrigger(size=size).pixels(image_size) / image_size == pytest.approx(16 / 224, abs=2e-3)


# --- kind-switched sections: searching over attack.kind / attack.trigger.kind -------------------

def mixed(**attack):
    """attack.kind and attack.trigger.kind are dimensions; each kind's keys sit side by side."""
    return with_(attack={
        "kind": {"choices": ["backdoor", "targeted"]},
        "target": "blue circle",
        "poison_count": {"low": 20, "high": 80, "log": True},
        "mode": "inject",                                   # backdoor only
        "targets": 4,                                       # targeted only
        "trigger": {                                        # backdoor only
            "kind": {"choices": ["patch", "sig"]},
            "size": {"choices": [3, 4, 6]},                 # patch only
            "amplitude": {"low": 10, "high": 60},           # sig only
        },
        **attack,
    })


def test_registries_are_found_by_the_key_they_switch():
    from poison import ATTACKS, DATASETS, TRIGGERS
    from poison.registry import Registry

    assert Registry.find("attack") is ATTACKS and Registry.find("trigger") is TRIGGERS
    assert Registry.find("dataset") is DATASETS and Registry.find("no-such-key") is None
    assert {"attack", "trigger", "dataset"} <= set(Registry.kinds())
    with pytest.raises(ValueError, match="a registry of kind 'trigger' exists already"):
        Registry("trigger")


def test_resolving_each_kind_drops_the_keys_only_other_kinds_take():
    cfg = validate_config(mixed())
    assert list(cfg.dimensions) == ["attack.kind", "attack.poison_count", "attack.trigger.kind",
                                    "attack.trigger.size", "attack.trigger.amplitude"]
    targeted = cfg.resolve({"attack.kind": "targeted", "attack.trigger.kind": "sig"})
    assert targeted.attack.kind == "targeted" and targeted.attack.targets == 4
    params = flatten(targeted.to_dict())
    assert "attack.targets" in params
    assert not any(k.startswith("attack.trigger") or k == "attack.mode" for k in params), params
    patch = cfg.resolve({"attack.trigger.size": 6})  # defaults: backdoor with a patch
    assert patch.attack.kind == "backdoor" and patch.attack.trigger.kind == "patch"
    assert patch.attack.trigger.size == 6 and not hasattr(patch.attack, "targets")
    assert "attack.trigger.amplitude" not in flatten(patch.to_dict())
    sig = cfg.resolve({"attack.trigger.kind": "sig", "attack.trigger.amplitude": 42})
    assert sig.attack.trigger.kind == "sig" and sig.attack.trigger.amplitude == 42
    assert "attack.trigger.size" not in flatten(sig.to_dict())
    assert cfg.default_trial.attack.trigger.kind == "patch"


def test_active_dimensions_follow_the_drawn_kinds():
    cfg = validate_config(mixed())
    assert cfg.active() == ["attack.kind", "attack.trigger.kind", "attack.poison_count", "attack.trigger.size"]
    assert cfg.active({"attack.kind": "targeted"}) == ["attack.kind", "attack.poison_count"]
    assert cfg.active({"attack.trigger.kind": "sig"}) == [
        "attack.kind", "attack.trigger.kind", "attack.poison_count", "attack.trigger.amplitude"]


@pytest.mark.parametrize("attack,expected", [
    ({"targetz": 3}, "attack.targetz: unknown key"),
    ({"trigger": {"kind": {"choices": ["patch", "sig"]}, "sizes": 4}}, "attack.trigger.sizes: unknown key"),
    # a key of an attack that is not one of the choices is no less a mistake
    ({"kind": {"choices": ["backdoor", "none"]}}, "attack.targets: unknown key"),
])
def test_a_key_no_choice_takes_is_still_an_error(attack, expected):
    assert expected in error_of(mixed(**attack))


def test_a_fixed_kind_switches_nothing():
    raw = with_(attack={**backdoor(), "targets": 4})  # targets: a targeted key, but kind is fixed
    assert "attack.targets: unknown key" in error_of(raw)


def test_bad_extremes_under_a_non_default_kind_fail_at_load_naming_the_key():
    trigger = {"kind": {"choices": ["patch", "sig"]}, "amplitude": {"low": 10, "high": 10**9, "default": 20}}
    msg = error_of(mixed(trigger=trigger))
    assert msg.startswith("attack.trigger.amplitude: high (1000000000) with attack.trigger.kind 'sig': "
                          "expected less than or equal to 255"), msg
    # targets only exists under targeted, which is not the default kind
    msg = error_of(mixed(targets={"low": 1, "high": 1000, "default": 2}))
    assert msg.startswith("attack.targets: high (1000) with attack.kind 'targeted': 1,000 exceeds the"), msg
    # nested: the default attack kind has no trigger, so both kinds are set for the check
    msg = error_of(mixed(kind={"choices": ["targeted", "backdoor"]}, trigger=trigger))
    assert msg.startswith("attack.trigger.amplitude: high (1000000000) with attack.kind 'backdoor' "
                          "with attack.trigger.kind 'sig': "), msg


def test_every_kind_choice_is_checked_with_the_defaults_it_uses():
    # sig's fixed frequency aliases on 32 px images: caught though the default trigger is a patch
    msg = error_of(mixed(trigger={"kind": {"choices": ["patch", "sig"]}, "frequency": 30}))
    assert msg.startswith("attack.trigger.kind: choice 'sig': attack.trigger.frequency: 30.0 periods alias"), msg
    # a dimension's default that fails only under a non-default kind is named as that default
    msg = error_of(mixed(trigger={"kind": {"choices": ["patch", "sig"]}, "frequency": {"low": 2, "high": 60}}))
    assert msg.startswith("attack.trigger.frequency: default (31) with attack.trigger.kind 'sig'"), msg
    # targeted's own checks run too: 20 pairs cannot cover 30 target images
    msg = error_of(mixed(targets=30, poison_count=20))
    assert msg.startswith("attack.kind: choice 'targeted': attack.poison_count: 20 is fewer than the 30"), msg


def test_define_by_run_suggests_only_the_dimensions_the_drawn_kinds_use():
    import optuna

    cfg = validate_config(mixed())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space, seen = define_by_run(cfg.dimensions), set()
    for _ in range(24):
        trial = study.ask()
        space(trial)
        params = trial.params
        assert set(params) == set(cfg.active(params)), params
        kind, trigger = params["attack.kind"], params.get("attack.trigger.kind")
        seen.add((kind, trigger))
        if kind == "targeted":
            assert not any(k.startswith("attack.trigger.") for k in params), params
        else:
            assert ("attack.trigger.size" in params) == (trigger == "patch"), params
            assert ("attack.trigger.amplitude" in params) == (trigger == "sig"), params
        resolved = cfg.resolve(params)
        assert resolved.attack.kind == kind
        study.tell(trial, 0.0)
    assert seen == {("targeted", None), ("backdoor", "patch"), ("backdoor", "sig")}


def test_a_point_may_give_values_for_dimensions_its_kinds_do_not_use():
    point = {"attack.kind": "targeted", "attack.trigger.size": 6, "attack.trigger.amplitude": 10**6}
    cfg = validate_config({**mixed(), "search": {"points": [point]}})
    first, second = cfg.initial_points()
    assert first == cfg.defaults() and second["attack.kind"] == "targeted"
    assert cfg.resolve(second).attack.kind == "targeted"
    trial = FixedTrial(second)  # an enqueued point: the inactive values are never asked for
    define_by_run(cfg.dimensions)(trial)
    assert set(trial.params) == {"attack.kind", "attack.poison_count"}


def test_summary_table_marks_dimensions_a_trial_does_not_use():
    from sweeps.tracking._logger import TrialRow, summary_csv, summary_table

    cfg = validate_config(mixed())
    rows = [TrialRow("a", "FINISHED", {"attack.kind": "targeted", "attack.poison_count": 30}, {}, None),
            TrialRow("b", "FINISHED", {"attack.kind": "backdoor", "attack.trigger.kind": "sig",
                                       "attack.poison_count": 40, "attack.trigger.amplitude": 25}, {}, None)]
    table = summary_table(rows, cfg).splitlines()
    assert table[1].split()[:7] == ["a", "FINISHED", "targeted", "30", "-", "-", "-"]
    assert table[2].split()[:7] == ["b", "FINISHED", "backdoor", "40", "sig", "-", "25"]
    assert summary_csv(rows, cfg).splitlines()[1].startswith("a,FINISHED,targeted,30,,,,")


def test_objectives_are_the_trial_metrics_plus_every_attacks_metrics(monkeypatch):
    from typing import ClassVar, Literal

    from poison import ATTACKS, Attack
    from sweeps.config._schema import objective_names

    names = objective_names()
    for kind in ATTACKS:
        assert set(ATTACKS.get(kind).metric_names) <= set(names), kind
    assert {"attack_success", "utility", "poison_count", "backdoor_asr", "targeted_success"} <= set(names)

    class Probe(Attack):  # a new attack: its metrics become objectives, no edit to sweeps/
        kind: Literal["probe"] = "probe"
        depth: int = 1
        metric_names: ClassVar[tuple[str, ...]] = ("attack_success", "probe_depth_hits")

    monkeypatch.setitem(ATTACKS._items, "probe", Probe)
    assert "probe_depth_hits" in objective_names()
    cfg = validate_config(with_(attack={**backdoor(), "kind": {"choices": ["backdoor", "probe"]}, "depth": 3},
                                search={"objectives": {"attack_success": "max"}}))
    assert cfg.resolve({"attack.kind": "probe"}).attack.depth == 3
    assert "trigger" not in cfg.resolve({"attack.kind": "probe"}).to_dict()["attack"]
    assert "depth" not in cfg.default_trial.to_dict()["attack"]


@pytest.mark.parametrize("attack,objectives,expected", [
    # a mixed sweep: every choice must report every objective, and the message names the one that does not
    (None, {"backdoor_asr": "max"}, "search.objectives.backdoor_asr: attack.kind choice 'targeted' does not report"),
    (None, {"targeted_success": "max"}, "search.objectives.targeted_success: attack.kind choice 'backdoor'"),
    ({"kind": {"choices": ["targeted", "none"]}}, {"utility_drop": "min"},
     "search.objectives.utility_drop: attack.kind choice 'none' does not report utility_drop"),
])
def test_objectives_must_be_reported_by_every_attack_kind_choice(attack, objectives, expected):
    raw = mixed(**(attack or {}))
    if attack:  # targeted and none: no mode or trigger
        del raw["attack"]["mode"], raw["attack"]["trigger"]
    assert expected in error_of({**raw, "search": {"objectives": objectives}})


def test_objectives_of_the_default_or_every_kind_are_accepted():
    fixed = validate_config(with_(attack={**backdoor(), "kind": "backdoor"},
                                  search={"objectives": {"backdoor_asr": "max", "utility_drop": "min"}}))
    assert list(fixed.search.objectives) == ["backdoor_asr", "utility_drop"]
    mixed_cfg = validate_config({**mixed(), "search": {"objectives": {"attack_success": "max", "utility": "max",
                                                                      "poison_count": "min", "i2t_r5": "max"}}})
    assert mixed_cfg.dimensions["attack.kind"].choices == ["backdoor", "targeted"]


def test_a_sweep_mixing_attacks_and_triggers_validates_through_the_api():
    raw = {
        "name": "mixed", "seed": 1,
        "data": {"dataset": "synthetic", "size": 400, "test_size": 40, "image_size": 32},
        "train": {"epochs": 1, "batch_size": 64},
        "attack": {
            "kind": {"choices": ["backdoor", "targeted"], "default": "targeted"},
            "target": "blue circle",
            "poison_count": {"low": 20, "high": 200, "log": True},
            "mode": {"choices": ["inject", "replace"]},
            "caption_source": "templates",
            "targets": {"low": 1, "high": 4},
            "trigger": {"kind": {"choices": ["patch", "sig"]}, "size": {"choices": [3, 4, 6]},
                        "location": "random", "amplitude": {"low": 10, "high": 60}, "frequency": 4},
        },
        "search": {"sampler": "tpe", "num_samples": 8,
                   "points": [{"attack.kind": "backdoor", "attack.trigger.kind": "sig"}]},
    }
    cfg = validate_config(raw)
    assert cfg.default_trial.attack.kind == "targeted" and cfg.default_trial.attack.targets == 2
    assert "attack.trigger.size" not in cfg.active() and "attack.targets" in cfg.active()
    sig = cfg.resolve(cfg.search.points[0])
    assert sig.attack.trigger.kind == "sig" and sig.attack.trigger.frequency == 4
    assert sig.attack.mode == "inject" and "targets" not in sig.to_dict()["attack"]
    assert cfg.resolve({"attack.kind": "backdoor", "attack.mode": "replace"}).attack.trigger.size == 3


def test_any_registry_switches_its_key_text_trigger_included():
    cfg = validate_config(with_(attack={
        "kind": {"choices": ["backdoor", "text-backdoor", "dual-backdoor"]},
        "target": "blue circle", "poison_count": 20,
        "trigger": {"kind": "patch", "size": {"choices": [3, 4]}},          # backdoor, dual-backdoor
        "text_trigger": {"kind": "phrase", "position": {"choices": ["start", "end"]}},  # text-, dual-
        "modality": "both",                                                  # dual-backdoor only
    }))
    assert cfg.active({"attack.kind": "backdoor"}) == ["attack.kind", "attack.trigger.size"]
    assert cfg.active({"attack.kind": "text-backdoor"}) == ["attack.kind", "attack.text_trigger.position"]
    assert len(cfg.active({"attack.kind": "dual-backdoor"})) == 3
    text = cfg.resolve({"attack.kind": "text-backdoor", "attack.text_trigger.position": "end"}).to_dict()["attack"]
    assert text["text_trigger"]["position"] == "end" and "trigger" not in text and "modality" not in text
    assert "text_trigger" not in cfg.default_trial.to_dict()["attack"]


def test_printed_tracking_uris_hide_their_password():
    from sweeps.tracking._client import redact

    assert redact("https://ana:hunter2@mlflow.example.org:8443/x") == "https://ana:***@mlflow.example.org:8443/x"
    assert redact("postgresql://mlflow:s3cret@db/mlflow") == "postgresql://mlflow:***@db/mlflow"
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_the_auto_sampler_is_the_default_tpe_first_then_nsga2_in_a_conditional_space():
    import pickle

    import optuna

    from sweeps.config._space import AUTO_TPE_TRIALS, NSGAII, Staged, make_sampler

    cfg = validate_config(mixed())
    assert cfg.search.sampler == "auto"
    assert isinstance(make_sampler("auto", 0), Staged) and make_sampler("auto", 0).switch == AUTO_TPE_TRIALS
    for name in ("auto", "tpe", "nsga2", "random", "gp"):  # every sampler survives Tune's pickling
        assert type(pickle.loads(pickle.dumps(make_sampler(name, 0)))) is type(make_sampler(name, 0))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = Staged(seed=0, switch=15)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    space = define_by_run(cfg.dimensions)
    for number in range(30):
        if number == 20:  # Tune pickles the searcher with its sampler (NSGA-II's lock included)
            study.sampler = pickle.loads(pickle.dumps(study.sampler))
        trial = study.ask()
        space(trial)
        params = trial.params
        assert set(params) == set(cfg.active(params)), params  # only the drawn kinds' dimensions
        study.tell(trial, [float(params["attack.poison_count"]), float(params["attack.kind"] == "targeted")])
    generation = [t.system_attrs.get(NSGAII._get_generation_key()) for t in study.trials]
    assert generation == [None] * 15 + [0] * 15  # NSGA-II drew exactly the trials from number 15 on
    assert all(t.state.name == "COMPLETE" for t in study.trials)
