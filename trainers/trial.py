"""One trial, without Ray: poison the data, train CLIP, evaluate.

``run_trial(config)`` is a plain function of a validated :class:`TrialConfig`;
the sweep driver wraps it, ``poisonsweep train`` calls it directly.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from poison import Dataset, load_dataset, plan_hash
from poison.manifest import cache_key
from trainers.config import TrialConfig
from trainers.data import TrainingSet, to_tensor
from trainers.evaluate import Evaluator
from trainers.models import Built, architecture_fingerprint, build_model, clip_loss

EpochCallback = Callable[[dict[str, float]], None]
BATCH_STREAM = 21


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite: the trial failed."""


@dataclass
class TrialResult:
    metrics: dict[str, float]
    plan: pa.Table
    state_dict: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


def run_trial(config: TrialConfig, *, cache_dir: str | None = None, on_epoch: EpochCallback | None = None,
              baseline: bool = True) -> TrialResult:
    """Trains one poisoned model and returns its final metrics (DESIGN.md names).

    With ``baseline``, the sweep's clean model (same data, model and recipe, no
    poison) is loaded from ``cache_dir`` or trained once and cached, and
    ``clean_utility``, ``utility_drop`` and ``clean_attack_success`` are added.

    Example:
        >>> cfg = parse_trial_config({"data": {"size": 512}, "train": {"epochs": 1}})
        >>> run_trial(cfg).metrics["utility"]  # doctest: +SKIP
    """
    dataset = load_dataset(config.data_spec(cache_dir))
    config.attack.check(dataset)  # reject before any training
    plan = config.attack.plan(dataset, config.seed)
    clean = (clean_model(config, cache_dir=cache_dir)
             if baseline and config.attack.kind != "none" else None)
    built, last, seconds, samples = _train(config, dataset, plan, on_epoch)
    metrics = _final_metrics(config, dataset, plan, last, clean)
    metrics.update(train_seconds=seconds, samples_per_second=samples / max(seconds, 1e-9))
    return TrialResult(metrics=metrics, plan=plan, state_dict=built.model.state_dict())


