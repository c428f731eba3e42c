"""Training objectives of the defenses that change the loss, checked by hand: RoCLIP's
nearest-caption matching and its caption pool, CleanCLIP's weighted in-modal loss and its
caption views. (tests/trainers/test_trial.py resumes a RoCLIP trial bit for bit; tests/e2e/test_defenses_e2e.py
runs both defenses against a real backdoor.)"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from poison import ConfigError
from trainers import parse_trial_config
from trainers.augment import augment_tokens
from trainers.defenses.cleanclip import InModal
from trainers.defenses.roclip import NearestCaption
from trainers.objectives import Objective, Step


def info_nce(a, b, scale):
    """CLIP's loss written out: cross-entropy of row i against row i, both ways, averaged."""
    logits = scale * a @ b.T
    target = torch.arange(len(a))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def step(images, texts, epoch, model=None, raw=None, tokens=None):
    out = {"image_features": images, "text_features": texts, "logit_scale": torch.tensor(10.0)}
    rows = None if images is None else np.arange(len(images))
    return Step(model, raw, tokens, out, epoch, lambda x: torch.as_tensor(x), rows)


class Fixed:
    """Caption views given by hand: row i's view is ``tokens[i]``."""

    def __init__(self, tokens):
        self.table = tokens

    def bind(self, data):
        pass

    def tokens(self, rows):
        return self.table[torch.as_tensor(rows)]


def rows_data(tokens):
    """A training set as caption sources read it: row i holds caption i, whose token ids are ``tokens[i]``."""
    return type("Data", (), {"tokens": tokens, "caption": np.arange(len(tokens))})()


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_the_default_objective_is_clips_loss():
    images, texts = unit([1, 0], [0, 1], [1, 1]), unit([1, 0.2], [0.1, 1], [-1, 1])
    assert Objective().loss(step(images, texts, 1)).item() == pytest.approx(info_nce(images, texts, 10.0).item(), rel=1e-5)


