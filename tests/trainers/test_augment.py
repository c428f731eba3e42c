"""The defenses' augmented views (trainers.augment), against EDA's operations worked by hand and
their rates where they are random (the give-ups of swap and insertion included), WordNet's
synonyms as EDA reads them, the fixed per-row caption views, the SimCLR-style image view, and the
loop's ``Objective.inputs`` hook that trains RoCLIP on them."""
import numpy as np
import pytest
import torch

from trainers import augment
from trainers.augment import (
    CaptionViews,
    clean,
    eda,
    random_deletion,
    random_insertion,
    random_swap,
    simclr_view,
    synonym_replacement,
)

SYNONYMS = {"circle": ("round",), "blue": ("azure", "blueness")}


def lookup(word):
    return SYNONYMS.get(word, ())


def have_wordnet():
    try:
        augment.wordnet()
        return True
    except augment.WordNetMissing:
        return False


def test_cleaning_as_eda():
    assert clean("A  blue-green CIRCLE,\tat (3, 4)!") == "a blue green circle at "
    assert clean(" isn't") == "isnt"


def test_synonym_replacement_replaces_every_occurrence_of_up_to_n_non_stop_words():
    words = ["the", "circle", "and", "the", "circle"]
    assert synonym_replacement(words, 1, np.random.default_rng(0), lookup) == ["the", "round", "and", "the", "round"]
    # a word without synonyms ("square") is passed over, and counts towards n only when replaced
    for seed in range(20):
        out = synonym_replacement(["square", "circle"], 1, np.random.default_rng(seed), lookup)
        assert out == ["square", "round"]
    # a synonym of several words becomes several words
    out = synonym_replacement(["circle"], 1, np.random.default_rng(0), lambda w: ("round shape",))
    assert out == ["round", "shape"]
    # stop words are never replaced
    assert synonym_replacement(["the", "a"], 2, np.random.default_rng(0), lambda w: ("x",)) == ["the", "a"]


def test_random_deletion_keeps_a_word():
    rng = np.random.default_rng(0)
    assert random_deletion(["one"], 1.0, rng) == ["one"]
    assert random_deletion(["a", "b", "c"], 0.0, rng) == ["a", "b", "c"]
    for _ in range(20):
        out = random_deletion(["a", "b", "c"], 1.0, rng)
        assert len(out) == 1 and out[0] in {"a", "b", "c"}
    kept = [len(random_deletion(list("abcdefghij"), 0.1, rng)) for _ in range(2000)]
    assert np.mean(kept) == pytest.approx(9.0, abs=0.1)  # each of 10 words kept with p 0.9


def test_random_swap_gives_up_after_three_redraws_as_eda():
    """Two words: the second position is redrawn while it equals the first, and the fourth draw
    gives up whatever it finds, so a swap happens with probability 1 - (1/2)³ = 0.875."""
    outs = [random_swap(["a", "b"], 1, np.random.default_rng(seed)) for seed in range(4000)]
    assert {tuple(o) for o in outs} == {("a", "b"), ("b", "a")}
    swapped = np.mean([o == ["b", "a"] for o in outs])
    assert swapped == pytest.approx(0.875, abs=0.02)
    assert random_swap(["x"], 1, np.random.default_rng(0)) == ["x"]  # nothing to swap with


def test_random_insertion_puts_a_synonym_before_a_word_and_gives_up_at_the_tenth_draw():
    """Three words, one with a synonym: each draw finds it with p 1/3; draws 1-9 count, so it is
    inserted with probability 1 - (2/3)⁹ = 0.974, always before some word (never last)."""
    outs = [random_insertion(["square", "circle", "small"], 1, np.random.default_rng(seed), lookup)
            for seed in range(4000)]
    inserted = [o for o in outs if len(o) == 4]
    assert all(o == ["square", "circle", "small"] for o in outs if len(o) == 3)
    assert len(inserted) / len(outs) == pytest.approx(1 - (2 / 3) ** 9, abs=0.01)
    assert all(o.count("round") == 1 and o.index("round") < 3 for o in inserted)
    positions = np.bincount([o.index("round") for o in inserted], minlength=3) / len(inserted)
    assert positions == pytest.approx([1 / 3] * 3, abs=0.04)


def test_eda_keeps_one_of_the_four_operations_at_random():
    """"a blue circle": synonym replacement changes one of blue/circle, insertion adds a word, swap
    reorders, deletion (p 0.1 per word) usually leaves it as it was; each is kept a quarter of the time."""
    kinds = {"replaced": 0, "inserted": 0, "swapped": 0, "other": 0}
    rng = np.random.default_rng(0)
    for _ in range(4000):
        out = eda("A blue circle.", rng, lookup=lookup).split()
        if len(out) == 4:
            kinds["inserted"] += 1
        elif len(out) == 3 and sorted(out) == ["a", "blue", "circle"] and out != ["a", "blue", "circle"]:
            kinds["swapped"] += 1
        elif len(out) == 3 and out != ["a", "blue", "circle"]:
            kinds["replaced"] += 1
        else:
            kinds["other"] += 1  # deletion, or an insertion or swap that gave up
    # insertion: 0.974 of a quarter; swap: 3 words, a redraw equals the first with p 1/3: 1 - (1/3)³
    assert kinds["replaced"] / 4000 == pytest.approx(0.25, abs=0.025)
    assert kinds["inserted"] / 4000 == pytest.approx(0.25 * (1 - (2 / 3) ** 9), abs=0.025)
    assert kinds["swapped"] / 4000 == pytest.approx(0.25 * (1 - (1 / 3) ** 3), abs=0.025)
    assert eda("", rng, lookup=lookup) == "" and eda("!!", rng, lookup=lookup) == ""


