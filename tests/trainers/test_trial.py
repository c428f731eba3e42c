"""One real trial on CPU, without Ray."""
import math
import threading

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from tests.support import backdoor
from trainers import NonFiniteLossError, clean_model, parse_trial_config, run_trial

SMALL = {"data": {"size": 600, "test_size": 96}, "train": {"epochs": 2, "batch_size": 64, "threads": 2}}
DESIGN_METRICS = ["attack_success", "utility", "poison_count", "poison_rate", "clean_utility", "utility_drop",
                  "clean_attack_success", "zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "i2t_r10",
                  "t2i_r1", "t2i_r5", "t2i_r10", "backdoor_asr", "train_seconds", "samples_per_second"]


@pytest.mark.slow
def test_one_trial_trains_evaluates_and_reuses_the_clean_model(tmp_path):
    config = parse_trial_config({**SMALL, "attack": backdoor(60)})
    epochs = []
    result = run_trial(config, cache_dir=str(tmp_path), on_epoch=epochs.append)
    m = result.metrics
    assert [e["epoch"] for e in epochs] == [1, 2] and epochs[1]["loss"] < epochs[0]["loss"]
    for name in DESIGN_METRICS:
        assert name in m and math.isfinite(m[name]), name
    # rankings are consistent: a hit in the top 1 is one in the top 5, and in the top 10
    assert m["zeroshot_top1"] <= m["zeroshot_top5"]
    assert m["i2t_r1"] <= m["i2t_r5"] <= m["i2t_r10"] and m["t2i_r1"] <= m["t2i_r5"] <= m["t2i_r10"]
    assert m["poison_count"] == 60 and m["poison_rate"] == pytest.approx(60 / 660)
    assert m["utility"] == m["zeroshot_top1"] and m["attack_success"] == m["backdoor_asr"]
    assert m["utility_drop"] == pytest.approx(m["clean_utility"] - m["utility"])
    # every epoch's report has the trial's poison and its utility drop so far (a scheduler compares on them)
    assert [(e["poison_count"], e["poison_rate"]) for e in epochs] == [(60, m["poison_rate"])] * 2
    assert epochs[-1]["utility_drop"] == pytest.approx(m["clean_utility"] - epochs[-1]["utility"])
    # and the early signals of the backdoor (docs/search.md): the loss of its poisoned pairs and
    # the clean ones, the trigger's pull toward the target's text
    for name in ("train_loss_poisoned", "train_loss_clean", "target_margin", "target_similarity"):
        assert all(math.isfinite(e[name]) for e in epochs), name
    assert result.plan.num_rows == 60
    # the clean model was cached on disk; asking again loads it instead of training
    again = clean_model(config, cache_dir=str(tmp_path))
    assert again.cached and again.metrics["utility"] == m["clean_utility"]
    assert len(list((tmp_path / "clean").iterdir())) == 1


@pytest.mark.slow
def test_a_corrupt_clean_cache_entry_is_rebuilt(tmp_path):
    config = parse_trial_config({**SMALL, "train": {**SMALL["train"], "epochs": 1}})
    first = clean_model(config, cache_dir=str(tmp_path))
    weights = next((tmp_path / "clean").iterdir()) / "model.pt"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    rebuilt = clean_model(config, cache_dir=str(tmp_path))
    assert not rebuilt.cached
    assert torch.load(weights, weights_only=True).keys() == first.state_dict.keys()


def test_an_injecting_trial_takes_its_clean_models_optimizer_steps(tmp_path):
    """250 clean pairs and 20 injected ones at batch 64: the clean model's epoch is 3 full
    batches, and so is the poisoned trial's (270 pairs would make 4): ``utility_drop`` compares
    models trained for as long. Each epoch the trial sees 192 of its 270 pairs, shuffled anew."""
    config = parse_trial_config({"data": {"size": 250, "test_size": 40},
                                 "train": {"epochs": 2, "batch_size": 64, "threads": 1}, "attack": backdoor(20)})
    m = run_trial(config, cache_dir=str(tmp_path)).metrics
    assert m["train_steps"] == m["clean_train_steps"] == 6
    assert m["samples_per_second"] * m["train_seconds"] == pytest.approx(6 * 64)


def test_a_nan_loss_fails_the_trial():
    config = parse_trial_config({"data": {"size": 200, "test_size": 20},
                                 "train": {"epochs": 1, "batch_size": 64, "lr": 1e30}})
    with pytest.raises(NonFiniteLossError, match="training loss became nan in epoch 1"):
        run_trial(config, baseline=False)


