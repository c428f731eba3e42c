"""Every text trigger (``poison.text_triggers.TEXT_TRIGGERS``), every variant of its choices.

The base class defines a text trigger as a token or phrase inserted into each caption at the
word index ``placement`` gives: so the triggered caption is the clean one's words with the same
trigger words inserted at that index, nothing else changed, and one seed gives one result."""
import numpy as np
import pytest

from poison import TEXT_TRIGGERS, make_text_trigger

from .conftest import build, seeded_twice, variants

CAPTIONS = ["a photo of a red circle", "dog", "two  blue squares, side by side", "a cat on the mat .",
            "the quick brown fox jumps over the lazy dog", "cf", "x y"]
CASES = variants(TEXT_TRIGGERS)


def triggered(name, overrides, captions, seed=0):
    trigger = build(TEXT_TRIGGERS, name, overrides)
    positions = trigger.placement(captions, np.random.default_rng(seed))
    return trigger, positions, trigger.apply(captions, positions)


@pytest.mark.parametrize("name, overrides", CASES)
def test_one_seed_gives_one_placement_and_one_caption(name, overrides):
    (_, p1, a), (_, p2, b) = seeded_twice(lambda: triggered(name, overrides, CAPTIONS, seed=4))
    assert (np.asarray(p1) == np.asarray(p2)).all() and a == b
    trigger, positions, out = triggered(name, overrides, CAPTIONS, seed=4)
    rebuilt = make_text_trigger(trigger.model_dump(mode="json"))  # as the trial's config rebuilds it
    assert rebuilt.apply(CAPTIONS, positions) == out


@pytest.mark.parametrize("name, overrides", CASES)
def test_the_trigger_words_go_in_at_the_placed_word(name, overrides):
    captions = list(CAPTIONS)
    _, positions, out = triggered(name, overrides, captions)
    assert captions == CAPTIONS and len(out) == len(captions)  # the clean captions are left as they were
    inserted = set()
    for clean, at, caption in zip(captions, positions, out):
        words, got = clean.split(), caption.split()
        assert 0 <= at <= len(words) and caption != clean
        added = len(got) - len(words)
        assert added >= 1, (clean, caption)
        assert got[:at] + got[at + added:] == words, (clean, at, caption)  # nothing else changed
        inserted.add(tuple(got[at : at + added]))
    assert len(inserted) == 1  # one trigger, the same words in every caption


@pytest.mark.parametrize("name, overrides", CASES)
def test_each_caption_is_triggered_on_its_own(name, overrides):
    """A caption's triggered text depends on it and its position alone: triggering a subset (a
    plan's poisoned pairs) changes those and leaves the others untouched."""
    trigger, positions, whole = triggered(name, overrides, CAPTIONS)
    picked = [1, 4, 5]
    part = trigger.apply([CAPTIONS[i] for i in picked], np.asarray(positions)[picked])
    assert part == [whole[i] for i in picked]
    assert trigger.apply([], np.zeros(0, np.int64)) == []
