
"""Text triggers, text/dual backdoors and Yang et al.'s retrieval attacks: plans, bad input,
and their metrics on models whose rankings are worked out by hand."""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

from poison import ConfigError, DataSpec, load_dataset, make_attack
from poison.attacks.retrieval import hit_metrics, min_ranks, ranks_by_embedding
from poison.text_triggers import TEXT_TRIGGERS, make_text_trigger
from tests.support import backdoor

TARGET, SOURCE = "blue circle", "red circle"


@pytest.fixture(scope="module")
def data():
    """Enough test pairs that every class has test images (24 classes)."""
    ds = load_dataset(DataSpec(dataset="synthetic", size=1200, test_size=480, seed=5))
    assert len(set(ds.split("test")["label"].to_pylist())) == len(ds.classnames)
    return ds


class FakeClip:
    """A ModelView with one-hot embeddings by class: an image embeds as its true class
    (looked up by its pixels below and right of row/column 8, so a 4 px trigger in the
    top-left corner does not change it), a caption as the class it describes. ``text_backdoor``
    sends captions containing the trigger word to that class; ``hijack`` maps
    captions of one class to another (a poisoned retrieval model)."""

    def __init__(self, dataset, *, text_backdoor=None, trigger="cf", hijack=None):
        self.n = len(dataset.classnames)
        self.image_label = {dataset.images[i][8:, 8:].tobytes(): label for i, label in
                            zip(dataset.manifest["image"].to_pylist(), dataset.manifest["label"].to_pylist())}
        self.caption_label = dict(zip(dataset.manifest["caption"].to_pylist(), dataset.manifest["label"].to_pylist()))
        self.text_backdoor, self.trigger, self.hijack = text_backdoor, trigger, hijack or {}

    def _onehot(self, labels):
        return np.eye(self.n)[np.asarray(labels, dtype=int)]

    def embed_images(self, images):
        return self._onehot([self.image_label[im[8:, 8:].tobytes()] for im in images])

    def embed_texts(self, captions):
        labels = []
        for c in captions:
            words = c.split()
            if self.trigger in words:
                if self.text_backdoor is not None:
                    labels.append(self.text_backdoor)
                    continue
                words.remove(self.trigger)
            label = self.caption_label[" ".join(words)]
            labels.append(self.hijack.get(label, label))
        return self._onehot(labels)

    def classify(self, images):
        return np.argmax(self.embed_images(images), axis=1)


# --- metrics by hand ---

def test_min_rank_is_one_based_with_ties_in_the_query_s_favour():
    scores = np.array([[0.9, 0.5, 0.5, 0.1],    # targets {1, 2} tie at 0.5; one item above: rank 2
                       [0.1, 0.2, 0.3, 0.4],    # best target (2) has only item 3 above: rank 2
                       [0.0, 0.7, 0.0, 0.7]])   # a tie with a non-target counts for the query: rank 1
    assert min_ranks(scores, np.array([False, True, True, False])).tolist() == [2, 2, 1]
    per_query = np.array([[True, False, False, False]] * 3)
    assert min_ranks(scores, per_query).tolist() == [1, 4, 3]
    with pytest.raises(ValueError, match="at least one target"):
        min_ranks(scores, np.zeros(4, bool))


def test_min_rank_maps_to_mm_poison_by_one_and_hit_at_k_agrees():
    """mm_poison (Yang et al.) takes the 0-based position of the first target in each query's
    descending sort and counts hit_k as rank < k; without ties ours is theirs + 1."""
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(40, 25))  # continuous: no ties
    targets = np.zeros(25, bool)
    targets[[2, 11, 19]] = True
    order = np.argsort(-scores, axis=1)
    theirs = np.array([np.flatnonzero(targets[row])[0] for row in order])
    ours = min_ranks(scores, targets)
    assert (ours == theirs + 1).all()
    for k in (1, 5, 10):
        assert hit_metrics(ours)[f"hit_at_{k}"] == np.mean(theirs < k)


def test_ranks_by_embedding_in_blocks_equal_the_whole_matrix():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(50, 8)), rng.normal(size=(30, 8))
    targets = rng.random(30) < 0.2
    assert (ranks_by_embedding(q, g, targets, block=7) == min_ranks(q @ g.T, targets)).all()


def test_hit_at_k_counts_ranks_up_to_k():
    m = hit_metrics(np.array([1, 5, 6, 10, 11]))
    assert (m["hit_at_1"], m["hit_at_5"], m["hit_at_10"]) == (0.2, 0.4, 0.8)
    assert m["min_rank_mean"] == pytest.approx(6.6) and m["min_rank_median"] == 6
    assert set(hit_metrics(np.array([3]), "i2t_")) == {"i2t_hit_at_1", "i2t_hit_at_5", "i2t_hit_at_10",
                                                        "i2t_min_rank_mean", "i2t_min_rank_median"}


