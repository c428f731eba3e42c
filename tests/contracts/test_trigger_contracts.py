"""Every image trigger (``poison.triggers.TRIGGERS``), every variant of its choices: the batch
keeps its shape and dtype, pixel values stay in range without wrapping around, one seed gives
one stamp, and the stamp a poisoned pair gets in training is the one evaluation applies."""
import numpy as np
import pyarrow as pa
import pytest

from poison import TRIGGERS, make_trigger

from .conftest import build, seeded_twice, variants

SIDE = 32  # the datasets' default image size
CASES = variants(TRIGGERS)


def images(n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8)


@pytest.mark.parametrize("name, overrides", CASES)
def test_stamps_a_batch_in_place_of_nothing_else(name, overrides):
    trigger = build(TRIGGERS, name, overrides)
    trigger.check(SIDE)
    clean = images()
    given = clean.copy()
    out = trigger.apply(given, trigger.placement(len(clean), SIDE, np.random.default_rng(0)))
    assert out.shape == clean.shape and out.dtype == np.uint8
    assert (given == clean).all()  # the input batch is left as it was
    assert (out != clean).any(axis=(1, 2, 3)).all()  # every image carries the trigger


@pytest.mark.parametrize("name, overrides", CASES)
def test_values_are_clipped_not_wrapped(name, overrides):
    """On flat images of 0, 128 and 255 at one placement, a brighter input never gives a darker
    output pixel: a value pushed past 0 or 255 is clipped, not wrapped around in uint8."""
    trigger = build(TRIGGERS, name, overrides)
    placement = trigger.placement(2, SIDE, np.random.default_rng(1))
    dark, mid, bright = (trigger.apply(np.full((2, SIDE, SIDE, 3), v, np.uint8), placement).astype(int)
                         for v in (0, 128, 255))
    assert (dark <= mid).all() and (mid <= bright).all()


@pytest.mark.parametrize("name, overrides", CASES)
def test_one_seed_gives_one_stamp(name, overrides):
    def stamped():
        trigger = build(TRIGGERS, name, overrides)
        placement = trigger.placement(6, SIDE, np.random.default_rng(5))
        return placement, trigger.apply(images(), placement)

    (p1, a), (p2, b) = seeded_twice(stamped)
    assert p1.keys() == p2.keys() and all((p1[k] == p2[k]).all() for k in p1)
    assert (a == b).all()


@pytest.mark.parametrize("name, overrides", CASES)
def test_the_training_stamp_is_the_evaluation_stamp(name, overrides):
    """Training stamps a poisoned pair from the plan's stored placement (an Arrow column, read
    back a batch of shuffled rows at a time, by the trigger the trial's config rebuilds);
    evaluation applies the trigger to all its images at once: the same pixels either way."""
    trigger = build(TRIGGERS, name, overrides)
    batch = images(7)
    placement = trigger.placement(len(batch), SIDE, np.random.default_rng(2))
    at_evaluation = trigger.apply(batch, placement)
    stored = pa.table({f"trigger_{k}": v for k, v in placement.items()}) if placement else None
    rebuilt = make_trigger(trigger.model_dump(mode="json"))
    at_training = np.zeros_like(batch)
    for rows in np.array_split(np.random.default_rng(3).permutation(len(batch)), 3):
        columns = {} if stored is None else {k.removeprefix("trigger_"): stored[k].to_numpy()[rows]
                                             for k in stored.column_names}
        at_training[rows] = rebuilt.apply(batch[rows], columns)
    assert (at_training == at_evaluation).all()
