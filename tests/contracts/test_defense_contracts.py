"""Every defense (``poison.DEFENSES``) by the stage it acts at.

Data-side (``stage = "data"``), every variant of its choices: on the poisoned training set of a
trial, its keep-mask has one bool per row, it is the same for one seed, and the trial trains on
the rows it keeps; the metrics the trial reports for it are exactly its ``metric_names``, all
finite. Training-side (``stage = "training"``): one optimizer step of the trial's loop under its
objective changes both towers of a tiny model, and a run interrupted after an epoch and resumed
from its checkpoint ends exactly as an uninterrupted one, the objective's state included."""
import math

import numpy as np
import pytest
import torch

from poison import DEFENSES, make_attack
from tests.support import backdoor
from trainers import parse_trial_config
from trainers.data import TrainingSet

from .conftest import build, tower_changes, variants

DATA_SIDE = [c for c in variants(DEFENSES) if DEFENSES.get(c.values[0]).stage == "data"]
TRAINING_SIDE = [c for c in variants(DEFENSES) if DEFENSES.get(c.values[0]).stage == "training"]


class Planted:
    """The trial's ``ReferencePairs`` with reference embeddings made here, not by a trained model:
    a clean pair's image and caption point the same way, a poisoned pair's caption elsewhere."""

    def __init__(self, data, reference=None):
        self.data = data

    def __len__(self):
        return len(self.data)

    def reference_embeddings(self, *, trusted_pairs):
        rng = np.random.default_rng(0)
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        image = unit(rng.normal(size=(len(self.data), 16)))
        text = unit(image + 0.2 * rng.normal(size=image.shape))
        text[self.data.poisoned] = unit(rng.normal(size=(int(self.data.poisoned.sum()), 16)))
        return image.astype(np.float32), text.astype(np.float32)


@pytest.fixture(scope="module")
def poisoned(small_synthetic):
    """The 400 clean training pairs of small_synthetic and 20 injected poisoned ones."""
    attack = make_attack(backdoor(20))
    plan = attack.plan(small_synthetic, 0)
    return TrainingSet(small_synthetic, attack, plan, lambda caps: torch.zeros(len(caps), 4, dtype=torch.long))


@pytest.mark.parametrize("name, overrides", DATA_SIDE)
def test_a_data_side_keep_mask_has_one_bool_per_row_and_one_seed_one_mask(name, overrides, poisoned):
    defense = build(DEFENSES, name, overrides)
    selection = defense.select(Planted(poisoned), seed=3)
    keep = np.asarray(selection.keep)
    assert keep.dtype == bool and keep.shape == (len(poisoned),)
    assert keep.any() and not keep.all()  # rows to train on (else the trial refuses), and some dropped
    if selection.scores is not None:
        assert np.shape(selection.scores) == (len(poisoned),)
    assert (defense.select(Planted(poisoned), seed=3).keep == keep).all()
    assert (np.asarray(defense.keep_mask(Planted(poisoned), seed=3)) == keep).all()


@pytest.mark.parametrize("name, overrides", DATA_SIDE)
def test_a_data_side_defense_reports_the_metrics_it_declares(name, overrides, poisoned, small_synthetic,
                                                             monkeypatch):
    """Through the trial's own step before training (``trainers.trial._keep``), its reference
    model replaced by the planted embeddings (so no reference metrics of a trained one)."""
    import trainers.trial as trial

    monkeypatch.setattr(trial, "ReferencePairs", Planted)
    config = parse_trial_config({"seed": 3, "data": {"size": 400, "test_size": 40}, "attack": backdoor(20),
                                 "defense": {"kind": name, **overrides}})
    kept, metrics = trial._keep(config, small_synthetic, poisoned, cache_dir=None)
    assert sorted(metrics) == sorted(type(config.defense).metric_names)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    keep = config.defense.select(Planted(poisoned), config.seed).keep
    assert len(kept) == keep.sum() and (kept.image == poisoned.image[keep]).all()
    if "filter_removed" in metrics:
        assert metrics["filter_removed"] == len(poisoned) - keep.sum()


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("name, overrides", TRAINING_SIDE)
def test_a_training_side_step_changes_both_towers(name, overrides, train_tiny):
    run = train_tiny({"kind": name, **overrides}, epochs=1, pairs=16)  # one batch of 16 clean pairs
    assert run.fitted.steps == 1 and math.isfinite(run.fitted.history[-1]["loss"])
    assert tower_changes(run.before, run.after) == {"image": True, "text": True}


@pytest.mark.parametrize("name, overrides", TRAINING_SIDE)
def test_a_training_side_run_resumes_from_its_checkpoint(name, overrides, train_tiny, tmp_path):
    """Four epochs, against three, a crash, and the fourth resumed from the checkpoint (RoCLIP's
    caption pool, SafeCLIP's memory banks: whatever state the objective keeps by then)."""
    from trainers.resume import FolderCheckpointer, read_state

    defense = {"kind": name, **overrides}
    whole = train_tiny(defense, epochs=4)

    def crash_after_three(epoch):
        if epoch["epoch"] == 3:
            raise Crash
    saver = FolderCheckpointer(tmp_path / "state")
    with pytest.raises(Crash):
        train_tiny(defense, epochs=4, checkpointer=saver, on_epoch=crash_after_three)
    saved = read_state(tmp_path / "state")
    assert saved["epoch"] == 3
    fresh = build(DEFENSES, name, overrides).objective(0)  # its state survives the checkpoint's file round trip
    fresh.load_state_dict(saved["objective"])
    assert_same(fresh.state_dict(), saved["objective"])
    resumed = train_tiny(defense, epochs=4, checkpointer=saver)
    assert resumed.fitted.resumed_from == 3 and resumed.fitted.steps == whole.fitted.steps
    for key, tensor in whole.after.items():
        assert torch.equal(tensor, resumed.after[key]), key
    assert_same(resumed.objective.state_dict(), whole.objective.state_dict())
    assert_same(resumed.objective.metrics(), whole.objective.metrics())


def assert_same(a, b):
    """Equal state: tensors bit for bit, NaN equal to NaN."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, (a, b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b, equal_nan=True)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b