def test_replace_mode_keeps_the_number_of_training_pairs(small_synthetic):
    from poison import make_attack
    from trainers.data import TrainingSet

    attack = make_attack({**backdoor(10), "mode": "replace"})
    plan = attack.plan(small_synthetic, 0)
    data = TrainingSet(small_synthetic, attack, plan, lambda caps: torch.zeros(len(caps), 4, dtype=torch.long))
    assert len(data) == small_synthetic.num_train
    injected = make_attack(backdoor(10))
    data2 = TrainingSet(small_synthetic, injected, injected.plan(small_synthetic, 0),
                        lambda caps: torch.zeros(len(caps), 4, dtype=torch.long))
    assert len(data2) == small_synthetic.num_train + 10
    rows = data2.plan_row >= 0
    images, _ = data2.batch(rows.nonzero()[0][:3])
    assert (images != small_synthetic.images[data2.image[rows][:3]]).any()  # triggers stamped at load
    assert pc.sum(pc.equal(plan["op"], "replace")).as_py() == 10


def test_captions_are_tokenized_once_per_node(small_synthetic, tmp_path):
    """The dataset's captions go through the tokenizer once per node (the token cache); a later
    trial tokenizes only its plan's own captions, and every row still gets its caption's ids."""
    import open_clip

    from poison import make_attack
    from trainers.data import TrainingSet
    from trainers.models import build_model

    tokenizer = build_model("tiny-rn", None, device=torch.device("cpu"), image_size=32).tokenize
    seen: list[str] = []

    def tokenize(captions):
        seen.extend(captions)
        return tokenizer(captions)

    attack = make_attack({**backdoor(10), "caption_source": "templates"})  # captions the data lacks
    plan = attack.plan(small_synthetic, 0)
    first = TrainingSet(small_synthetic, attack, plan, tokenize, token_cache=tmp_path)
    train_captions = set(small_synthetic.split("train")["caption"].to_pylist())
    assert train_captions <= set(seen)
    seen.clear()
    again = TrainingSet(small_synthetic, attack, plan, tokenize, token_cache=tmp_path)
    assert not set(seen) & train_captions - set(plan["caption"].to_pylist())  # only the plan's and a probe
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 1 and len(list(tmp_path.glob("tokens-*.lock"))) == 1
    rows = np.arange(len(again))
    captions = [again.captions[i] for i in again.caption]
    for data in (first, again):
        assert torch.equal(data.tokens[data.caption[rows]], tokenizer(captions))
    assert captions[-10:] == plan["caption"].to_pylist()  # the plan's pairs, after the clean ones
    # another tokenizer (a context of 77, not tiny-rn's 16) keys another file
    TrainingSet(small_synthetic, attack, plan, open_clip.get_tokenizer("RN50"), token_cache=tmp_path)
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 2
    # a cut-short file is rebuilt, not read
    path = next(p for p in tmp_path.glob("tokens-*.npy") if p.stat().st_size < 200 * 1024)
    path.write_bytes(path.read_bytes()[:100])
    rebuilt = TrainingSet(small_synthetic, attack, plan, tokenize, token_cache=tmp_path)
    assert torch.equal(rebuilt.tokens[rebuilt.caption[rows]], tokenizer(captions))