def device_for(config: TrialConfig) -> torch.device:
    wanted = config.train.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def autocast_for(config: TrialConfig, device: torch.device) -> contextlib.AbstractContextManager:
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _train(config: TrialConfig, dataset: Dataset, plan: pa.Table,
           on_epoch: EpochCallback | None) -> tuple[Built, dict[str, float], float, int]:
    """Trains and evaluates after every epoch; returns the last epoch's metrics."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.seed)
    device = device_for(config)
    built = build_model(config.model.arch, config.model.pretrained, device=device,
                        image_size=config.data.image_size)
    freeze_tower(built.model, config.train.trainable)
    data = TrainingSet(dataset, config.attack, plan, built.tokenize)
    steps_per_epoch = max(1, len(data) // config.train.batch_size)
    optimizer, schedule = _optimizer(built.model, config, steps_per_epoch * config.train.epochs)
    scaler = torch.amp.GradScaler(enabled=config.train.precision == "fp16" and device.type == "cuda")
    autocast, loss_fn = autocast_for(config, device), clip_loss()
    evaluator = Evaluator(built, dataset, autocast=autocast_for(config, device))
    rng = np.random.default_rng([config.seed, BATCH_STREAM])
    seconds, samples = 0.0, 0
    for epoch in range(1, config.train.epochs + 1):
        start, losses = time.perf_counter(), []
        built.model.train()
        for images, tokens in data.epoch(config.train.batch_size, rng):
            x = to_tensor(images, built.mean, built.std)
            with autocast:
                out = built.model(x, tokens.to(device, non_blocking=True))
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"training loss became {loss.item()} in epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            with torch.no_grad():  # CLIP clamps the temperature at 100
                built.model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            samples += len(images)
        seconds += time.perf_counter() - start
        metrics = {**evaluator.utility(), **config.attack.evaluate(dataset, evaluator, config.seed)}
        if on_epoch is not None:
            on_epoch({"epoch": epoch, "loss": float(np.mean(losses)), **metrics})
    return built, metrics, seconds, samples


SHARED_PARAMETERS = ("logit_scale", "logit_bias")  # belong to neither tower: always train


def freeze_tower(model: torch.nn.Module, trainable: str) -> None:
    """Locks the tower that ``train.trainable`` leaves out, with open_clip's own LiT locking.

    ``lock_image_tower(freeze_bn_stats=True)`` also swaps the tower's BatchNorm2d for
    torchvision's FrozenBatchNorm2d (buffers only, no running-stat update), which survives
    ``model.train()``; a frozen ModifiedResNet's state_dict then has no ``num_batches_tracked``
    (loading it into a fresh model still works: torch fills them in).
    """
    if trainable == "both":
        return
    image_frozen = trainable == "text"
    if image_frozen:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    else:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)

    def in_frozen(name: str) -> bool:  # open_clip names the image tower visual.*, the text tower the rest
        return name.startswith("visual.") == image_frozen and name not in SHARED_PARAMETERS

    # For tiny-rn and tiny-vit (open_clip 3.3) the locks already freeze every parameter of the
    # tower (text: token_embedding, positional_embedding, transformer, ln_final, text_projection);
    # this sweep is a guard for architectures whose lock leaves some parameter trainable.
    for name, param in model.named_parameters():
        if in_frozen(name):
            param.requires_grad_(False)
    for name, module in model.named_modules():
        if in_frozen(name + ".") and isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            raise NotImplementedError(f"{name}: a frozen tower's BatchNorm would still update its running stats")


def _optimizer(model: torch.nn.Module, config: TrialConfig, total_steps: int):
    """AdamW (no decay on gains, biases, embeddings' scale) with linear warm-up then cosine.

    Frozen parameters (``train.trainable``) are left out. torch's AdamW skips a parameter whose
    grad is None, weight decay included, but that rests on ``zero_grad(set_to_none=True)``; a
    frozen parameter handed to it with a zero grad would still be decayed.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "logit_scale" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.train.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=config.train.lr, betas=(0.9, 0.98), eps=1e-6,
        # fused: one kernel for all parameters; benchmarks/optimizer_step.py measured CPU
        # steps 4-7x faster than the default loop (the 49,408-token embedding dominates)
        fused=True,
    )
    warmup = max(1, int(config.train.warmup * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _final_metrics(config: TrialConfig, dataset: Dataset, plan: pa.Table, last: dict[str, float],
                   clean: "CleanModel | None") -> dict[str, float]:
    metrics = dict(last)
    n_replace = int(np.sum(plan["op"].to_numpy(zero_copy_only=False) == "replace")) if plan.num_rows else 0
    total = dataset.num_train + plan.num_rows - n_replace
    metrics.update(poison_count=plan.num_rows, poison_rate=plan.num_rows / total)
    if clean is not None:
        metrics.update(clean_utility=clean.metrics["utility"],
                       utility_drop=clean.metrics["utility"] - metrics["utility"])
        attack_on_clean = config.attack.evaluate(dataset, clean.evaluator(config, dataset), config.seed)
        if "attack_success" in attack_on_clean:
            metrics["clean_attack_success"] = attack_on_clean["attack_success"]
    return metrics


# --- the sweep's clean model: trained once, cached by what determines it ---

@dataclass
class CleanModel:
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float]
    cached: bool

    def evaluator(self, config: TrialConfig, dataset: Dataset) -> Evaluator:
        device = device_for(config)
        built = build_model(config.model.arch, config.model.pretrained, device=device,
                            image_size=config.data.image_size)
        built.model.load_state_dict(self.state_dict)
        return Evaluator(built, dataset, autocast=autocast_for(config, device))


def clean_key(config: TrialConfig) -> str:
    """Hash of everything that determines the clean model (not the attack or the name)."""
    clean = config.clean().to_dict()
    for key in ("threads", "device"):  # where and on how many cores does not change what is trained
        clean["train"].pop(key)
    return cache_key(**{k: clean[k] for k in ("seed", "data", "model", "train")},
                     arch=architecture_fingerprint(config.model.arch), version=1)


def clean_model(config: TrialConfig, *, cache_dir: str | None) -> CleanModel:
    """Loads the clean model from the cache, or trains and stores it (once, under a lock)."""
    clean_cfg = config.clean()
    if cache_dir is None:
        result = run_trial(clean_cfg, baseline=False)
        return CleanModel(result.state_dict, result.metrics, cached=False)
    folder = Path(cache_dir) / "clean" / clean_key(config)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent trials wait for one training
        loaded = _load_clean(folder)
        if loaded is not None:
            return loaded
        result = run_trial(clean_cfg, cache_dir=cache_dir, baseline=False)
        _store_clean(folder, result, clean_cfg)
        return CleanModel(result.state_dict, result.metrics, cached=False)


def _load_clean(folder: Path) -> CleanModel | None:
    weights, meta = folder / "model.pt", folder / "metrics.json"
    if not (weights.is_file() and meta.is_file()):
        return None
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        metrics = json.loads(meta.read_text())["metrics"]
    except Exception:  # partial or corrupt entry: rebuild it, never use it
        return None
    return CleanModel(state, metrics, cached=True)


def _store_clean(folder: Path, result: TrialResult, config: TrialConfig) -> None:
    _atomic_write(folder / "model.pt", lambda fh: torch.save(result.state_dict, fh))
    meta = {"metrics": result.metrics, "config": config.to_dict(), "plan_hash": plan_hash(result.plan)}
    _atomic_write(folder / "metrics.json", lambda fh: fh.write(json.dumps(meta, indent=1).encode()))


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        write(fh)
    os.replace(tmp, path)
