"""Defenses: the registry, the filters' scores and exact recall/precision against known plans,
the trusted split, bad input naming its key, and a trial training on the kept rows only."""
import math
from typing import ClassVar, Literal

import numpy as np
import pytest
import torch

from poison import DEFENSES, ConfigError, DataSpec, Defense, load_dataset, make_attack, make_defense
from poison.defenses import DETECTION_METRICS, detection_metrics, filter_metrics
from poison.defenses.filters import cosine_distance, drop_highest
from poison.defenses.outliers import lid_mle, neighbour_distances, pair_points
from tests.support import backdoor, write_idx
from trainers import parse_trial_config
from trainers.data import TrainingSet

TINY = {"data": {"size": 200, "test_size": 20}, "train": {"epochs": 1, "batch_size": 64, "threads": 1}}


class GivenEmbeddings:
    """A TrainingPairs whose reference embeddings are made by hand."""

    def __init__(self, image: np.ndarray, text: np.ndarray) -> None:
        self.image, self.text, self.asked = image, text, []

    def __len__(self) -> int:
        return len(self.image)

    def reference_embeddings(self, *, trusted_pairs):
        self.asked.append(trusted_pairs)
        return self.image, self.text


def planted(dataset, count=10, mode="inject"):
    attack = make_attack({**backdoor(count), "mode": mode})
    plan = attack.plan(dataset, 0)
    return TrainingSet(dataset, attack, plan, lambda caps: torch.zeros(len(caps), 4, dtype=torch.long)), plan


