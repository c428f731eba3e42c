"""``data.zeroshot``: web pairs without classes for training, a labelled set for evaluation
(Carlini & Terzis: Conceptual Captions → ImageNet zero-shot). Made here from tiny files: a CSV
of coloured squares whose captions name colours (or not), and an image folder of colour classes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from poison import ConfigError, DataError, DataSpec, load_dataset, make_attack
from poison.datasets import fashion_mnist
from poison.datasets.zeroshot import StackedImages, caption_labels
from sweeps.cli import main
from tests.support import COLOURS, backdoor, mean_colour, write_image


def _reference_labels(captions: list[str], classnames: list[str]) -> list[int]:
    """The definition written out: the one class whose words occur consecutively in the caption."""
    names = [[w for w in re.split(r"[^a-z0-9]+", c.lower()) if w] for c in classnames]
    out = []
    for caption in captions:
        words = [w for w in re.split(r"[^a-z0-9]+", caption.lower()) if w]
        hits = {i for i, n in enumerate(names) for j in range(len(words) - len(n) + 1) if words[j : j + len(n)] == n}
        out.append(hits.pop() if len(hits) == 1 else -1)
    return out


def test_caption_labels_by_hand():
    classes = ["cat", "dog", "sea lion", "hot dog", "T-shirt/top"]
    captions = ["a cat", "Two DOGS", "a dog.", "a sea lion on a rock", "sea and lion", "my hot dog",
                "a t-shirt (top) for sale", "a cat and a dog", "", "concatenate"]
    # "my hot dog" names both "dog" and "hot dog": ambiguous; "concatenate" is no "cat"
    assert caption_labels(pa.array(captions), classes).tolist() == [0, -1, 1, 2, -1, -1, 4, -1, -1, -1]


def test_caption_labels_agree_with_the_definition_on_random_captions():
    rng = np.random.default_rng(3)
    vocabulary = [f"w{i}" for i in range(40)]
    classes = [" ".join(rng.choice(vocabulary, rng.integers(1, 4))) for _ in range(25)]
    captions = [", ".join(rng.choice(vocabulary, rng.integers(2, 9))) for _ in range(3000)]
    labels = caption_labels(pa.array(captions), classes)
    assert labels.tolist() == _reference_labels(captions, classes)
    assert (labels >= 0).sum() > 300 and (labels == -1).sum() > 300  # both outcomes exercised


def test_own_classes_are_kept_where_the_evaluation_set_has_them_else_the_caption_decides():
    from poison.datasets.zeroshot import with_zeroshot
    from poison.manifest import Dataset, make_manifest

    def dataset(name, captions, labels, split, classes):
        n = len(captions)
        return Dataset(name=name, manifest=make_manifest(image=np.arange(n), caption=captions, label=np.array(labels),
                                                         split=[split] * n),
                       classnames=classes, templates=["{}"], image_size=4, _render=lambda: np.zeros((n, 4, 4, 3), np.uint8))

    train = dataset("folders", ["a red square", "a blue thing", "a blue n02"], [0, 1, 0], "train", ["n01", "n02"])
    test = dataset("colours", ["red", "blue"], [0, 1], "test", ["red", "blue", "n01"])
    both = with_zeroshot(train, test)
    # n01 exists in the evaluation set: kept even though the caption says red; n02 does not: the caption's
    assert both.split("train")["label"].to_pylist() == [2, 1, 2]
    assert caption_labels(pa.array(["ΟΔΟΣ x"]), ["ΟΔΟΣ"]).tolist() == [0]  # one lowering for names and captions


def test_stacked_images_index_both_arrays():
    a = np.arange(3 * 2 * 2 * 3, dtype=np.uint8).reshape(3, 2, 2, 3)
    b = 100 + np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    s = StackedImages(a, b, offset=4)  # row 3 of the index space is unused (a dropped test image)
    assert s.shape == (6, 2, 2, 3) and len(s) == 6
    assert np.array_equal(s[np.array([5, 0, 4, 2])], np.stack([b[1], a[0], b[0], a[2]]))
    assert np.array_equal(s[4], b[0]) and np.array_equal(s[1], a[1])
    with pytest.raises(DataError, match="data.zeroshot: its images are"):
        StackedImages(a, np.zeros((1, 3, 3, 3), np.uint8), offset=3)


@pytest.fixture
def web(tmp_path):
    """A CSV of 40 pairs (captions: 12 name red, 8 blue, 8 green, 4 red and blue, 8 nothing)
    and an image folder of red/green/blue classes with its own val split."""
    lines = ["image\ttext"]
    kinds = ["red"] * 12 + ["blue"] * 8 + ["green"] * 8 + ["red and blue"] * 4 + [None] * 8
    for i, kind in enumerate(kinds):
        colour = COLOURS[kind.split()[0]] if kind else COLOURS["yellow"]
        write_image(tmp_path / "web" / f"{i}.jpg", colour, seed=i)
        lines.append(f"web/{i}.jpg\t{f'a photo, {kind} square' if kind else 'an unusual square'} #{i}")
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    for split, count in (("train", 2), ("val", 4)):
        for c, name in enumerate(("red", "green", "blue")):
            for i in range(count):
                write_image(tmp_path / "eval" / split / name / f"{i}.png", COLOURS[name], seed=500 + 10 * c + i)
    return tmp_path


def _config(web, **extra):
    from trainers import parse_trial_config

    return parse_trial_config({
        "data": {"dataset": "csv", "path": str(web / "pairs.tsv"), "size": None, "test_size": 4, "image_size": 32,
                 "zeroshot": {"dataset": "imagefolder", "path": str(web / "eval")}},
        **extra})


def test_web_pairs_take_the_class_their_caption_names_and_test_on_the_labelled_set(web):
    ds = load_dataset(_config(web).data_spec())
    assert ds.classnames == ["blue", "green", "red"]
    train, test = ds.split("train"), ds.split("test")
    # the csv's own 4 test pairs are gone: the test split is the folder's val/ (4 per class)
    assert train.num_rows == 36 and test.num_rows == 12
    assert sorted(test["label"].to_pylist()) == [0] * 4 + [1] * 4 + [2] * 4
    for caption, label, image in zip(*(train[k].to_pylist() for k in ("caption", "label", "image"))):
        said = caption.split(",")[1] if "," in caption else ""  # "a photo, red and blue square #28"
        named = [c for c in ds.classnames if c in said]
        assert label == (ds.classnames.index(named[0]) if len(named) == 1 else -1), caption
        colour = said.split()[0] if named else "yellow"  # "red and blue" squares are red
        assert np.abs(mean_colour(ds.images[image]) - COLOURS[colour]).max() < 12, caption
    for label, image in zip(test["label"].to_pylist(), test["image"].to_pylist()):
        assert np.abs(mean_colour(ds.images[image]) - COLOURS[ds.classnames[label]]).max() < 12
    assert len(set(train["id"].to_pylist()) | set(test["id"].to_pylist())) == 48  # ids stay unique


def test_attacks_that_need_classes_run_on_web_pairs(web):
    ds = load_dataset(_config(web).data_spec())
    train = ds.split("train")
    named = {i: c for i, c in zip(train["id"].to_pylist(), train["caption"].to_pylist())}
    # captions "of the target" are the web captions that name it (Carlini & Terzis' caption source)
    plan = make_attack({**backdoor(6), "target": "blue", "caption_source": "dataset"}).plan(ds, seed=0)
    assert plan.num_rows == 6
    assert all(re.search(r"\bblue\b", c) and "red" not in c for c in plan["caption"].to_pylist())
    assert not set(plan["source_id"].to_pylist()) & {i for i, c in named.items() if ", blue square" in c}
    # targeted: the chosen images are the labelled set's test images
    targeted = make_attack({"kind": "targeted", "target": "green", "targets": 2,
                            "poison_count": 4}).plan(ds, seed=0)
    assert set(targeted["image"].to_pylist()) <= set(ds.split("test")["image"].to_pylist())
    with pytest.raises(ConfigError, match=r"attack.target: 'yellow' is not a class of csv \(zero-shot on imagefolder\)"):
        make_attack({**backdoor(2), "target": "yellow"}).plan(ds, 0)


def test_zeroshot_input_is_checked(web):
    with pytest.raises(DataError, match=r"data.zeroshot.size: synthetic has no test split of its own \(1 image drawn\)"):
        load_dataset(_config(web, data={"dataset": "csv", "path": str(web / "pairs.tsv"), "size": None, "test_size": 4,
                                        "zeroshot": {"dataset": "synthetic"}}).data_spec())
    with pytest.raises(DataError, match=r"data.zeroshot.path: .*/nowhere does not exist"):
        load_dataset(_config(web, data={"dataset": "csv", "path": str(web / "pairs.tsv"), "size": None, "test_size": 4,
                                        "zeroshot": {"dataset": "imagefolder", "path": str(web / "nowhere")}}).data_spec())
    with pytest.raises(ConfigError, match="data.zeroshot.dataset: required key is missing"):
        _config(web, data={"zeroshot": {"path": "x"}})
    with pytest.raises(DataError, match="data.zeroshot.dataset: csv has no classes to classify into"):
        load_dataset(_config(web, data={"dataset": "csv", "path": str(web / "pairs.tsv"), "size": None, "test_size": 4,
                                        "zeroshot": {"dataset": "csv", "path": str(web / "pairs.tsv"), "size": 4}}).data_spec())


def test_a_trial_trains_on_web_pairs_and_reports_on_the_labelled_set(web, tmp_path):
    """20 epochs on the 40 web pairs learn the colours their captions name: the folder's val/
    images are classified (1.0 at seeds 0-2; 0.33-0.67 after 10 epochs; chance 1/3)."""
    from trainers import run_trial

    config = _config(web, model={"arch": "tiny-rn"}, train={"epochs": 20, "batch_size": 16, "threads": 1},
                     attack={**backdoor(4), "target": "red"})
    result = run_trial(config, cache_dir=str(tmp_path / "cache"), baseline=False)
    m = result.metrics
    assert m["poison_count"] == 4 and m["poison_rate"] == pytest.approx(4 / 40)
    assert m["utility"] == m["zeroshot_top1"]  # classes exist: utility is zero-shot top-1 on the folder's val/
    assert m["utility"] >= 0.9
    assert m["attack_success"] == m["backdoor_asr"]


@pytest.fixture(scope="module")
def fashion_web(tmp_path_factory):
    """Fashion-MNIST's training images written out as a CC3M-style TSV of PNG files and captions
    (no classes), and a storage folder that the tests below share (one clean model)."""
    if not Path(fashion_mnist.DEFAULT_PATH).is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
    folder = tmp_path_factory.mktemp("fashion-web")
    pairs = load_dataset(DataSpec(dataset="fashion-mnist", size=2000, test_size=10, image_size=28, seed=5))
    train = pairs.split("train")
    lines = ["filepath\tcaption"]
    for i, (image, caption) in enumerate(zip(train["image"].to_pylist(), train["caption"].to_pylist())):
        Image.fromarray(np.asarray(pairs.images[image])).save(folder / f"{i}.png")
        lines.append(f"{i}.png\t{caption}")
    (folder / "web.tsv").write_text("\n".join(lines) + "\n")
    return folder


# measured at seeds 0, 1, 2, the poisoned trial taking its clean model's optimizer steps (clean
# model in brackets): backdoor ASR 1.0, 1.0, 0.985 (0.02, 0.002, 0.002), utility drops 0.044,
# -0.016, 0.036; text backdoor hit@1 1.0, 1.0, 1.0 (0.0, 0.004, 0.0), drops 0.022, -0.03, 0.038;
# targeted (4 of the labelled set's test images, 30 web captions naming bag each): 4 of 4 hijacked
# at every seed (0 of 4), drops 0.056, 0.0, 0.058 (hence the bound of 0.08); dual backdoor (150 + 150 pairs):
# ASR 1.0, 1.0 and hit@1 1.0, 1.0 at seeds 0 and 1 (mean 0.01, 0.003 on the clean model), drops 0.128 and 0.0:
# utility at this size still swings by about 0.1 from seed to seed, so the dual test holds only
# its floor (the synthetic dual-backdoor preset's drop, -0.005, is in the README)
@pytest.mark.slow
@pytest.mark.parametrize("attack, metric", [
    ({"kind": "backdoor", "target": "bag", "poison_count": 150, "caption_source": "dataset",
      "trigger": {"kind": "patch", "size": 6, "location": "bottom-right"}}, "backdoor_asr"),
    ({"kind": "text-backdoor", "target": "bag", "poison_count": 150}, "hit_at_1"),
    ({"kind": "targeted", "target": "bag", "targets": 4, "poison_count": 120, "caption_source": "dataset"},
     "targeted_success"),
    ({"kind": "dual-backdoor", "target": "bag", "poison_count": 300, "modality": "both", "caption_source": "dataset",
      "trigger": {"kind": "patch", "size": 6, "location": "bottom-right"}}, "attack_success"),
], ids=["backdoor", "text-backdoor", "targeted", "dual-backdoor"])
def test_an_attack_planted_in_web_pairs_works_zero_shot_on_a_labelled_set(fashion_web, attack, metric):
    """`poisonsweep train` on the web pairs, evaluated zero-shot on Fashion-MNIST's test split.
    The backdoor's poisoned captions are web captions that name the target; the text backdoor
    pairs triggered web captions with the web images whose captions name it; the targeted
    attack's poisoned pairs carry the labelled set's own test images into training."""
    config = {
        "name": "web", "seed": 0,
        "data": {"dataset": "csv", "path": str(fashion_web / "web.tsv"), "size": None, "test_size": 10,
                 "image_size": 32, "zeroshot": {"dataset": "fashion-mnist", "size": 500}},
        "train": {"epochs": 5, "batch_size": 64, "lr": 2.0e-3, "warmup": 0.05, "threads": 1},
        "attack": attack, "storage": {"path": str(fashion_web / "results")},
    }
    path = fashion_web / f"{attack['kind']}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = fashion_web / f"{attack['kind']}.json"
    assert main(["train", str(path), "--output", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["poison_count"] == attack["poison_count"] and m["data_skipped"] == 0
    assert m["attack_success"] == m[metric] >= 0.9 and m["clean_attack_success"] <= 0.1
    assert m["utility"] == m["zeroshot_top1"] > 0.6  # chance is 0.1
    if attack["kind"] == "dual-backdoor":  # both halves work, not just their mean
        assert m["backdoor_asr"] >= 0.9 and m["hit_at_1"] >= 0.9
    else:
        assert m["utility_drop"] <= 0.08


def test_data_classes_label_every_pair_by_its_caption(web):
    """``data.classes`` (Yang et al.'s COCO setting): the pairs' own test split, each pair of
    either split labelled with the class its caption names."""
    from poison.datasets.zeroshot import PROMPTS
    from trainers import parse_trial_config

    data = {"dataset": "csv", "path": str(web / "pairs.tsv"), "size": None, "test_size": 10, "image_size": 32,
            "classes": ["red", "green", "blue"]}
    ds = load_dataset(parse_trial_config({"data": data}).data_spec())
    assert ds.classnames == ["red", "green", "blue"] and ds.templates == PROMPTS
    assert ds.num_train == 30 and ds.split("test").num_rows == 10
    for caption, label in zip(ds.manifest["caption"].to_pylist(), ds.manifest["label"].to_pylist()):
        said = caption.split(",")[1] if "," in caption else ""
        named = [c for c in ds.classnames if c in said]
        assert label == (ds.classnames.index(named[0]) if len(named) == 1 else -1), caption
    # Yang et al.'s attack II on it: captions naming red paired with images whose captions name blue
    plan = make_attack({"kind": "mm-single-label", "source": "red", "target": "blue", "poison_count": 3,
                        "caption_source": "dataset"}).plan(ds, seed=0)
    train = ds.split("train")
    label_of = dict(zip(train["image"].to_pylist(), train["label"].to_pylist()))
    assert plan.num_rows == 3 and {label_of[i] for i in plan["image"].to_pylist()} == {2}
    assert all(re.search(r"\bred\b", c) for c in plan["caption"].to_pylist())
    with pytest.raises(ConfigError, match="data.classes: the classes come from data.zeroshot's dataset"):
        parse_trial_config({"data": {**data, "zeroshot": {"dataset": "fashion-mnist"}}})
    with pytest.raises(DataError, match="data.classes: synthetic has classes of its own"):
        load_dataset(parse_trial_config({"data": {"size": 100, "classes": ["red", "blue"]}}).data_spec())
    with pytest.raises(DataError, match="data.classes: no train caption of csv names one of cat, dog"):
        load_dataset(parse_trial_config({"data": {**data, "classes": ["cat", "dog"]}}).data_spec())


def test_class_metrics_leave_out_test_images_whose_caption_names_no_class():
    """Zero-shot utility counts only the test images with a class (worked by hand: two of four
    test images have one, both classified right; the old rule fell back to retrieval)."""
    from poison.manifest import Dataset, make_manifest
    from trainers.evaluate import Evaluator

    manifest = make_manifest(image=np.arange(4), caption=["a red one", "nothing", "a blue one", "nothing again"],
                             label=np.array([0, -1, 1, -1]), split=["test"] * 4)
    ds = Dataset(name="hand", manifest=manifest, classnames=["red", "blue"], templates=["{}"], image_size=8,
                 _render=lambda: np.zeros((4, 8, 8, 3), np.uint8))

    class Fixed(Evaluator):  # image i embeds as e_i; class c as e_{0} (red) or e_{2} (blue)
        def images(self, images):
            return np.eye(4, dtype=np.float32)[: len(images)]

        def texts(self, captions):
            return np.eye(4, dtype=np.float32)[: len(captions)]

        def class_embeddings(self):
            return np.eye(4, dtype=np.float32)[[0, 2]]

    out = Fixed(None, ds).utility()
    assert out["zeroshot_top1"] == 1.0 and out["utility"] == 1.0  # 2 of the 2 labelled images
    assert out["i2t_r1"] == 1.0  # retrieval still over all four


def test_a_trial_on_caption_classes_reports_zero_shot_utility_and_asr(web, tmp_path):
    from trainers import parse_trial_config, run_trial

    config = parse_trial_config({
        "data": {"dataset": "csv", "path": str(web / "pairs.tsv"), "size": None, "test_size": 10, "image_size": 32,
                 "classes": ["red", "green", "blue"]},
        "model": {"arch": "tiny-rn"}, "train": {"epochs": 40, "batch_size": 16, "threads": 1},
        "attack": {**backdoor(4), "target": "red"}})
    m = run_trial(config, cache_dir=str(tmp_path / "cache"), baseline=False).metrics
    labels = load_dataset(config.data_spec()).split("test")["label"].to_numpy()
    assert (labels == -1).any() and (labels >= 0).any()  # both kinds among the 10 test pairs
    # the labelled test pairs are classified above chance (1/3) after 40 epochs of one step each
    # (measured 1.0, 1.0, 0.5 at seeds 0-2; 0.43-0.67 after 20)
    assert m["utility"] == m["zeroshot_top1"] >= 0.5 and m["poison_count"] == 4