# --- text triggers ---

def test_phrase_trigger_positions_by_hand():
    t = make_text_trigger({"text": "  zz   top ", "position": "end"})
    assert t.text == "zz top"
    caps = ["a red circle", "one"]
    assert t.apply(caps, t.placement(caps, np.random.default_rng(0))) == ["a red circle zz top", "one zz top"]
    start = make_text_trigger({})
    assert start.apply(caps, start.placement(caps, None)) == ["cf a red circle", "cf one"]
    rand = make_text_trigger({"position": "random"})
    pos = rand.placement(caps * 50, np.random.default_rng(1))
    assert set(pos[::2]) == {0, 1, 2, 3} and set(pos[1::2]) == {0, 1}
    assert (pos == rand.placement(caps * 50, np.random.default_rng(1))).all()


def test_text_trigger_bad_input():
    with pytest.raises(ConfigError, match="attack.text_trigger.text: the trigger needs at least one word"):
        make_text_trigger({"text": "  "})
    with pytest.raises(ConfigError, match=re.escape(f"attack.text_trigger.kind: unknown text trigger 'emoji'; valid: {', '.join(TEXT_TRIGGERS.names())}")):
        make_text_trigger({"kind": "emoji"})
    with pytest.raises(ConfigError, match="attack.text_trigger.position: expected 'start', 'end' or 'random'"):
        make_attack({"kind": "text-backdoor", "target": TARGET, "poison_count": 1,
                     "text_trigger": {"position": "middle"}})


# --- text-backdoor ---

def _labels(dataset, ids):
    lookup = dict(zip(dataset.manifest["id"].to_pylist(), dataset.manifest["label"].to_pylist()))
    return [lookup[i] for i in ids]


def test_text_backdoor_plan_pairs_triggered_non_target_captions_with_target_images(data):
    attack = make_attack({"kind": "text-backdoor", "target": TARGET, "poison_count": 40,
                          "text_trigger": {"text": "cf", "position": "random"}})
    plan = attack.plan(data, 3)
    target = data.classnames.index(TARGET)
    captions = dict(zip(data.manifest["id"].to_pylist(), data.manifest["caption"].to_pylist()))
    assert plan.num_rows == 40 and set(plan["op"].to_pylist()) == {"inject"}
    assert set(plan["source_label"].to_pylist()) == {target}                  # images of the target class
    sources = plan["caption_source_id"].to_pylist()
    assert len(set(sources)) == 40 and target not in _labels(data, sources)   # distinct non-target captions
    for caption, src, at in zip(plan["caption"].to_pylist(), sources, plan["text_trigger_position"].to_pylist()):
        words = captions[src].split()
        assert caption.split() == words[:at] + ["cf"] + words[at:]
    assert plan.equals(attack.plan(data, 3)) and not plan.equals(attack.plan(data, 4))


def test_text_backdoor_single_target_image_and_replace(data):
    attack = make_attack({"kind": "text-backdoor", "target": TARGET, "poison_count": 25,
                          "target_image": "single", "mode": "replace"})
    plan = attack.plan(data, 0)
    chosen = attack.chosen(data, 0)
    assert chosen["split"].to_pylist() == ["test"] and chosen["label"][0].as_py() == data.classnames.index(TARGET)
    assert set(plan["source_id"].to_pylist()) == {chosen["id"][0].as_py()}
    assert plan["poison_id"].to_pylist() == plan["caption_source_id"].to_pylist()  # the altered pairs


def test_text_backdoor_success_on_hand_worked_models(data):
    attack = make_attack({"kind": "text-backdoor", "target": TARGET, "poison_count": 5})
    target = data.classnames.index(TARGET)
    poisoned = attack.evaluate(data, FakeClip(data, text_backdoor=target), seed=0)
    assert poisoned["attack_success"] == poisoned["hit_at_1"] == 1.0 and poisoned["min_rank_mean"] == 1.0
    # a clean model ranks the query's own class first: the best target-class image comes
    # right after all test images of the query's class
    clean = attack.evaluate(data, FakeClip(data), seed=0)
    test = data.split("test")
    labels = np.array(test["label"].to_pylist())
    expected = [1 + int(np.sum(labels == label)) for label in labels if label != target]
    assert clean["min_rank_mean"] == pytest.approx(np.mean(expected))
    assert clean["attack_success"] == 0.0 and clean["hit_at_10"] == pytest.approx(np.mean(np.array(expected) <= 10))