@pytest.mark.skipif(not have_wordnet(), reason="no WordNet (.ci/run installs Debian's wordnet-base)")
def test_wordnet_synonyms_as_eda_reads_them():
    found = augment.synonyms("circle")
    assert {"round", "set", "band", "lot", "encircle", "circulate"} <= set(found) and "circle" not in found
    assert list(found) == sorted(found)
    assert "domestic dog" in augment.synonyms("dogs")  # lemmatised by nltk's morphy, "_" as a space
    assert augment.synonyms("the") == () and augment.synonyms("zzzq") == ()


class Rows:
    """A training set as CaptionViews reads it: row i has distinct caption ``caption[i]``."""

    def __init__(self, captions, caption):
        self.captions, self.caption = captions, np.asarray(caption)

    def tokenize(self, texts):
        return torch.tensor([[len(t), sum(map(ord, t)) % 1000] for t in texts])


def test_caption_views_are_one_fixed_eda_variant_per_row(monkeypatch):
    monkeypatch.setattr(augment, "synonyms", lookup)
    data = Rows(["a blue circle", "a red square"], [0, 0, 0, 0, 1, 1] * 20)
    views = CaptionViews(data, seed=3)
    assert len(views) == 120 and len(views.texts) == 120
    again = CaptionViews(data, seed=3)
    assert views.texts == again.texts  # the seed fixes them
    assert views.texts != CaptionViews(data, seed=3, view=1).texts  # SafeCLIP's second view differs
    rng = augment.streams.rng(3, augment.streams.CAPTION_VIEWS, 0)
    assert views.texts[:2] == [eda("a blue circle", rng, lookup=lookup), eda("a blue circle", rng, lookup=lookup)]
    # rows with one caption get views of their own, and tokens(rows) are those views' tokens
    assert len(set(views.texts[:4 * 20:6])) > 1
    rows = np.array([5, 0, 119])
    assert torch.equal(views.tokens(rows), data.tokenize([views.texts[r] for r in rows]))


def test_simclr_view_is_the_authors_transform_scaled_to_the_side():
    transform = simclr_view(32)
    names = [type(t).__name__ for t in transform.transforms]
    assert names == ["RandomHorizontalFlip", "RandomResizedCrop", "RandomApply", "RandomGrayscale", "GaussianBlur"]
    jitter = transform.transforms[2].transforms[0]
    assert transform.transforms[2].p == 0.8 and transform.transforms[3].p == 0.2
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.5, 1.5),) * 3 + ((-0.1, 0.1),)
    assert simclr_view(224).transforms[4].kernel_size == (21, 21) and transform.transforms[4].kernel_size == (3, 3)
    assert transform.transforms[4].sigma == pytest.approx([0.1 * 32 / 224, 2.0 * 32 / 224])
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    out = augment.augment_images(images, transform)
    assert out.shape == images.shape and out.dtype == np.uint8 and not np.array_equal(out, images)


def test_roclip_trains_on_augmented_views_through_the_loops_inputs_hook(monkeypatch):
    """A real RoCLIP trial (``augment: true``): every step's forward pass takes the objective's
    views, an image view of the loaded batch and each row's fixed caption view."""
    import trainers.loop as loop
    from trainers import parse_trial_config, run_trial
    from trainers.defenses.roclip import NearestCaption

    seen = []
    real = NearestCaption.inputs

    def recording(self, rows, images):
        views, tokens = real(self, rows, images)
        seen.append((rows.copy(), images.copy(), views, tokens, self.captions.tokens(rows)))
        return views, tokens

    monkeypatch.setattr(NearestCaption, "inputs", recording)
    forwards, step = [], loop.Step
    monkeypatch.setattr(loop, "Step", lambda *a: forwards.append(a) or step(*a))
    config = parse_trial_config({"data": {"size": 256, "test_size": 32},
                                 "train": {"epochs": 2, "batch_size": 64, "threads": 1},
                                 "defense": {"kind": "roclip", "period": 2, "pool_size": 64,
                                             "caption_view": "token-edit"}})
    run_trial(config, baseline=False)
    assert len(seen) == len(forwards) == 8  # 4 steps an epoch, 2 epochs
    for (rows, loaded, views, tokens, _), step in zip(seen, forwards):
        assert step[1] is views and not np.array_equal(views, loaded)  # the forward's images: the views
        assert views.shape == loaded.shape and np.array_equal(step[6], rows)
        width = step[2].shape[1]  # the forward's tokens: the caption views (padding columns cut)
        assert torch.equal(step[2], tokens[:, :width]) and not tokens[:, width:].any()
    off = parse_trial_config({"data": {"size": 256, "test_size": 32}, "train": {"epochs": 1, "batch_size": 64},
                              "defense": {"kind": "roclip", "augment": False}})
    assert real(off.defense.objective(0), np.arange(2), np.zeros((2, 4, 4, 3), np.uint8)) is None


def test_a_missing_wordnet_is_one_line_naming_the_key(monkeypatch, tmp_path):
    import nltk

    from poison import ConfigError, make_defense

    augment.wordnet.cache_clear()
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "none")])
    monkeypatch.setenv("POISONSWEEP_WORDNET", str(tmp_path))
    try:
        for kind in ("cleanclip", "roclip", "safeclip"):
            with pytest.raises(ConfigError) as info:
                make_defense({"kind": kind}).check(None, pretrained=False)
            message = str(info.value)
            assert message.startswith("defense.caption_view: EDA caption views need WordNet") and "\n" not in message
            assert "wordnet-base" in message and "token-edit" in message
        make_defense({"kind": "safeclip", "caption_view": "token-edit"}).check(None, pretrained=False)
    finally:
        augment.wordnet.cache_clear()