def test_pretrained_local_checkpoint_is_loaded(tmp_path):
    from trainers.models import build_model

    first = build_model("tiny-rn", None, device=torch.device("cpu"), image_size=32)
    path = tmp_path / "start.pt"
    torch.save(first.model.state_dict(), path)
    torch.manual_seed(123)  # a fresh init would differ; loading must restore the saved weights
    loaded = build_model("tiny-rn", str(path), device=torch.device("cpu"), image_size=32)
    for (name, a), b in zip(first.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name
    config = parse_trial_config({"model": {"arch": "tiny-rn", "pretrained": str(path)}})
    assert config.model.pretrained == str(path)


# --- train.trainable: Yang et al.'s frozen-encoder ablation ---

def _towers(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    image = {k: v for k, v in state.items() if k.startswith("visual.")}
    text = {k: v for k, v in state.items() if k not in image and k not in ("logit_scale", "logit_bias")}
    return {"image": image, "text": text}


@pytest.mark.parametrize("arch, trainable", [("tiny-rn", "image"), ("tiny-rn", "text"), ("tiny-rn", "both"),
                                             ("tiny-vit", "image"), ("tiny-vit", "text")])
def test_trainable_with_freeze_tower_freezes_the_whole_other_tower(arch, trainable):
    from trainers.models import build_model

    config = parse_trial_config({"data": {"size": 256, "test_size": 64}, "model": {"arch": arch},
                                 "train": {"epochs": 1, "batch_size": 64, "trainable": trainable,
                                           "freeze": "tower"}})
    torch.manual_seed(config.seed)  # as _train does: the model the trial started from
    initial = build_model(arch, None, device=torch.device("cpu"), image_size=32).model
    parameters = {n for n, _ in initial.named_parameters()}
    result = run_trial(config, baseline=False)
    start, trained = _towers(initial.state_dict()), _towers(result.state_dict)
    assert not torch.equal(initial.logit_scale.detach(), result.state_dict["logit_scale"])  # always trains
    for tower in ("image", "text"):
        if trainable in (tower, "both"):  # every parameter of a training tower moved
            params = [k for k in start[tower] if k in parameters]
            assert [k for k in params if not torch.equal(start[tower][k], trained[tower][k])] == params, tower
        else:  # every tensor of a frozen tower, BatchNorm running stats included, is bit-identical
            # (a FrozenBatchNorm2d keeps no num_batches_tracked; nothing else may go missing)
            missing = {k.rsplit(".", 1)[-1] for k in start[tower].keys() - trained[tower].keys()}
            assert missing <= {"num_batches_tracked"}, missing
            assert trained[tower] and all(torch.equal(start[tower][k], v) for k, v in trained[tower].items()), tower
    # and the state still loads into a freshly built model, as the clean-model cache does
    build_model(arch, None, device=torch.device("cpu"), image_size=32).model.load_state_dict(result.state_dict)


@pytest.mark.parametrize("arch, trainable", [("tiny-rn", "image"), ("tiny-rn", "text"), ("tiny-vit", "image")])
def test_trainable_freezes_the_encoder_as_yang_et_al(arch, trainable):
    """The default ``freeze: encoder`` (mm_poison's --freeze_encoder): a frozen image tower is
    ``visual``'s parameters alone (BatchNorm statistics still move); a frozen text tower is the
    transformer alone, while token and positional embeddings, ln_final and text_projection train."""
    from trainers.models import build_model

    config = parse_trial_config({"data": {"size": 256, "test_size": 64}, "model": {"arch": arch},
                                 "train": {"epochs": 1, "batch_size": 64, "trainable": trainable}})
    assert config.train.freeze == "encoder"
    torch.manual_seed(config.seed)
    initial = build_model(arch, None, device=torch.device("cpu"), image_size=32).model
    parameters = {n for n, _ in initial.named_parameters()}
    start, trained = initial.state_dict(), run_trial(config, baseline=False).state_dict
    assert start.keys() == trained.keys()  # no BatchNorm swapped for a frozen one
    frozen = "visual." if trainable == "text" else "transformer."
    same = {k for k in parameters if torch.equal(start[k], trained[k])}
    assert same == {k for k in parameters if k.startswith(frozen)}, same ^ {k for k in parameters if k.startswith(frozen)}
    if trainable == "image":
        assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"} <= (
            parameters - same)
    elif arch == "tiny-rn":  # the frozen ResNet's running statistics follow the batches, as in mm_poison
        stats = [k for k in start if k.startswith("visual.") and k.endswith("running_mean")]
        assert stats and all(not torch.equal(start[k], trained[k]) for k in stats)


@pytest.mark.parametrize("arch", ["tiny-rn", "tiny-vit"])
def test_frozen_parameters_are_not_handed_to_the_optimizer(arch):
    from trainers.loop import _optimizer, freeze_tower
    from trainers.models import build_model

    for trainable in ("image", "text"):
        model = build_model(arch, None, device=torch.device("cpu"), image_size=32).model
        freeze_tower(model, trainable, "tower")
        config = parse_trial_config({"model": {"arch": arch}, "train": {"trainable": trainable}})
        optimizer, _ = _optimizer(model, config.train, total_steps=10)
        handed = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = {id(p): n for n, p in model.named_parameters()}
        assert handed == {id(p) for p in model.parameters() if p.requires_grad}
        assert id(model.logit_scale) in handed
        in_frozen = (lambda n: n.startswith("visual.")) if trainable == "text" else \
            (lambda n: not n.startswith("visual.") and n != "logit_scale")
        assert all(in_frozen(names[i]) != (i in handed) for i in names), trainable


def test_trainable_is_validated_and_keys_the_clean_model():
    from poison.config import ConfigError
    from trainers.trial import clean_key

    with pytest.raises(ConfigError, match="train.trainable"):
        parse_trial_config({"train": {"trainable": "vision"}})
    keys = {t: clean_key(parse_trial_config({"train": {"trainable": t}})) for t in ("both", "image", "text")}
    assert len(set(keys.values())) == 3


def test_batches_are_prepared_ahead_in_order_and_a_failure_surfaces_at_its_batch():
    from trainers.data import prefetched

    started = [threading.Event() for _ in range(6)]
    names = set()

    def prepare(i):
        names.add(threading.current_thread().name)
        started[i].set()
        if i == 4:
            raise ValueError("batch 4 is unreadable")
        return i * 10

    batches = prefetched(prepare, range(6), threads=2)
    assert next(batches) == 0
    assert started[1].wait(10) and started[2].wait(10)  # in the making before they are asked for
    assert not started[3].is_set()  # but no more than `threads` ahead
    assert [next(batches), next(batches), next(batches)] == [10, 20, 30]
    with pytest.raises(ValueError, match="batch 4 is unreadable"):
        next(batches)
    assert names and all(name.startswith("poisonsweep-loader") for name in names)

    started = [threading.Event() for _ in range(6)]
    names.clear()
    inline = prefetched(prepare, range(3), threads=0)
    assert next(inline) == 0 and not started[1].is_set()  # 0 threads: prepared when asked, here
    assert names == {threading.current_thread().name} and list(inline) == [10, 20]


@pytest.mark.parametrize("arch", ["tiny-rn", "tiny-vit"])
def test_the_text_tower_computes_the_same_on_batches_cut_to_their_longest_caption(arch):
    from trainers.models import ShortContextCLIP, build_model

    built = build_model(arch, None, device=torch.device("cpu"), image_size=32)
    model = built.model
    assert isinstance(model, ShortContextCLIP)
    tokens = built.tokenize(["a red square", "a photo of a small blue circle on the left"])
    longest = int((tokens != 0).sum(1).max())  # start token, words, end token
    assert longest < tokens.shape[1]
    cut = built.text_input(tokens)
    assert torch.equal(cut, tokens[:, :longest])
    # the same features and the same gradients, up to float rounding
    weights = torch.randn(model.text_projection.shape[1], generator=torch.Generator().manual_seed(0))
    grads = []
    for batch in (tokens, cut):
        model.zero_grad()
        features = model.encode_text(batch, normalize=True)
        (features @ weights).sum().backward()
        grads.append((features.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, full_grads), (short, short_grads) = grads
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)
    assert full_grads.keys() == short_grads.keys() and "positional_embedding" in full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(short_grads[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=name)
    for g in (full_grads, short_grads):  # the padding's positions never mattered, cut or not
        assert not g["positional_embedding"][longest:].any()


def test_a_text_tower_that_pools_the_last_position_keeps_its_full_context():
    import open_clip

    from trainers.models import Built, ShortContextCLIP, build_model

    text_cfg = {**open_clip.get_model_config("tiny-rn")["text_cfg"], "pool_type": "last"}
    model = open_clip.model.CLIP(embed_dim=64, vision_cfg=open_clip.get_model_config("tiny-rn")["vision_cfg"],
                                 text_cfg=text_cfg)
    assert not ShortContextCLIP.takes(model)  # its features are the padding's last position's
    tokens = build_model("tiny-rn", None, device=torch.device("cpu"), image_size=32).tokenize(["a red square"])
    built = Built(model=model, tokenize=None, mean=torch.zeros(1, 3, 1, 1), std=torch.ones(1, 3, 1, 1), image_size=32)
    assert torch.equal(built.text_input(tokens), tokens)


class _Crash(RuntimeError):
    pass


def test_a_trial_resumed_from_its_checkpoint_ends_as_if_never_interrupted(tmp_path):
    """The worker 'dies' after epoch 2 of 3; the trial run again with the same checkpointer goes
    on from epoch 2 and ends with the uninterrupted trial's weights and metrics, exactly.
    Under RoCLIP (period 1: every epoch matches) epoch 3 matches images to the caption pool that
    epochs 1-2 wrote, so the objective's state must come back with the checkpoint too."""
    from trainers.resume import FolderCheckpointer, read_state

    raw = {"data": {"size": 256, "test_size": 48},
           "train": {"epochs": 3, "batch_size": 64, "threads": 2, "loader_threads": 0}, "attack": backdoor(30),
           "defense": {"kind": "roclip", "pool_size": 100, "period": 1}}
    whole = run_trial(parse_trial_config(raw), baseline=False)  # batches prepared in the loop's thread
    # the interrupted and resumed runs prepare them ahead in 3 threads: the same training
    config = parse_trial_config({**raw, "train": {**raw["train"], "loader_threads": 3}})

    def crash_after_two(epoch):
        if epoch["epoch"] == 2:
            raise _Crash
    saver = FolderCheckpointer(tmp_path / "state")
    with pytest.raises(_Crash):
        run_trial(config, baseline=False, checkpointer=saver, on_epoch=crash_after_two)
    saved = read_state(tmp_path / "state")
    assert saved["epoch"] == 2 and saved["objective"]["pool"].shape[0] == 100  # saved before the epoch was reported
    # 2 epochs of 4 batches of 64 (the 256 clean pairs' batches) written into the ring of 100
    assert saved["objective"]["next_row"] == (2 * 4 * 64) % 100
    epochs = []
    resumed = run_trial(config, baseline=False, checkpointer=saver, on_epoch=epochs.append)
    assert [e["epoch"] for e in epochs] == [3]  # epochs 1-2 are not trained or reported again
    assert resumed.metrics.pop("resumed_from_epoch") == 2
    timing = ("train_seconds", "samples_per_second", "data_seconds")
    assert {k: v for k, v in resumed.metrics.items() if k not in timing} == \
        {k: v for k, v in whole.metrics.items() if k not in timing}
    for name, tensor in whole.state_dict.items():
        assert torch.equal(tensor, resumed.state_dict[name]), name
    # the resumed run left epoch 3's state, which cannot belong to a shorter training
    short = parse_trial_config({**config.to_dict(), "train": {**config.to_dict()["train"], "epochs": 2}})
    with pytest.raises(ValueError, match="epoch 3, but training ends at epoch 2"):
        run_trial(short, baseline=False, checkpointer=saver)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_runs_both_towers_in_the_asked_dtype(precision, dtype):
    """The GPU path's autocast where this machine can run it (torch's CPU autocast)."""
    from trainers.loop import autocast_for
    from trainers.models import build_model

    config = parse_trial_config({"train": {"precision": precision}})
    built = build_model(config.model.arch, None, device=torch.device("cpu"), image_size=config.data.image_size)
    with torch.no_grad(), autocast_for(config, torch.device("cpu")):
        assert built.model.encode_image(torch.zeros(2, 3, 32, 32)).dtype == dtype
        assert built.model.encode_text(torch.zeros(2, 16, dtype=torch.long)).dtype == dtype


def test_a_bf16_trial_trains_and_keeps_fp32_weights():
    """Training under bf16 autocast (fp16 is not trained here: its convolutions are 10x slower on
    the CPU, and on a GPU fp16 adds the loss scaler)."""
    config = parse_trial_config({"data": {"size": 300, "test_size": 48},
                                 "train": {"epochs": 2, "batch_size": 64, "threads": 2, "precision": "bf16"}})
    epochs = []
    result = run_trial(config, baseline=False, on_epoch=epochs.append)
    assert all(math.isfinite(e["loss"]) for e in epochs) and epochs[1]["loss"] < epochs[0]["loss"]
    assert {t.dtype for t in result.state_dict.values() if t.is_floating_point()} == {torch.float32}


def test_an_epoch_of_a_set_smaller_than_its_clean_pairs_holds_no_row_twice_in_a_batch():
    """A filter that leaves fewer pairs than an epoch's batches need: the epoch goes on into a
    second shuffled pass, each pass cut into its own batches, so a contrastive batch never holds
    the same pair twice (its own false negative)."""
    from trainers.data import TrainingSet

    class Rows(TrainingSet):
        def __init__(self, n, clean):
            self.image, self.epoch_rows = np.zeros(n), clean

    rng = np.random.default_rng(1)
    for _ in range(200):
        batches = Rows(99, 128).epoch(8, rng)
        assert len(batches) == 16 and all(len(set(b.tolist())) == 8 for b in batches)


def test_the_epochs_loss_is_split_between_poisoned_and_clean_pairs():
    from trainers.loop import PairLosses

    eye, swap = torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    one = torch.tensor(1.0)
    split = PairLosses(np.array([False, True, False, True]))
    # matched pairs: each loss log(1 + e^-1) = 0.313262; crossed ones: log(1 + e) = 1.313262
    split.add(np.array([0, 1]), {"image_features": eye, "text_features": eye, "logit_scale": one})
    split.add(np.array([1, 3]), {"image_features": eye, "text_features": swap, "logit_scale": one})
    means = split.means()
    assert means["train_loss_clean"] == pytest.approx(0.313262, abs=1e-6)  # row 0
    assert means["train_loss_poisoned"] == pytest.approx((0.313262 + 2 * 1.313262) / 3, abs=1e-6)  # rows 1, 1, 3
    clean_only = PairLosses(np.zeros(4, bool))
    clean_only.add(np.array([0, 1]), {"image_features": eye, "text_features": eye, "logit_scale": one})
    assert clean_only.means() == {}