def test_text_backdoor_bad_input(data):
    pool = int(np.sum(np.array(data.split("train")["label"].to_pylist()) != data.classnames.index(TARGET)))
    with pytest.raises(ConfigError, match=rf"attack.poison_count: {pool + 1:,} exceeds the {pool:,} non-target"):
        make_attack({"kind": "text-backdoor", "target": TARGET, "poison_count": pool + 1}).check(data)
    with pytest.raises(ConfigError, match="attack.target: 'pink circle' is not a class"):
        make_attack({"kind": "text-backdoor", "target": "pink circle", "poison_count": 1}).check(data)


# --- dual-backdoor ---

def test_dual_backdoor_splits_the_budget_and_stamps_only_image_rows(data):
    cfg = {**backdoor(13, location="top-left", pattern="solid", colour=[7, 7, 7]), "kind": "dual-backdoor",
           "mode": "replace"}
    attack = make_attack(cfg)
    plan = attack.plan(data, 2)
    parts = plan["part"].to_pylist()
    assert (parts.count("image"), parts.count("text")) == (7, 6) and attack.trigger_name == "patch+phrase"
    assert len(set(plan["poison_id"].to_pylist())) == 13          # the two halves alter different pairs
    cols = {c: plan[c].to_numpy() for c in ("part", "trigger_x", "trigger_y")}
    images = data.images[plan["image"].to_numpy()]
    out = attack.stamp(images, cols)
    image_rows = np.array(parts) == "image"
    assert (out[image_rows, :4, :4] == 7).all() and (out[~image_rows] == images[~image_rows]).all()
    assert all(c.split()[0] == "cf" for c, p in zip(plan["caption"].to_pylist(), parts) if p == "text")
    for modality, sizes in (("image", (13, 0)), ("text", (0, 13))):
        only = make_attack({**cfg, "modality": modality})
        assert only.counts() == sizes and only.plan(data, 2).num_rows == 13 and only.modality_tag == modality


def test_dual_backdoor_headline_follows_its_modality(data):
    target = data.classnames.index(TARGET)
    cfg = {**backdoor(4, location="top-left"), "kind": "dual-backdoor"}
    model = FakeClip(data, text_backdoor=target)  # text backdoored, image side clean
    results = {m: make_attack({**cfg, "modality": m}).evaluate(data, model, 0) for m in ("image", "text", "both")}
    asr = results["image"]["backdoor_asr"]
    assert asr == 0.0 and results["text"]["hit_at_1"] == 1.0
    assert results["image"]["attack_success"] == asr
    assert results["text"]["attack_success"] == 1.0
    assert results["both"]["attack_success"] == pytest.approx(0.5)


# --- Yang et al. attacks I, II, III ---

def test_single_label_pairs_source_captions_with_target_images(data):
    attack = make_attack({"kind": "mm-single-label", "source": SOURCE, "target": TARGET, "poison_count": 30})
    plan = attack.plan(data, 0)
    source, target = data.classnames.index(SOURCE), data.classnames.index(TARGET)
    assert plan.num_rows == 30 and set(plan["source_label"].to_pylist()) == {target}
    assert set(_labels(data, plan["caption_source_id"].to_pylist())) == {source}
    captions = dict(zip(data.manifest["id"].to_pylist(), data.manifest["caption"].to_pylist()))
    assert plan["caption"].to_pylist() == [captions[i] for i in plan["caption_source_id"].to_pylist()]
    # the target images are training images of the target class (attack II: the class, not one image)
    assert set(plan["source_id"].to_pylist()) <= set(data.split("train")["id"].to_pylist())
    assert set(_labels(data, plan["source_id"].to_pylist())) == {target}
    assert len(set(plan["source_id"].to_pylist())) > 1


