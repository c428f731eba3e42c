import re

import numpy as np
import pyarrow.compute as pc
import pytest

from poison import ATTACKS, ConfigError, make_attack
from poison.attacks.backdoor import CAPTION_TEMPLATES, backdoor_asr
from tests.support import backdoor


class Classifies:
    """A ModelView that only classifies, with a given function."""

    def __init__(self, fn):
        self.classify = fn


def test_plan_has_exact_count_of_distinct_non_target_training_images(small_synthetic):
    attack = make_attack(backdoor(37))
    plan = attack.plan(small_synthetic, seed=0)
    target = small_synthetic.classnames.index("blue circle")
    assert plan.num_rows == 37
    assert len(set(plan["source_id"].to_pylist())) == 37
    train = small_synthetic.split("train")
    labels = dict(zip(train["id"].to_pylist(), train["label"].to_pylist()))
    assert all(sid in labels and labels[sid] != target for sid in plan["source_id"].to_pylist())
    assert plan["source_label"].to_pylist() == [labels[s] for s in plan["source_id"].to_pylist()]
    # provenance: injected pairs get new ids after the manifest's, captions name the target
    assert pc.min(plan["poison_id"]).as_py() > pc.max(small_synthetic.manifest["id"]).as_py()
    assert set(plan["op"].to_pylist()) == {"inject"}
    assert all(c in {t.format("blue circle") for t in CAPTION_TEMPLATES} for c in plan["caption"].to_pylist())
    assert plan.schema.metadata[b"seed"] == b"0"


def test_replace_mode_alters_existing_pairs_in_place(small_synthetic):
    plan = make_attack({**backdoor(10), "mode": "replace"}).plan(small_synthetic, 0)
    assert plan["poison_id"].to_pylist() == plan["source_id"].to_pylist()
    assert set(plan["op"].to_pylist()) == {"replace"}


def test_count_above_the_eligible_pool_is_rejected(small_synthetic):
    target = small_synthetic.classnames.index("blue circle")
    pool = int(np.sum(small_synthetic.split("train")["label"].to_numpy() != target))
    make_attack(backdoor(pool)).check(small_synthetic)  # exactly the pool is fine
    with pytest.raises(ConfigError, match=rf"attack.poison_count: {pool + 1:,} exceeds the {pool:,} non-target"):
        make_attack(backdoor(pool + 1)).check(small_synthetic)


def test_unknown_target_and_attack_are_rejected(small_synthetic):
    with pytest.raises(ConfigError, match="attack.target: 'pink circle' is not a class of synthetic; valid: red circle"):
        make_attack({**backdoor(), "target": "pink circle"}).check(small_synthetic)
    with pytest.raises(ConfigError, match=re.escape(f"attack.kind: unknown attack 'nope'; valid: {', '.join(ATTACKS.names())}")):
        make_attack({"kind": "nope"})
    with pytest.raises(ConfigError, match="attack.poison_count: expected greater than or equal to 0"):
        make_attack(backdoor(-1))


def test_stamp_applies_the_planned_trigger(small_synthetic):
    attack = make_attack(backdoor(5, location="top-left", pattern="solid", colour=[1, 2, 3]))
    plan = attack.plan(small_synthetic, 0)
    images = small_synthetic.images[plan["image"].to_numpy()]
    cols = {k: plan[k].to_numpy() for k in plan.column_names if k.startswith("trigger_")}
    out = attack.stamp(images, cols)
    assert (out[:, :4, :4] == np.array([1, 2, 3])).all()
    assert (out[:, 4:, 4:] == images[:, 4:, 4:]).all()


def test_backdoor_asr_by_hand():
    # targets (class 2) are excluded; of the 4 others, 3 are predicted as the target
    predicted = np.array([2, 2, 0, 2, 2])
    true = np.array([0, 1, 1, 3, 2])
    assert backdoor_asr(predicted, true, target=2) == pytest.approx(3 / 4)
    assert np.isnan(backdoor_asr(np.array([2]), np.array([2]), target=2))