def embeddings_with_distance(distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit image/text embeddings whose cosine distance is exactly ``distance`` per row."""
    angle = np.arccos(1 - np.asarray(distance))
    image = np.stack([np.ones_like(angle), np.zeros_like(angle)], 1)
    text = np.stack([np.cos(angle), np.sin(angle)], 1)
    return image, text


# --- registry and config ---

def test_every_defense_is_registered_with_a_none_default():
    assert make_defense(None).kind == "none" and parse_trial_config({}).defense.kind == "none"
    for kind in DEFENSES:
        cls = DEFENSES.get(kind)
        assert issubclass(cls, Defense) and cls.stage in ("none", "data", "training", "post"), kind
        assert all(isinstance(n, str) for n in cls.metric_names), kind
        make_defense({"kind": kind})  # every field has a default


@pytest.mark.parametrize("defense, expected", [
    ({"kind": "bogus"}, f"defense.kind: unknown defense 'bogus'; valid: {', '.join(DEFENSES.names())}"),
    ({"kind": "similarity-filter", "fraction": 1.5}, "defense.fraction: expected less than 1, got 1.5"),
    ({"kind": "outlier-filter", "fraction": 0}, "defense.fraction: expected greater than 0, got 0"),
    ({"kind": "similarity-filter", "threshold": 2.5}, "defense.threshold: expected less than or equal to 2"),
    ({"kind": "similarity-filter", "threshold": 0.5, "fraction": 0.1},
     "defense.threshold: give threshold or fraction, not both (got threshold=0.5, fraction=0.1)"),
    ({"kind": "outlier-filter", "score": "lof"}, "defense.score: expected 'k-distance', 'lid' or 'isolation-forest'"),
    ({"kind": "outlier-filter", "score": "lid", "k": 1}, "defense.k: lid needs at least 2 neighbours, got k=1"),
    ({"kind": "clean-finetune", "epochs": 0}, "defense.epochs: expected greater than or equal to 1"),
    ({"kind": "clean-finetune", "lr": -1}, "defense.lr: expected greater than 0"),
    ({"kind": "none", "fraction": 0.1}, "defense.fraction: unknown key"),
])
def test_bad_defense_input_names_the_key(defense, expected):
    with pytest.raises(ConfigError) as info:
        parse_trial_config({"defense": defense})
    assert str(info.value).startswith(expected), str(info.value)


# --- what filters score, by hand ---

def test_filter_metrics_are_exact_against_the_ground_truth():
    poisoned = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    keep = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 1], bool)  # removes 3 of 4 poisoned and 1 clean
    assert filter_metrics(keep, poisoned) == {"filter_removed": 4.0, "filter_poison_recall": 0.75,
                                              "filter_precision": 0.75}
    nothing = filter_metrics(np.ones(10, bool), poisoned)
    assert nothing["filter_removed"] == 0 and nothing["filter_poison_recall"] == 0
    assert math.isnan(nothing["filter_precision"])  # nothing removed: precision undefined
    assert math.isnan(filter_metrics(keep, np.zeros(10, bool))["filter_poison_recall"])  # no poison


def test_drop_highest_rounds_the_fraction_and_breaks_ties_by_row():
    scores = np.array([0.2, 0.9, 0.9, 0.1, 0.9])
    assert drop_highest(scores, 0.4).tolist() == [True, False, False, True, True]  # round(2.0): rows 1, 2
    assert drop_highest(scores, 0.5).tolist() == [True, False, False, True, True]  # round(2.5) = 2
    assert drop_highest(scores, 0.6).tolist() == [True, False, False, True, False]
    assert drop_highest(scores, 0.7).tolist() == [False, False, False, True, False]  # round(3.5) = 4
    assert drop_highest(np.arange(30.0), 0.1).sum() == 27  # 0.1 × 30 is 3.0000000000000004: still 3


def test_similarity_filter_recall_and_precision_against_a_known_plan(small_synthetic):
    data, plan = planted(small_synthetic, count=10)
    poisoned = data.poisoned
    assert poisoned.sum() == 10 and len(data) == 410
    distance = np.full(len(data), 0.3)
    distance[poisoned] = 0.9                       # every poisoned pair looks unrelated...
    distance[poisoned.nonzero()[0][:2]] = 0.2      # ...but two
    distance[:5] = 1.0                             # and five clean pairs look worse than any
    pairs = GivenEmbeddings(*embeddings_with_distance(distance))
    assert np.allclose(cosine_distance(pairs.image, pairs.text), distance)

    by_fraction = make_defense({"kind": "similarity-filter", "fraction": 0.03, "reference_pairs": 300})
    keep = by_fraction.keep_mask(pairs, seed=0)  # round(0.03 × 410) = 12: the 5 clean, then 7 of 8 poisoned
    assert pairs.asked == [300]
    assert filter_metrics(keep, poisoned) == {"filter_removed": 12.0, "filter_poison_recall": 0.7,
                                              "filter_precision": 7 / 12}
    by_threshold = make_defense({"kind": "similarity-filter", "threshold": 0.5})
    keep = by_threshold.keep_mask(pairs, seed=0)  # above 0.5: the 5 clean and 8 poisoned
    assert filter_metrics(keep, poisoned) == {"filter_removed": 13.0, "filter_poison_recall": 0.8,
                                              "filter_precision": 8 / 13}


def test_replaced_pairs_are_the_poisoned_rows(small_synthetic):
    data, plan = planted(small_synthetic, count=6, mode="replace")
    assert len(data) == 400 and data.poisoned.sum() == 6
    assert set(data.image[data.poisoned]) == set(plan["image"].to_pylist())


def test_outlier_scores_by_hand():
    points = np.array([[0.0], [1.0], [2.0], [10.0]])
    distances = neighbour_distances(points, 2)
    assert distances.tolist() == [[1, 2], [1, 1], [1, 2], [8, 9]]
    lid = lid_mle(distances)
    assert lid[0] == pytest.approx(-1 / np.mean(np.log([0.5, 1.0])))  # 2 / ln 2
    assert lid[1] == np.inf  # every neighbour equally near
    image, text = np.eye(2), np.array([[1.0, 0.0], [1.0, 0.0]])
    assert pair_points(image, text, "difference").tolist() == [[0, 0], [-1, 1]]
    assert pair_points(image, text, "joint").shape == (2, 4)


@pytest.mark.parametrize("score", ["k-distance", "isolation-forest", "lid"])
def test_outlier_filter_drops_the_isolated_pairs(score):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(200, 8)) * 0.05 + 1  # one tight cloud of pairs...
    text = image + rng.normal(size=(200, 8)) * 0.01
    text[:10] = -1 + rng.normal(size=(10, 8)) * 0.3  # ...and 10 whose captions are far off, each its own way
    defense = make_defense({"kind": "outlier-filter", "score": score, "k": 8, "fraction": 0.05})
    keep = defense.keep_mask(GivenEmbeddings(image, text), seed=0)
    truth = np.arange(200) < 10
    recall = filter_metrics(keep, truth)["filter_poison_recall"]
    if score == "lid":  # LID is scored like the others; here it is no detector (see the README)
        assert keep.sum() == 190
    else:
        assert recall == 1.0
    again = defense.keep_mask(GivenEmbeddings(image, text), seed=0)
    assert (again == keep).all()  # seeded


def test_outlier_filter_needs_more_pairs_than_neighbours():
    defense = make_defense({"kind": "outlier-filter", "k": 64})
    with pytest.raises(ConfigError, match="defense.k: 64 neighbours need more than 64 training pairs, got 10"):
        defense.keep_mask(GivenEmbeddings(np.eye(10), np.eye(10)), seed=0)


# --- the trusted split ---

def test_synthetic_trusted_pairs_are_fresh_draws():
    main = load_dataset(DataSpec(size=300, test_size=30, seed=1))
    trusted = load_dataset(DataSpec(size=300, test_size=30, seed=1, trusted=120))
    again = load_dataset(DataSpec(size=300, test_size=30, seed=1, trusted=120))
    assert trusted.num_train == 120 and trusted.manifest.equals(again.manifest)
    train = main.images[main.split("train")["image"].to_numpy()]
    for image in trusted.images[trusted.split("train")["image"].to_numpy()]:
        assert not (train == image).all(axis=(1, 2, 3)).any()  # no trusted image is a training image
    assert DataSpec(size=300, trusted=120, cache_dir="c").cache_file() != DataSpec(size=300, cache_dir="c").cache_file()


def test_fashion_mnist_trusted_images_are_outside_the_training_draw(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 28, 28))
    pixels[:, 0, 0] = np.arange(40)  # every image marked with its index
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", pixels)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(40) % 10)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", pixels[:10])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(10))

    def marks(spec):
        ds = load_dataset(DataSpec(dataset="fashion-mnist", path=str(tmp_path), image_size=28, **spec))
        return set(ds.images[ds.split("train")["image"].to_numpy(), 0, 0, 0].tolist()), ds

    used, main = marks({"size": 25})
    trusted, _ = marks({"size": 25, "trusted": 15})
    assert main.trusted_capacity == 15 and len(trusted) == 15 and not used & trusted
    smaller, _ = marks({"size": 25, "trusted": 5})
    assert smaller <= trusted  # a smaller trusted split is part of a larger one
    with pytest.raises(ConfigError, match="defense.clean_pairs: 16 trusted pairs do not fit: fashion-mnist has "
                                          "15 training pairs outside the 25 of data.size"):
        parse_trial_config({"data": {"dataset": "fashion-mnist", "path": str(tmp_path), "size": 25},
                            "defense": {"kind": "clean-finetune", "clean_pairs": 16}}
                           ).defense.check(main, pretrained=False)
    reference = make_defense({"kind": "similarity-filter"})  # its reference: as many pairs as data.size
    with pytest.raises(ConfigError, match="defense.reference_pairs: 25 trusted pairs do not fit"):
        reference.check(main, pretrained=False)
    reference.check(main, pretrained=True)  # model.pretrained is the reference: no trusted pairs needed


# --- the trial trains on the kept rows only ---

class DropPoison(Defense):
    """A test defense: keeps every clean row, drops every poisoned one (perfect recall)."""

    kind: Literal["drop-poison"] = "drop-poison"
    stage: ClassVar[str] = "data"
    metric_names: ClassVar[tuple[str, ...]] = ("filter_removed",)

    def keep_mask(self, pairs, seed):
        return ~pairs.data.poisoned


def test_a_trial_trains_on_the_rows_its_filter_keeps(monkeypatch):
    import trainers.trial as trial

    monkeypatch.setitem(DEFENSES._items, "drop-poison", DropPoison)
    seen = []
    real_fit = trial.fit

    def spy(built, data, config, **kwargs):
        seen.append(data)
        return real_fit(built, data, config, **kwargs)

    monkeypatch.setattr(trial, "fit", spy)
    config = parse_trial_config({**TINY, "attack": backdoor(20), "defense": {"kind": "drop-poison"}})
    metrics = trial.run_trial(config, baseline=False).metrics
    (data,) = seen
    assert len(data) == 200 and not data.poisoned.any()  # the 20 injected pairs never reach the loop
    assert metrics["filter_removed"] == 20 and metrics["filter_poison_recall"] == 1.0
    assert metrics["filter_precision"] == 1.0 and metrics["poison_count"] == 20
    assert metrics["samples_per_second"] * metrics["train_seconds"] == pytest.approx(192)  # 3 batches of 64
    assert 0 < metrics["data_seconds"] < metrics["train_seconds"]  # getting batches ready is part of training


def test_a_training_stage_defense_trains_its_own_model_and_reports_its_split():
    """SafeCLIP through a real trial, its warm-up shortened to one CLIP epoch: epoch 2 splits the
    pairs by the mixture's posterior and trains the risky pairs' batches, then the safe pairs'; its
    split comes back scored against the plan, with the detection metrics of its posteriors.

    Whether a split after one epoch from scratch finds the poison depends on the seed, so this
    test checks the mechanics; the split finding the poison is checked on a pretrained model
    (tests/e2e/test_defenses_pretrained_e2e.py)."""
    from trainers.trial import run_trial

    config = parse_trial_config({**TINY, "train": {**TINY["train"], "epochs": 2}, "attack": backdoor(20),
                                 "defense": {"kind": "safeclip", "inmodal_epochs": 0, "clip_epochs": 1}})
    m = run_trial(config, baseline=False).metrics
    assert 0 < m["filter_removed"] < 220  # the posterior split some pairs off, not all
    # every epoch, the split one too, takes the 3 batches the 200 clean pairs make (the risky pairs'
    # batches then the safe pairs'), as the schedule and the clean model do
    assert m["train_steps"] == 2 * 3
    assert set(DETECTION_METRICS) <= m.keys()
    assert "poisoned_cache_hit" not in m


# --- attack once, evaluate many defenses ---

def test_post_training_defenses_share_one_training_of_the_attack(tmp_path, monkeypatch):
    import trainers.trial as trial

    trainings = []
    real_train = trial._train

    def counting(config, *args, **kwargs):
        trainings.append(config.attack.kind)
        return real_train(config, *args, **kwargs)

    monkeypatch.setattr(trial, "_train", counting)

    def run(poison=20, baseline=False, on_epoch=None, **defense):
        config = parse_trial_config({**TINY, "attack": backdoor(poison), "defense": {
            "kind": "clean-finetune", "clean_pairs": 64, "epochs": 1, **defense}})
        return trial.run_trial(config, cache_dir=str(tmp_path), baseline=baseline, on_epoch=on_epoch).metrics

    epochs = []
    first = run(lr=1e-3, baseline=True, on_epoch=epochs.append)
    assert trainings == ["none", "backdoor"] and first["poisoned_cache_hit"] == 0 and first["clean_cache_hit"] == 0
    assert [e["epoch"] for e in epochs] == [1, 2]  # the trial's epoch, then the defense's
    second = run(lr=1e-4, baseline=True)  # another defense of the same attack: nothing trains again
    assert trainings == ["none", "backdoor"] and second["poisoned_cache_hit"] == 1 and second["clean_cache_hit"] == 1
    assert {k: v for k, v in second.items() if k.startswith("predefense_")} == \
        {k: v for k, v in first.items() if k.startswith("predefense_")}
    assert second["train_seconds"] == first["train_seconds"]  # what the attack's training cost, once
    replayed = []
    undefended = trial.run_trial(parse_trial_config({**TINY, "attack": backdoor(20)}), cache_dir=str(tmp_path),
                                 baseline=False, on_epoch=replayed.append).metrics
    assert trainings == ["none", "backdoor"] and undefended["poisoned_cache_hit"] == 1
    # the same epoch; only the first trial, measured against the clean model (baseline), has utility_drop
    assert "utility_drop" in epochs[0] and "utility_drop" not in replayed[0]
    assert replayed == [{k: v for k, v in e.items() if k != "utility_drop"} for e in epochs[:1]]
    assert undefended["utility"] == first["predefense_utility"]
    run(poison=21)  # another attack trains
    assert trainings == ["none", "backdoor", "backdoor"] and len(list((tmp_path / "poisoned").iterdir())) == 2


def test_a_corrupt_poisoned_checkpoint_is_rebuilt(tmp_path):
    from trainers.trial import run_trial

    config = parse_trial_config({**TINY, "attack": backdoor(20), "defense": {
        "kind": "clean-finetune", "clean_pairs": 64, "epochs": 1}})
    first = run_trial(config, cache_dir=str(tmp_path), baseline=False)
    (entry,) = (tmp_path / "poisoned").iterdir()
    weights = entry / "model.pt"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    again = run_trial(config, cache_dir=str(tmp_path), baseline=False).metrics
    assert again["poisoned_cache_hit"] == 0 and again["predefense_utility"] == first.metrics["predefense_utility"]
    assert torch.load(weights, weights_only=True).keys() == first.state_dict.keys()


# --- defenses in a sweep config ---

def test_the_driver_trains_one_reference_model_per_distinct_filter_recipe():
    from sweeps.config._schema import validate_config
    from sweeps.launch._driver import reference_configs

    base = {"data": {"size": 200, "test_size": 20}, "attack": backdoor(20)}
    kinds = {"kind": {"choices": ["clean-finetune", "similarity-filter", "outlier-filter"]}}
    # both filters embed with one reference model: one to train up front
    sweep = validate_config({**base, "defense": kinds})
    assert [c.defense.kind for c in reference_configs(sweep)] == ["similarity-filter"]
    # a filter with its own trusted-pair count (a search point) needs its own
    sweep = validate_config({**base, "defense": {**kinds, "reference_pairs": {"choices": [100, 150]}},
                             "search": {"points": [{"defense.kind": "outlier-filter", "defense.reference_pairs": 150}]}})
    assert sorted(c.defense.reference_pairs for c in reference_configs(sweep)) == [100, 150]
    assert reference_configs(validate_config({**base, "defense": {"kind": "clean-finetune"}})) == []



def test_defense_metrics_are_objectives_without_a_list_of_them(monkeypatch):
    from sweeps.config._schema import objective_names, validate_config

    names = objective_names()
    for kind in DEFENSES:
        assert set(DEFENSES.get(kind).metric_names) <= set(names), kind

    class Probe(Defense):  # a new defense: its metrics become objectives, no edit to sweeps/
        kind: Literal["probe"] = "probe"
        metric_names: ClassVar[tuple[str, ...]] = ("probe_score",)

    monkeypatch.setitem(DEFENSES._items, "probe", Probe)
    assert "probe_score" in objective_names()
    raw = {"data": {"size": 400, "test_size": 40}, "attack": backdoor(20), "defense": {"kind": "probe"},
           "search": {"objectives": {"probe_score": "max", "attack_success": "min"}}}
    assert validate_config(raw).default_trial.defense.kind == "probe"


def test_defense_kind_is_searched_with_its_own_dimensions():
    from sweeps.config._schema import validate_config

    cfg = validate_config({
        "data": {"size": 400, "test_size": 40}, "attack": backdoor(20),
        "defense": {"kind": {"choices": ["none", "similarity-filter", "outlier-filter", "clean-finetune"]},
                    "fraction": {"low": 0.02, "high": 0.2, "log": True},      # both filters
                    "score": {"choices": ["k-distance", "isolation-forest"]},  # outlier-filter
                    "lr": {"low": 1e-4, "high": 1e-2, "log": True},            # clean-finetune
                    "clean_pairs": 300},
        "search": {"objectives": {"attack_success": "min", "utility": "max"}}})
    assert cfg.active() == ["defense.kind"]
    assert cfg.active({"defense.kind": "similarity-filter"}) == ["defense.kind", "defense.fraction"]
    assert cfg.active({"defense.kind": "outlier-filter"}) == ["defense.kind", "defense.fraction", "defense.score"]
    assert cfg.active({"defense.kind": "clean-finetune"}) == ["defense.kind", "defense.lr"]
    finetune = cfg.resolve({"defense.kind": "clean-finetune", "defense.lr": 2e-3}).defense
    assert finetune.lr == 2e-3 and finetune.clean_pairs == 300 and not hasattr(finetune, "fraction")


@pytest.mark.parametrize("defense, objectives, expected", [
    ({"kind": {"choices": ["none", "similarity-filter"]}}, {"filter_poison_recall": "max"},
     "search.objectives.filter_poison_recall: defense.kind choice 'none' does not report filter_poison_recall"),
    ({"kind": "clean-finetune"}, {"filter_precision": "max"},
     "search.objectives.filter_precision: defense.kind 'clean-finetune' does not report filter_precision"),
    ({"kind": "similarity-filter", "fraction": {"low": 0.01, "high": 1.5}}, {"utility": "max"},
     "defense.fraction: high (1.5): expected less than 1"),
    ({"kind": "clean-finetune", "clean_pairs": 10**9}, {"utility": "max"}, None),  # synthetic: any number
])
def test_defense_objectives_and_dimensions_are_checked_at_load(defense, objectives, expected):
    from sweeps.config._schema import validate_config

    raw = {"data": {"size": 400, "test_size": 40}, "attack": backdoor(20), "defense": defense,
           "search": {"objectives": objectives}}
    if expected is None:
        validate_config(raw)
        return
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    assert str(info.value).startswith(expected), str(info.value)


def test_a_dataset_that_cannot_keep_trusted_pairs_apart_refuses(monkeypatch):
    from poison import DATASETS, DataError
    from poison.datasets import synthetic

    def plain(spec):  # a loader without TRUSTED would hand back its training pairs as "trusted"
        return synthetic.load(spec)

    plain.VERSION = 1
    monkeypatch.setitem(DATASETS._items, "plain", plain)
    with pytest.raises(DataError, match="trusted split: plain cannot keep trusted pairs apart"):
        load_dataset(DataSpec(dataset="plain", size=50, trusted=10))
    main = load_dataset(DataSpec(size=50))
    main.trusted_capacity = 0  # what a dataset without a trusted split reports
    with pytest.raises(ConfigError, match="defense.clean_pairs: synthetic has no trusted pairs beside the 50"):
        make_defense({"kind": "clean-finetune"}).check(main, pretrained=False)


# --- detection metrics of scoring defenses, by hand ---

def test_detection_metrics_by_hand():
    """Five rows, the poisoned ones ranked 1st and 3rd: of the 2 × 3 (poisoned, clean) pairs, 5
    are ordered right (AUROC 5/6); precision at the poisoned ranks is 1/1 and 2/3 (AP 5/6); catching
    both poisoned rows needs the threshold at 0.7, which also takes 1 of 3 clean rows (FPR 1/3)."""
    scores, poisoned = np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 0], bool)
    assert detection_metrics(scores, poisoned) == pytest.approx(
        {"filter_auroc": 5 / 6, "filter_pr_auc": 5 / 6, "filter_fpr_at_95": 1 / 3})
    # a perfect ranking, then the reversed one
    assert detection_metrics(-np.arange(6.0), np.arange(6) < 2) == pytest.approx(
        {"filter_auroc": 1.0, "filter_pr_auc": 1.0, "filter_fpr_at_95": 0.0})
    worst = detection_metrics(np.arange(6.0), np.arange(6) < 2)  # poisoned rows scored lowest
    assert worst["filter_auroc"] == 0.0 and worst["filter_fpr_at_95"] == 1.0
    assert worst["filter_pr_auc"] == pytest.approx((1 / 5 + 2 / 6) / 2)  # ranked 5th and 6th
    # ties count half: every row scored alike
    tied = detection_metrics(np.zeros(4), np.array([1, 0, 0, 0], bool))
    assert tied["filter_auroc"] == 0.5 and tied["filter_fpr_at_95"] == 1.0 and tied["filter_pr_auc"] == 0.25
    # ties: 18 poisoned rows at 10, one poisoned and one clean at 5, the same at 4, 8 clean at 0: 19 of
    # 20 are caught at the threshold 5, which also takes 1 of the 10 clean rows
    scores = np.r_[np.full(18, 10.0), 5, 5, 4, 4, np.zeros(8)]
    truth = np.r_[np.ones(18, bool), True, False, True, False, np.zeros(8, bool)]
    assert detection_metrics(scores, truth)["filter_fpr_at_95"] == pytest.approx(0.1)
    # 95% of 20 poisoned rows is 19: the 20th, scored below 5 of 10 clean rows, may be missed
    scores = np.r_[np.linspace(10, 9, 19), 0.5, np.linspace(1, 0, 10)]
    assert detection_metrics(scores, np.arange(30) < 20)["filter_fpr_at_95"] == 0.0
    assert all(math.isnan(v) for v in detection_metrics(scores, np.zeros(30, bool)).values())
    assert all(math.isnan(v) for v in detection_metrics(scores, np.ones(30, bool)).values())


def test_a_scoring_filter_selects_with_its_scores(small_synthetic):
    """The filter's ``select`` gives the scores its keep-mask was cut from, so the trial can log
    the detection metrics: here the similarity filter's distances, planted by hand."""
    data, _ = planted(small_synthetic, count=10)
    distance = np.full(len(data), 0.3)
    distance[data.poisoned] = 0.9
    distance[:5] = 1.0  # five clean pairs look worse than any poisoned one
    pairs = GivenEmbeddings(*embeddings_with_distance(distance))
    selection = make_defense({"kind": "similarity-filter", "fraction": 0.03}).select(pairs, seed=0)
    assert np.allclose(selection.scores, distance)
    assert (selection.keep == make_defense({"kind": "similarity-filter", "fraction": 0.03}).keep_mask(pairs, 0)).all()
    metrics = detection_metrics(selection.scores, data.poisoned)
    assert metrics["filter_auroc"] == pytest.approx(1 - 5 * 10 / (10 * 400))  # 5 clean above all 10 poisoned
    assert metrics["filter_fpr_at_95"] == pytest.approx(5 / 400)
    assert make_defense({"kind": "none"}).select(pairs, seed=0) is None