def test_single_label_cycles_through_the_target_images_and_reports_the_source_rate(data):
    """Attack II as mm_poison spreads it: 500 pairs over the target class's m training images use
    each ⌊500/m⌋ or ⌈500/m⌉ times; a smaller count's images are a prefix; ``independent`` (ours)
    draws with replacement. ``source_poison_rate`` is the count over the source's training pairs."""
    from poison.attacks.backdoor import class_rows

    target = data.classnames.index(TARGET)
    m = class_rows(data, "train", target).num_rows
    attack = make_attack({"kind": "mm-single-label", "source": SOURCE, "target": TARGET, "poison_count": 500})
    uses = list(__import__("collections").Counter(attack.plan(data, 0)["source_id"].to_pylist()).values())
    assert len(uses) == m and set(uses) <= {500 // m, 500 // m + 1}
    small = make_attack({"kind": "mm-single-label", "source": SOURCE, "target": TARGET, "poison_count": 30})
    assert small.plan(data, 0)["source_id"].to_pylist() == attack.plan(data, 0)["source_id"].to_pylist()[:30]
    independent = make_attack({"kind": "mm-single-label", "source": SOURCE, "target": TARGET, "poison_count": 500,
                               "target_images": "independent"})
    spread = __import__("collections").Counter(independent.plan(data, 0)["source_id"].to_pylist()).values()
    assert max(spread) - min(spread) > 1  # uniform draws are not balanced
    sources = class_rows(data, "train", data.classnames.index(SOURCE)).num_rows
    assert small.source_poison_rate(data) == pytest.approx(30 / sources)


def test_single_image_uses_one_test_image_and_replace_alters_source_pairs(data):
    attack = make_attack({"kind": "mm-single-image", "source": SOURCE, "target": TARGET, "poison_count": 9,
                          "mode": "replace"})
    plan = attack.plan(data, 1)
    (chosen,) = set(plan["source_id"].to_pylist())
    test_ids = set(data.split("test")["id"].to_pylist())
    assert chosen in test_ids and _labels(data, [chosen]) == [data.classnames.index(TARGET)]
    altered = plan["poison_id"].to_pylist()
    assert len(set(altered)) == 9 and set(_labels(data, altered)) == {data.classnames.index(SOURCE)}


def test_multi_label_splits_the_budget_over_goals(data):
    goals = [{"source": SOURCE, "target": TARGET}, {"source": "green square", "target": "cyan cross"}]
    plan = make_attack({"kind": "mm-multi-label", "goals": goals, "poison_count": 13}).plan(data, 0)
    assert plan["goal"].to_pylist() == [0] * 7 + [1] * 6
    second = plan.filter(pa.compute.equal(plan["goal"], 1))
    assert set(second["source_label"].to_pylist()) == {data.classnames.index("cyan cross")}


def test_retrieval_attack_success_on_hand_worked_models(data):
    source, target = data.classnames.index(SOURCE), data.classnames.index(TARGET)
    labels = np.array(data.split("test")["label"].to_pylist())
    for kind in ("mm-single-label", "mm-single-image"):
        attack = make_attack({"kind": kind, "source": SOURCE, "target": TARGET, "poison_count": 3})
        hijacked = attack.evaluate(data, FakeClip(data, hijack={source: target}), seed=0)
        assert hijacked["hit_at_1"] == 1.0 and hijacked["attack_success"] == hijacked["hit_at_10"] == 1.0
        clean = attack.evaluate(data, FakeClip(data), seed=0)
        # a clean model ranks all source-class images (ties at score 1) before any target image
        assert clean["min_rank_mean"] == 1 + np.sum(labels == source)
        # image→text: each target image ranks all captions; the source's come after its own class's
        assert clean["i2t_min_rank_mean"] == 1 + np.sum(labels == target)
        assert hijacked["i2t_min_rank_mean"] == 1  # hijacked source captions tie with its own class's
    assert clean["attack_success"] == float(1 + np.sum(labels == source) <= 10)


def test_retrieval_attack_bad_input(data):
    base = {"kind": "mm-single-label", "source": SOURCE, "target": TARGET, "poison_count": 3}
    with pytest.raises(ConfigError, match="attack.source: 'pink' is not a class of synthetic"):
        make_attack({**base, "source": "pink"}).check(data)
    with pytest.raises(ConfigError, match="attack.target: 'red circle' is also the source class"):
        make_attack({**base, "target": SOURCE}).check(data)
    pool = int(np.sum(np.array(data.split("train")["label"].to_pylist()) == data.classnames.index(SOURCE)))
    with pytest.raises(ConfigError, match=rf"attack.poison_count: {pool + 1} poisoned pairs of 'red circle' need as many"):
        make_attack({**base, "poison_count": pool + 1, "mode": "replace"}).check(data)
    goals = [{"source": SOURCE, "target": TARGET}, {"source": SOURCE, "target": "cyan cross"}]
    with pytest.raises(ConfigError, match="attack.goals\\[1\\].source: 'red circle' is already the source"):
        make_attack({"kind": "mm-multi-label", "goals": goals, "poison_count": 4})
    with pytest.raises(ConfigError, match="attack.goals\\[1\\].target: 'nope' is not a class"):
        make_attack({"kind": "mm-multi-label", "poison_count": 4,
                     "goals": [goals[0], {"source": "cyan cross", "target": "nope"}]}).check(data)
    with pytest.raises(ConfigError, match="attack.goals: "):
        make_attack({"kind": "mm-multi-label", "goals": [], "poison_count": 4})


def test_attacks_on_a_dataset_without_labels_are_rejected(data):
    from dataclasses import replace

    unlabelled = replace(data, classnames=[])
    for cfg in ({"kind": "targeted", "target": TARGET, "poison_count": 2},
                {"kind": "mm-single-label", "source": SOURCE, "target": TARGET, "poison_count": 2}):
        with pytest.raises(ConfigError, match="has no class labels, and this attack needs them"):
            make_attack(cfg).check(unlabelled)