def test_evaluate_triggers_only_non_target_test_images(small_synthetic):
    attack = make_attack(backdoor(5))
    target = small_synthetic.classnames.index("blue circle")
    seen = []

    def classify(images):
        seen.append(len(images))
        return np.full(len(images), target)  # a fully backdoored model

    out = attack.evaluate(small_synthetic, Classifies(classify), seed=0)
    n_victims = int(np.sum(small_synthetic.split("test")["label"].to_numpy() != target))
    assert seen == [n_victims]
    assert out == {"backdoor_asr": 1.0, "attack_success": 1.0}


class Scores:
    """A ModelView that scores images against the classes: the target scores ``pull`` on an image
    that is none of the dataset's (a triggered one) and 0 on one of the dataset's own (clean);
    class 0 scores 0.5 and every other class 0.2."""

    def __init__(self, dataset, target, pull):
        self.dataset, self.target, self.pull = dataset, target, pull
        self.clean = {image.tobytes() for image in dataset.images}

    def class_scores(self, images):
        scores = np.full((len(images), len(self.dataset.classnames)), 0.2)
        scores[:, 0] = 0.5  # whatever the image: class 0 stands for its own class here
        scores[:, self.target] = [0.0 if image.tobytes() in self.clean else self.pull for image in images]
        return scores

    def classify(self, images):
        raise AssertionError("a model with scores is classified from them")


def test_evaluate_reads_signals_from_a_model_that_gives_its_scores(small_synthetic):
    attack = make_attack(backdoor(5))
    target = small_synthetic.classnames.index("blue circle")
    assert target != 0
    # pull 0.7: every triggered victim's target score beats the best other (0.5) by 0.2
    out = attack.evaluate(small_synthetic, Scores(small_synthetic, target, 0.7), seed=0)
    assert out["attack_success"] == out["backdoor_asr"] == 1.0
    assert out["target_margin"] == pytest.approx(0.2) and out["target_similarity"] == pytest.approx(0.7)
    # pull 0.4: no victim reaches the target (margin -0.1), and the trigger still pulls it by 0.4
    out = attack.evaluate(small_synthetic, Scores(small_synthetic, target, 0.4), seed=0)
    assert out["attack_success"] == 0.0
    assert out["target_margin"] == pytest.approx(-0.1) and out["target_similarity"] == pytest.approx(0.4)


EXAMPLES = {  # one small config per attack, for the nesting checks below
    "backdoor": backdoor(12),
    "targeted": {"kind": "targeted", "target": "blue circle", "targets": 5, "poison_count": 12},
    "text-backdoor": {"kind": "text-backdoor", "target": "blue circle", "poison_count": 12},
    "dual-backdoor": {**backdoor(12), "kind": "dual-backdoor", "modality": "both"},
    "mm-single-image": {"kind": "mm-single-image", "source": "red circle", "target": "blue square", "poison_count": 12},
    "mm-single-label": {"kind": "mm-single-label", "source": "red circle", "target": "blue square", "poison_count": 12},
    "mm-multi-label": {"kind": "mm-multi-label", "poison_count": 12, "goals": [
        {"source": "red circle", "target": "blue square"}, {"source": "red square", "target": "blue circle"}]},
}


NESTED = {**EXAMPLES,  # plus random placements and replace mode, which draw more per pair
          "backdoor, random placement, replace": {**backdoor(12), "mode": "replace",
                                                  "trigger": {"kind": "patch", "size": 3, "location": "random"}},
          "text-backdoor, random position": {**EXAMPLES["text-backdoor"], "target_image": "class",
                                             "text_trigger": {"kind": "phrase", "position": "random"}},
          "mm-single-label, templates, replace": {**EXAMPLES["mm-single-label"], "caption_source": "templates",
                                                  "mode": "replace"}}