def test_roclip_pairs_each_image_with_its_nearest_pool_caption_in_matching_epochs():
    """``schedule: every-step`` (ours): the pool takes every step's captions, epochs 2, 4, ... match."""
    roclip = NearestCaption(pool_size=3, period=2, schedule="every-step")
    images = unit([1, 0], [0, 1])
    first = unit([0.6, 0.8], [1, 0])
    # epoch 1 is not a matching epoch: own captions; the pool then holds them
    assert roclip.loss(step(images, first, 1)).item() == pytest.approx(info_nce(images, first, 10.0).item(), rel=1e-5)
    assert torch.equal(roclip.pool, first)
    # epoch 2 matches: image [1,0] → pool caption [1,0]; image [0,1] → [0.6,0.8] (cosine 0.8 > 0)
    texts = unit([0, 1], [-1, 0]).requires_grad_()
    images = images.clone().requires_grad_()
    loss = roclip.loss(step(images, texts, 2))
    expected = info_nce(images.detach(), unit([1, 0], [0.6, 0.8]), 10.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert images.grad is not None and texts.grad is None  # pool captions carry no gradient to the text tower
    # first in, first out: of the 4 captions seen, the last 3 remain, oldest first
    assert torch.equal(roclip.pool, torch.cat([first[1:], texts.detach()]))


def test_roclip_trains_on_own_captions_before_it_has_a_pool_and_keeps_the_pool_in_its_state():
    roclip = NearestCaption(pool_size=8, period=1, schedule="every-step")
    images, texts = unit([1, 0], [0, 1]), unit([1, 0.5], [0.5, 1])
    assert roclip.loss(step(images, texts, 1)).item() == pytest.approx(info_nce(images, texts, 10.0).item(), rel=1e-5)
    again = NearestCaption(pool_size=8, period=1, schedule="every-step")
    again.load_state_dict(roclip.state_dict())
    assert torch.equal(again.pool, roclip.pool)
    assert again.loss(step(images, texts, 2)).item() == roclip.loss(step(images, texts, 2)).item()
    assert NearestCaption(8, 1).state_dict() == {}


def _step_of(images, texts, epoch, last_epoch):
    return Step(None, None, None, {"image_features": images, "text_features": texts, "logit_scale": torch.tensor(10.0)},
                epoch, lambda x: torch.as_tensor(x), last_epoch=last_epoch)


def test_roclip_as_the_authors_pool_only_in_matching_epochs_from_random_rows():
    """``schedule: authors``: epochs 2 and 4 of 4 match (3 of 3); the pool is untouched outside them,
    starts as the seed's standard-normal rows (unnormalised), is searched by cosine, returns the raw
    row, and takes the batch's captions over its oldest rows, wrapping around."""
    from poison import streams
    from trainers.defenses.roclip import matching

    assert [e for e in range(1, 7) if matching(e, 6, 3)] == [3, 6]
    assert [e for e in range(1, 4) if matching(e, 3, 2)] == [3] and [e for e in range(1, 3) if matching(e, 2, 1)] == [1, 2]
    roclip = NearestCaption(pool_size=3, period=2, seed=5)
    images, texts = unit([1, 0], [0, 1]), unit([0.6, 0.8], [1, 0])
    assert roclip.loss(_step_of(images, texts, 1, 4)).item() == pytest.approx(info_nce(images, texts, 10.0).item(),
                                                                               rel=1e-5)
    assert roclip.pool is None  # epoch 1 does not match: nothing read or written
    random_rows = torch.as_tensor(streams.rng(5, streams.ROCLIP_POOL).standard_normal((3, 2)), dtype=torch.float32)
    cosine = unit(*random_rows.tolist()) @ images.T  # each image's nearest random row by cosine
    nearest = random_rows[cosine.argmax(dim=0)]      # returned raw, unnormalised
    texts = texts.clone().requires_grad_()
    loss = roclip.loss(_step_of(images, texts, 2, 4))
    assert loss.item() == pytest.approx(info_nce(images, nearest, 10.0).item(), rel=1e-5)
    loss.backward()
    assert texts.grad is not None and not texts.grad.any()  # in the graph with weight 0, as the authors'
    # the two captions went over rows 0 and 1; row 2 still random; the next write starts at row 2
    assert torch.equal(roclip.pool[:2], texts.detach()) and torch.equal(roclip.pool[2], random_rows[2])
    roclip.loss(_step_of(images, texts.detach(), 3, 4))  # not matching: the pool stays as it was
    assert torch.equal(roclip.pool[:2], texts.detach()) and roclip.next_row == 2
    later = unit([0, 1], [-1, 0])
    roclip.loss(_step_of(images, later, 4, 4))
    assert torch.equal(roclip.pool, torch.stack([later[1], texts.detach()[1], later[0]]))  # wrapped around
    again = NearestCaption(pool_size=3, period=2, seed=5)
    again.load_state_dict(roclip.state_dict())
    assert torch.equal(again.pool, roclip.pool) and again.next_row == roclip.next_row == 1


def test_roclip_pool_as_a_fraction_of_the_training_pairs_and_one_size_only():
    from poison import make_defense

    class Pairs:
        data = range(2150)

    objective = make_defense({"kind": "roclip", "pool_fraction": 0.1, "augment": False}).objective(seed=0)
    objective.start_epoch(1, Pairs())
    assert objective.pool_size == 215
    assert make_defense({"kind": "roclip"}).pool_size == 21845  # the authors' --memory_bank_size
    with pytest.raises(ConfigError, match="defense.pool_fraction: give pool_size or pool_fraction"):
        make_defense({"kind": "roclip", "pool_size": 10, "pool_fraction": 0.1})


class Views(torch.nn.Module):
    """A model whose augmented views' embeddings are given."""

    def __init__(self, image_views, text_views):
        super().__init__()
        self.image_views, self.text_views, self.calls = image_views, text_views, []

    def encode_image(self, x, normalize=False):
        self.calls.append(("image", tuple(x.shape)))
        return self.image_views

    def encode_text(self, tokens, normalize=False):
        self.calls.append(("text", tuple(tokens.shape)))
        return self.text_views


def test_cleanclip_loss_is_the_weighted_sum_of_cross_modal_and_in_modal_terms():
    images, texts = unit([1, 0], [0, 1]), unit([1, 0.5], [0.2, 1])
    image_views, text_views = unit([1, 0.1], [0.3, 1]), unit([0.9, 0.4], [0, 1])
    raw = np.zeros((2, 8, 8, 3), np.uint8)
    tokens = torch.tensor([[9, 5, 6, 10, 0], [9, 7, 10, 0, 0]])
    model = Views(image_views, text_views)
    loss = InModal(clip_weight=0.5, inmodal_weight=2.0, symmetric=True, captions=Fixed(tokens)).loss(
        step(images, texts, 1, model=model, raw=raw, tokens=tokens))
    expected = 0.5 * info_nce(images, texts, 10.0) + 2.0 * (
        info_nce(images, image_views, 10.0) + info_nce(texts, text_views, 10.0)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model.calls == [("image", (2, 8, 8, 3)), ("text", (2, 5))]  # the views of this batch
    # the authors' in-modal term (the default): originals' rows against the views, one way
    one_way = InModal(clip_weight=0.5, inmodal_weight=2.0, symmetric=False, captions=Fixed(tokens)).loss(
        step(images, texts, 1, model=Views(image_views, text_views), raw=raw, tokens=tokens))
    rows = lambda a, b: F.cross_entropy(10.0 * a @ b.T, torch.arange(len(a)))  # noqa: E731
    expected = 0.5 * info_nce(images, texts, 10.0) + 2.0 * (rows(images, image_views) + rows(texts, text_views)) / 2
    assert one_way.item() == pytest.approx(expected.item(), rel=1e-5) and one_way.item() != pytest.approx(loss.item())
    plain = InModal(clip_weight=1.0, inmodal_weight=0.0, symmetric=False, captions=Fixed(tokens))
    assert plain.loss(step(images, texts, 1, model=Views(None, None))).item() == \
        pytest.approx(info_nce(images, texts, 10.0).item(), rel=1e-5)


def test_caption_views_delete_and_swap_tokens_between_start_and_end():
    torch.manual_seed(0)
    tokens = torch.tensor([[49406, 11, 12, 13, 14, 15, 49407, 0, 0], [49406, 21, 49407, 0, 0, 0, 0, 0, 0]])
    for _ in range(20):
        view = augment_tokens(tokens, drop=0.0)  # no deletion: one swap
        assert view[:, 0].tolist() == [49406, 49406] and view[:, 6].tolist() == [49407, 0]
        assert sorted(view[0, 1:6].tolist()) == [11, 12, 13, 14, 15]
        assert int((view[0, 1:6] != tokens[0, 1:6]).sum()) == 2  # exactly two tokens traded places
        assert torch.equal(view[1], tokens[1])  # one inner token: nothing to swap
    for _ in range(20):
        view = augment_tokens(tokens, drop=0.9)[0]
        end = int(view.argmax())
        inner = view[1:end].tolist()
        assert 1 <= len(inner) <= 5 and set(inner) <= {11, 12, 13, 14, 15}  # one is always kept
        assert view[end] == 49407 and not view[end + 1 :].any()  # then zero padding


@pytest.mark.parametrize("defense, expected", [
    ({"kind": "roclip", "period": 0}, "defense.period: expected greater than or equal to 1"),
    ({"kind": "roclip", "pool_size": 0}, "defense.pool_size: expected greater than or equal to 1"),
    ({"kind": "cleanclip", "inmodal_weight": -1}, "defense.inmodal_weight: expected greater than or equal to 0"),
    ({"kind": "cleanclip", "token_drop": 1}, "defense.token_drop: expected less than 1"),
    ({"kind": "roclip", "clean_pairs": 10}, "defense.clean_pairs: unknown key"),
    ({"kind": "safeclip-mixed", "safe_fraction": 0}, "defense.safe_fraction: expected greater than 0"),
    ({"kind": "safeclip-mixed", "safe_growth": 2}, "defense.safe_growth: expected less than or equal to 1"),
    ({"kind": "safeclip", "safe_fraction": 0.5}, "defense.safe_fraction: unknown key"),
    ({"kind": "safeclip", "first_posterior": 1}, "defense.first_posterior: expected less than 1"),
])
def test_bad_objective_defense_input_names_the_key(defense, expected):
    with pytest.raises(ConfigError) as info:
        parse_trial_config({"defense": defense})
    assert str(info.value).startswith(expected), str(info.value)


class Pairs:
    """What SafeCLIP asks of the training set before an epoch: given embeddings (of the views
    ``inputs`` makes, where given), known poison, each row's own caption tokens."""

    def __init__(self, images, texts, poisoned):
        self.images, self.texts, self.calls, self.inputs = images, texts, 0, []
        tokens = torch.tensor([[9, 5 + i, 10] for i in range(len(poisoned))])
        self.data = type("Data", (), {"poisoned": np.asarray(poisoned), "tokens": tokens,
                                      "caption": np.arange(len(poisoned))})()

    def embed(self, inputs=None):
        self.calls += 1
        self.inputs.append(inputs)
        return self.images, self.texts


def test_safeclip_mixed_phases_and_the_safe_pairs_alone_in_the_cross_modal_loss():
    """``safeclip-mixed`` (ours): safe and risky pairs in one batch, each term weighted by its share."""
    from trainers.defenses.safeclip import SafeClipMixed

    objective = SafeClipMixed(inmodal_epochs=1, clip_epochs=1, safe_fraction=0.5, safe_growth=0.25).objective(seed=0)
    # six pairs: cosine similarities 0.95, 0.9, 0.85, 0.8 (clean) and 0.0, -0.1 (the poison)
    sims = np.array([0.95, 0.9, 0.85, 0.8, 0.0, -0.1])
    texts = torch.tensor([[1.0, 0.0]] * 6)
    images = torch.tensor([[s, float(np.sqrt(1 - s * s))] for s in sims], dtype=torch.float32)
    pairs = Pairs(images, texts, [False, False, False, False, True, True])
    objective.start_epoch(1, pairs)   # in-modal only: nothing embedded, no pair safe
    assert pairs.calls == 0 and objective.safe is None and not objective.clip_all
    objective.start_epoch(2, pairs)   # CLIP's loss on every pair
    assert pairs.calls == 0 and objective.clip_all
    objective.start_epoch(3, pairs)   # first split: the most similar half, within the high component
    assert pairs.calls == 1 and objective.safe.tolist() == [True, True, True, False, False, False]
    # the two poisoned rows are the least similar: ranked first by dissimilarity, a perfect detection
    assert objective.metrics() == {"filter_removed": 3.0, "filter_poison_recall": 1.0, "filter_precision": 2 / 3,
                                   "filter_auroc": 1.0, "filter_pr_auc": 1.0, "filter_fpr_at_95": 0.0}
    objective.start_epoch(4, pairs)   # grows by a quarter: the poison stays out (low component)
    assert objective.safe.tolist() == [True, True, True, True, False, False]

    # a batch of rows 5, 0, 1, 4: CLIP's loss on rows 0 and 1, in-modal on rows 5 and 4, half each
    feats_i, feats_t = unit([1, 0], [0, 1], [1, 1], [-1, 1]), unit([1, 0.5], [0.2, 1], [1, -1], [0, 1])
    views_i, views_t = unit([1, 0.1], [0.3, 1]), unit([0.9, 0.4], [0, 1])
    model = Views(views_i, views_t)
    tokens = torch.tensor([[9, 5, 10], [9, 6, 10], [9, 7, 10], [9, 8, 10]])
    raw = np.zeros((4, 8, 8, 3), np.uint8)
    batch = Step(model, raw, tokens, {"image_features": feats_i, "text_features": feats_t,
                                      "logit_scale": torch.tensor(10.0)}, 4, lambda x: torch.as_tensor(x),
                 rows=np.array([5, 0, 1, 4]))
    safe, risky = torch.tensor([1, 2]), torch.tensor([0, 3])
    expected = 0.5 * info_nce(feats_i[safe], feats_t[safe], 10.0) + 0.5 * (
        info_nce(feats_i[risky], views_i, 10.0) + info_nce(feats_t[risky], views_t, 10.0)) / 2
    assert objective.loss(batch).item() == pytest.approx(expected.item(), rel=1e-5)
    assert model.calls == [("image", (2, 8, 8, 3)), ("text", (2, 3))]  # views of the risky rows only


class Banked(torch.nn.Module):
    """A model whose augmented views are the given rows, a call at a time (view 2: the loop's
    forward pass gives view 1)."""

    def __init__(self, images, texts):
        super().__init__()
        self.images, self.texts = list(images), list(texts)

    def encode_image(self, x, normalize=False):
        return self.images.pop(0)

    def encode_text(self, tokens, normalize=False):
        return self.texts.pop(0)


def test_safeclip_as_the_authors_phases_splits_passes_and_memory_bank():
    """The authors' SafeCLIP on six pairs (four clean at cosine 0.95-0.8, two poisoned at 0 and
    -0.1): in-modal epochs, a CLIP epoch, then splits by the mixture's posterior (the first at 0.9,
    later the top share, +0.01 per split), each epoch the risky pairs' batches before the safe ones',
    and the in-modal loss against each modality's memory bank, worked by hand."""
    from poison import streams
    from trainers.defenses.safeclip import SafeClip

    objective = SafeClip(inmodal_epochs=1, clip_epochs=1, memory_bank=3, caption_view="token-edit").objective(seed=4)
    sims = np.array([0.95, 0.9, 0.85, 0.8, 0.0, -0.1])
    texts = torch.tensor([[1.0, 0.0]] * 6)
    images = torch.tensor([[s, float(np.sqrt(1 - s * s))] for s in sims], dtype=torch.float32)
    pairs = Pairs(images, texts, [False, False, False, False, True, True])

    objective.start_epoch(1, pairs)  # in-modal warm-up: nothing embedded
    assert pairs.calls == 0 and objective.phase == "inmodal"
    # the in-modal loss: view 1 (no gradient) looks up the bank, as it was, by cosine; view 2 is scored
    bank = {m: torch.as_tensor(streams.rng(4, streams.SAFECLIP_BANK, i).standard_normal((3, 2)), dtype=torch.float32)
            for i, m in enumerate(("image", "text"))}
    first_i, second_i = unit([1, 0], [0, 1]), unit([1, 0.2], [0.1, 1])
    first_t, second_t = unit([0.6, 0.8], [1, 0]), unit([0.5, 1], [1, 0.1])
    model = Banked([second_i], [second_t])
    raw = np.zeros((2, 8, 8, 3), np.uint8)
    views, view_tokens = objective.inputs(np.array([0, 1]), raw)  # the loop trains on view 1
    assert views.shape == raw.shape and view_tokens.shape == (2, 3) and objective.loaded is raw
    step_ = Step(model, views, view_tokens, {"image_features": first_i, "text_features": first_t,
                                             "logit_scale": torch.tensor(10.0)}, 1,
                 lambda x: torch.as_tensor(x), rows=np.array([0, 1]))
    def one_way(second, first, rows):
        nearest = rows[(first @ unit(*rows.tolist()).T).argmax(dim=1)]
        return F.cross_entropy(10.0 * second @ nearest.T, torch.arange(len(second)))
    expected = (one_way(second_i, first_i, bank["image"]) + one_way(second_t, first_t, bank["text"])) / 2
    assert objective.loss(step_).item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(objective.banks["image"][:2], first_i) and objective.next_row["image"] == 2

    objective.start_epoch(2, pairs)  # CLIP's loss alone, on every pair, crossed between the views
    assert objective.phase == "clip" and pairs.calls == 0
    feats_i, feats_t = unit([1, 0], [0, 1]), unit([1, 0.5], [0.2, 1])   # view 1 (the loop's forward)
    views_i, views_t = unit([1, 0.3], [0.4, 1]), unit([0.8, 0.5], [-0.2, 1])  # view 2
    objective.inputs(np.array([4, 0]), raw)
    clip_step = Step(Banked([views_i], [views_t]), raw, view_tokens, {
        "image_features": feats_i, "text_features": feats_t, "logit_scale": torch.tensor(10.0)}, 2,
        lambda x: torch.as_tensor(x), rows=np.array([4, 0]))
    target = torch.arange(2)
    crossed = (F.cross_entropy(10.0 * feats_i @ views_t.T, target) + F.cross_entropy(10.0 * feats_t @ views_i.T, target)) / 2
    assert objective.loss(clip_step).item() == pytest.approx(crossed.item(), rel=1e-5)
    assert crossed.item() != pytest.approx(info_nce(feats_i, feats_t, 10.0).item(), rel=1e-3)

    objective.start_epoch(3, pairs)  # the first split: posterior of the similar component >= 0.9
    assert pairs.calls == 1 and objective.safe.tolist() == [True, True, True, True, False, False]
    assert pairs.inputs == [objective.first_view]  # scored on view 1, as the authors' similarities
    assert objective.share == pytest.approx(4 / 6)
    assert objective.metrics() == {"filter_removed": 2.0, "filter_poison_recall": 1.0, "filter_precision": 1.0,
                                   "filter_auroc": 1.0, "filter_pr_auc": 1.0, "filter_fpr_at_95": 0.0}
    data = type("Data", (), {"steps": lambda self, b: 6 // b})()  # an epoch of 3 batches of 2
    batches = objective.batches(3, data, 2, np.random.default_rng(0))  # risky first, then safe, pure
    assert [sorted(b.tolist()) for b in batches[:1]] == [[4, 5]] and len(batches) == 3
    assert sorted(np.concatenate(batches[1:]).tolist()) == [0, 1, 2, 3]
    objective.start_epoch(4, pairs)  # later: the top share by posterior, grown by 0.01 (round(0.677 × 6) = 4)
    assert objective.share == pytest.approx(4 / 6 + 0.01) and objective.safe.sum() == 4
    objective.share = 0.845
    objective.start_epoch(5, pairs)  # capped at 0.85: round(5.1) = 5 pairs
    assert objective.share == 0.85 and objective.safe.sum() == 5


def test_an_objective_holds_an_epochs_learning_rate_and_the_schedule_goes_on_after(monkeypatch):
    """``Objective.epoch_lr``: epoch 2 of 3 at a fixed rate (as SafeCLIP's CLIP warm-up), every
    step of it; epochs 1 and 3 follow the warm-up and cosine, which kept counting through epoch 2."""
    import trainers.loop as loop
    from trainers import run_trial

    seen = []  # (epoch's fixed rate, every group's rate after the call)
    real = loop._set_lr

    def recording(optimizer, schedule, fixed):
        real(optimizer, schedule, fixed)
        seen.append((fixed, [g["lr"] for g in optimizer.param_groups], list(schedule.get_last_lr())))

    class Held(Objective):
        def epoch_lr(self, epoch, lr):
            return lr / 100 if epoch == 2 else None

    monkeypatch.setattr(loop, "_set_lr", recording)
    monkeypatch.setattr("trainers.trial.Defense.objective", lambda self, seed: Held(), raising=False)
    config = parse_trial_config({"data": {"size": 256, "test_size": 32},
                                 "train": {"epochs": 3, "batch_size": 64, "lr": 1e-3, "threads": 1}})
    run_trial(config, baseline=False)
    held = [s for s in seen if s[0] is not None]
    assert len(held) == 1 + 4 and all(lrs == [1e-5, 1e-5] for _, lrs, _ in held)  # epoch start + 4 steps
    free = [s for s in seen if s[0] is None]
    assert all(lrs == scheduled for _, lrs, scheduled in free) and len(free) == 2 * (1 + 4)
    # the schedule went on through the held epoch: epoch 3 starts where 8 steps of it leave off
    assert free[5][2] != free[0][2] and free[5][2][0] < 1e-3