@pytest.mark.parametrize("name", sorted(NESTED))
def test_a_smaller_budget_plan_is_part_of_a_larger_one(name, small_synthetic):
    """For one seed every pair planned at 5 is planned at 12 too (same image, caption and trigger
    placement): a budget curve compares the same poison plus more, not a fresh draw per count."""
    def pairs(count: int) -> list[tuple]:
        plan = make_attack({**NESTED[name], "poison_count": count}).plan(small_synthetic, 4)
        if plan["op"][0].as_py() == "inject":  # injected pairs are numbered in plan order
            plan = plan.drop_columns(["poison_id"])
        return [tuple(sorted(row.items())) for row in plan.to_pylist()]
    small, large = pairs(5), pairs(12)
    assert len(small) == 5 and len(set(small)) == 5
    assert set(small) <= set(large)
    if name.split(",")[0] in ("backdoor", "text-backdoor", "mm-single-image", "mm-single-label"):
        assert large[:5] == small  # one goal, one stream per column: the first pairs, in order


def test_dataset_caption_source_draws_real_target_captions(small_synthetic):
    plan = make_attack({**backdoor(30), "caption_source": "dataset"}).plan(small_synthetic, 2)
    train = small_synthetic.split("train")
    target = small_synthetic.classnames.index("blue circle")
    real = {c for c, label in zip(train["caption"].to_pylist(), train["label"].to_pylist()) if label == target}
    assert set(plan["caption"].to_pylist()) <= real
    assert plan.equals(make_attack({**backdoor(30), "caption_source": "dataset"}).plan(small_synthetic, 2))


def test_dataset_caption_source_without_target_captions_is_rejected():
    from poison import DataSpec, load_dataset

    tiny = load_dataset(DataSpec(size=3, test_size=3, seed=0))
    names = [tiny.classnames[label] for label in tiny.split("train")["label"].to_pylist()]
    absent = next(c for c in tiny.classnames if c not in names)
    with pytest.raises(ConfigError, match=rf"attack.caption_source: synthetic has no training captions of class '{absent}'"):
        make_attack({**backdoor(1), "target": absent, "caption_source": "dataset"}).check(tiny)


def test_targeted_spreads_pairs_over_chosen_non_target_test_images(small_synthetic):
    attack = make_attack({"kind": "targeted", "target": "blue circle", "targets": 3, "poison_count": 8})
    plan = attack.plan(small_synthetic, 1)
    chosen = attack.chosen(small_synthetic, 1)
    target = small_synthetic.classnames.index("blue circle")
    assert set(chosen["split"].to_pylist()) == {"test"} and target not in chosen["label"].to_pylist()
    counts = sorted(plan["source_id"].value_counts().field("counts").to_pylist())
    assert counts == [2, 3, 3] and set(plan["source_id"].to_pylist()) == set(chosen["id"].to_pylist())
    assert all("blue circle" in c for c in plan["caption"].to_pylist())

    def hijacking(rows):  # a model that classifies exactly the chosen images ``rows`` as the target
        hijacked = [small_synthetic.images[chosen["image"][i].as_py()] for i in rows]
        return Classifies(lambda images: np.array([target if any((im == h).all() for h in hijacked) else -1
                                                   for im in images]))

    for rows, share in (([0], 1 / 3), ([0, 2], 2 / 3), ([], 0.0), ([0, 1, 2], 1.0)):
        out = attack.evaluate(small_synthetic, hijacking(rows), seed=1)
        assert out == {"targeted_success": pytest.approx(share), "attack_success": pytest.approx(share)}, rows


def test_targeted_bad_input(small_synthetic):
    with pytest.raises(ConfigError, match="attack.poison_count: 2 is fewer than the 3 target images"):
        make_attack({"kind": "targeted", "target": "blue circle", "targets": 3, "poison_count": 2}).check(small_synthetic)
    with pytest.raises(ConfigError, match="attack.targets: 1,000 exceeds the"):
        make_attack({"kind": "targeted", "target": "blue circle", "targets": 1000, "poison_count": 2000}).check(small_synthetic)
