"""The one training loop: CLIP's contrastive loss, AdamW, warm-up then cosine, an
evaluation after every epoch. A trial trains through it, and so does every defense
that trains (a reference model, clean fine-tuning): none has a loop of its own.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from trainers.config import TrainConfig, TrialConfig
from trainers.data import TrainingSet, prefetched, to_tensor
from trainers.distributed import Ranks
from trainers.models import Built
from trainers.objectives import Objective, Step
from trainers.resume import Checkpointer, rng_state, set_rng_state

EpochCallback = Callable[[dict[str, float]], None]
#: Streams of the trial seed: the training batches, and a post-training defense's batches.
SHARED_PARAMETERS = ("logit_scale", "logit_bias")  # belong to neither tower: always train


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite: the trial failed."""


@dataclass
class Fitted:
    """What a run of the loop leaves besides the trained model."""

    last: dict[str, float]  # the last epoch's evaluation
    history: list[dict[str, float]] = field(default_factory=list)  # every epoch's report
    seconds: float = 0.0    # training time, evaluation excluded
    data_seconds: float = 0.0  # the part of it spent waiting for batches (see _next_batch)
    samples: int = 0
    steps: int = 0          # optimizer steps taken
    resumed_from: int = 0   # the saved epoch training went on from (0: none)


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


def loader_threads(config: TrialConfig, device: torch.device) -> int:
    """``train.loader_threads``, with auto as 1 on a GPU (the host prepares the next batch while
    the device computes) and 0 on the CPU (a loader thread would take a core from torch's)."""
    wanted = config.train.loader_threads
    if wanted == "auto":
        return 1 if device.type == "cuda" else 0
    return wanted


def fit(built: Built, data: TrainingSet, config: TrialConfig, *, evaluate: Callable[[], dict[str, float]],
        rng: np.random.Generator, recipe: TrainConfig | None = None, on_epoch: EpochCallback | None = None,
        first_epoch: int = 1, checkpointer: Checkpointer | None = None,
        objective: Objective | None = None) -> Fitted:
    """Trains ``built`` on ``data`` for ``recipe`` (default ``config.train``), then ``evaluate()``s
    after every epoch; epochs are numbered from ``first_epoch`` in the reports to ``on_epoch``.

    With a ``checkpointer``, the loop's whole state is saved after every ``checkpointer.every``
    epochs (and the last), before the epoch is reported; a state it already holds is loaded
    first and training goes on after that epoch, as it would have without the interruption
    (its epochs are not reported again).

    ``objective`` is the loss minimised (default: CLIP's on the batch's own pairs); a defense
    that acts during training supplies its own (``trainers.objectives``).

    In an initialised process group of several ranks it trains data-parallel
    (``trainers.distributed``): each rank computes its slice of every global batch, the
    objective sees the whole batch's features; rank 0 evaluates (every rank gets the result and
    calls ``on_epoch`` with the same report, but for its own ``epoch_seconds`` and
    ``epoch_data_seconds``) and alone saves to the ``checkpointer``.
    """
    recipe = recipe or config.train
    device, ranks = built.mean.device, Ranks.current()
    set_memory_format(built.model, config.train.memory_format)
    steps_per_epoch = data.steps(recipe.batch_size)
    optimizer, schedule = _optimizer(built.model, recipe, steps_per_epoch * recipe.epochs)
    scaler = torch.amp.GradScaler(enabled=recipe.precision == "fp16" and device.type == "cuda")
    autocast, objective = autocast_for(config, device), objective or Objective()
    to_input = lambda images: to_tensor(images, built.mean, built.std)  # noqa: E731
    fitted = Fitted(last={})
    last_epoch = first_epoch + recipe.epochs - 1
    saved = checkpointer.load() if checkpointer is not None else None
    if saved is not None:
        first_epoch = _restore(saved, built, optimizer, schedule, scaler, rng, fitted, last_epoch) + 1
        objective.load_state_dict(saved.get("objective", {}))
    model = ranks.wrap(built.model, device)  # what forward passes go through
    for epoch in range(first_epoch, last_epoch + 1):
        start, waited, losses = time.perf_counter(), fitted.data_seconds, []
        split = PairLosses(data.poisoned)
        objective.start_epoch(epoch, TrainingEmbeddings(built, data, autocast))
        fixed_lr = objective.epoch_lr(epoch, recipe.lr)
        _set_lr(optimizer, schedule, fixed_lr)
        built.model.train()
        prepare = functools.partial(_prepare_batch, data, built, ranks)
        previous = None  # the last step's loss, read once the next step is queued (see _finite)
        with contextlib.closing(prefetched(prepare, objective.batches(epoch, data, recipe.batch_size, rng),
                                           loader_threads(config, device))) as batches:
            while (batch := _next_batch(batches, fitted)) is not None:
                rows, images, x, tokens = batch  # x: this rank's slice; the rest: the global batch
                viewed = objective.inputs(rows, images)  # augmented views trained on instead, if any
                if viewed is not None:
                    images, view_tokens = viewed
                    x = to_input(images[ranks.local(len(rows))])
                    tokens = tokens if view_tokens is None else built.text_input(view_tokens)
                with autocast:
                    out = ranks.gather(model(x, tokens[ranks.local(len(rows))]))
                    loss = objective.loss(Step(built.model, images, tokens, out, epoch, to_input, rows, last_epoch,
                                               built.text_input))
                split.add(rows, out)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                _set_lr(optimizer, schedule, fixed_lr)
                with torch.no_grad():  # CLIP clamps the temperature at 100
                    built.model.logit_scale.clamp_(0, math.log(100))
                if previous is not None:
                    losses.append(_finite(previous, epoch))
                previous = loss.detach()
                fitted.samples += len(images)
                fitted.steps += 1
        if previous is not None:  # before the epoch is evaluated or saved
            losses.append(_finite(previous, epoch))
        seconds = time.perf_counter() - start
        fitted.seconds += seconds
        fitted.last = ranks.from_lead(evaluate)
        fitted.history.append({"epoch": epoch, "loss": float(np.mean(losses)), **split.means(),
                               "epoch_seconds": seconds, "epoch_data_seconds": fitted.data_seconds - waited,
                               **fitted.last})
        if (checkpointer is not None and checkpointer.every and ranks.lead
                and (epoch % checkpointer.every == 0 or epoch == last_epoch)):
            checkpointer.save({
                "model": built.model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(), "rng": rng_state(rng), "epoch": epoch,
                "last": fitted.last, "history": fitted.history, "seconds": fitted.seconds,
                "data_seconds": fitted.data_seconds,
                "samples": fitted.samples, "steps": fitted.steps, "resumed_from": fitted.resumed_from,
                "objective": objective.state_dict()})
        if on_epoch is not None:
            on_epoch(fitted.history[-1])
    return fitted


class PairLosses:
    """The epoch's training loss split between poisoned and clean pairs, an early signal of a
    backdoor (``docs/search.md``: the per-epoch rank correlations): each pair's CLIP loss in its
    batch (the mean of its image-to-text and text-to-image cross-entropies under the batch's
    logits, as the model was before the step), averaged over the epoch's poisoned pairs
    (``train_loss_poisoned``) and its clean ones (``train_loss_clean``). Nothing is reported
    without poisoned pairs in the training set."""

    def __init__(self, poisoned: np.ndarray) -> None:
        self.poisoned = poisoned if poisoned.any() else None
        self.sums = np.zeros(2)  # clean, poisoned
        self.counts = np.zeros(2)

    @torch.no_grad()
    def add(self, rows: np.ndarray, out: dict[str, torch.Tensor]) -> None:
        if self.poisoned is None or rows is None:
            return
        losses = pair_losses(out["image_features"], out["text_features"], out["logit_scale"]).cpu().numpy()
        mask = self.poisoned[rows]
        for group, where in enumerate((~mask, mask)):
            self.sums[group] += float(losses[where].sum())
            self.counts[group] += int(where.sum())

    def means(self) -> dict[str, float]:
        if self.poisoned is None or not self.counts.all():
            return {}
        clean, poisoned = self.sums / self.counts
        return {"train_loss_poisoned": float(poisoned), "train_loss_clean": float(clean)}


def pair_losses(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Each pair's share of CLIP's symmetric InfoNCE loss on a batch: the mean of its row's
    image-to-text and its column's text-to-image cross-entropy (their mean over the batch is
    open_clip's ``ClipLoss``).

    Example (two orthogonal pairs at temperature 1: each loss is log(1 + e^-1)):
        >>> import torch
        >>> eye = torch.eye(2)
        >>> [round(v, 6) for v in pair_losses(eye, eye, torch.tensor(1.0)).tolist()]
        [0.313262, 0.313262]
    """
    logits = logit_scale * image.float() @ text.float().T
    target = torch.arange(len(logits), device=logits.device)
    i2t = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    t2i = torch.nn.functional.cross_entropy(logits.T, target, reduction="none")
    return (i2t + t2i) / 2


class TrainingEmbeddings:
    """The training pairs under the model as it is now, for an objective that looks at all of
    them between epochs (``Objective.start_epoch``): computed only when asked."""

    CHUNK = 1024

    def __init__(self, built: Built, data: TrainingSet, autocast) -> None:
        self.built, self.data, self.autocast = built, data, autocast

    def __len__(self) -> int:
        return len(self.data)

    @torch.no_grad()
    def embed(self, inputs: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, torch.Tensor | None]] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (N, D) image and caption embeddings of every training row, triggers
        stamped, in eval mode (the model is left in eval mode: the loop sets train mode after);
        of the views ``inputs(rows, images)`` makes of them where given (``Objective.inputs``)."""
        model, data = self.built.model, self.data
        model.eval()
        images, texts = [], []
        with self.autocast:
            for start in range(0, len(data), self.CHUNK):
                rows = np.arange(start, min(start + self.CHUNK, len(data)))
                batch, tokens = data.batch(rows)
                if inputs is not None:
                    batch, view_tokens = inputs(rows, batch)
                    tokens = tokens if view_tokens is None else view_tokens
                x = to_tensor(batch, self.built.mean, self.built.std)
                images.append(model.encode_image(x, normalize=True).float())
                texts.append(model.encode_text(self.built.text_input(tokens), normalize=True).float())
        return torch.cat(images), torch.cat(texts)


def set_memory_format(model: torch.nn.Module, memory_format: str) -> None:
    """Puts ``model``'s weights in channels-last layout when asked, or under ``auto`` when its image
    tower has more than one convolution (a ResNet, not a ViT's patch embedding). Batches come
    from ``to_tensor`` already channels-last (a permuted view of the NHWC images), so no copy."""
    if memory_format == "auto":
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in getattr(model, "visual", model).modules())
        memory_format = "channels_last" if convs > 1 else "contiguous"
    if memory_format == "channels_last":
        model.to(memory_format=torch.channels_last)


def _set_lr(optimizer: torch.optim.Optimizer, schedule, fixed: float | None) -> None:
    """Every parameter group's learning rate: ``fixed``, or the schedule's (which an epoch at a
    fixed rate leaves counting steps)."""
    for group, scheduled in zip(optimizer.param_groups, schedule.get_last_lr()):
        group["lr"] = scheduled if fixed is None else fixed


def _prepare_batch(data: TrainingSet, built: Built, ranks: Ranks, rows: np.ndarray):
    """The batch of ``rows`` as (rows, uint8 images, model input, tokens on the device): triggers
    stamped, normalised, copied to the device (run ahead of the loop by ``prefetched``); tokens
    as ``built.text_input`` gives them. With several ranks the model input is this rank's slice
    only, the rest the global batch (cut to a multiple of the ranks). In a loader thread the
    current CUDA device is the thread's own (device 0): it is set to the batch's device, so that
    pinning host memory does not make a context on another rank's GPU."""
    if ranks.parallel:
        rows = rows[: ranks.usable(len(rows))]
    device = built.mean.device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        images, tokens = data.batch(rows)
        x = to_tensor(images[ranks.local(len(rows))], built.mean, built.std)
        return rows, images, x, built.text_input(tokens, non_blocking=True)


def _next_batch(batches, fitted: Fitted):
    """The next prepared batch, or None at the epoch's end; the time the loop waited for it is
    added to ``fitted.data_seconds`` (with ``train.loader_threads`` 0: the time it took to
    prepare, in the loop's own thread)."""
    start = time.perf_counter()
    batch = next(batches, None)
    fitted.data_seconds += time.perf_counter() - start
    return batch


def _finite(loss: torch.Tensor, epoch: int) -> float:
    """``loss`` as a float; NonFiniteLossError when it is NaN or infinite. The loop reads each
    step's loss after queuing the next step, so that on a GPU reading it waits for a step that
    is done and the device never runs dry (the step that went non-finite has then been applied,
    and so has the one after it: the trial fails either way, before it evaluates or saves)."""
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLossError(f"training loss became {value} in epoch {epoch}")
    return value


def _restore(saved: dict, built: Built, optimizer: torch.optim.Optimizer, schedule, scaler,
             rng: np.random.Generator, fitted: Fitted, last_epoch: int) -> int:
    """Puts a saved loop state back; returns the epoch it was saved after."""
    epoch = int(saved["epoch"])
    if epoch > last_epoch:
        raise ValueError(f"saved training state is of epoch {epoch}, but training ends at epoch {last_epoch}")
    built.model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["torch_rng"])
    set_rng_state(rng, saved["rng"])
    fitted.last, fitted.history = saved["last"], saved["history"]
    fitted.seconds, fitted.samples, fitted.resumed_from = saved["seconds"], saved["samples"], epoch
    fitted.data_seconds, fitted.steps = saved.get("data_seconds", 0.0), saved.get("steps", 0)
    return epoch


def freeze_tower(model: torch.nn.Module, trainable: str, scope: str) -> None:
    """Freezes the tower that ``train.trainable`` leaves out, as far as ``train.freeze`` says.

    ``encoder`` (Yang et al.'s code, mm_poison ``retrieval_by_CLIP.py:main``): ``requires_grad``
    off for the image encoder's parameters (``visual``; its BatchNorm running statistics still
    update, the model being in training mode) or the text transformer's (``transformer``, or
    ``text.transformer`` in open_clip's custom-text models), nothing else.

    ``tower`` (ours): every parameter of the tower, with open_clip's own LiT locking;
    ``lock_image_tower(freeze_bn_stats=True)`` also swaps the tower's BatchNorm2d for
    torchvision's FrozenBatchNorm2d (buffers only, no running-stat update), which survives
    ``model.train()``; a frozen ModifiedResNet's state_dict then has no ``num_batches_tracked``
    (loading it into a fresh model still works: torch fills them in).
    """
    if trainable == "both":
        return
    image_frozen = trainable == "text"
    if scope == "encoder":
        body = ("visual.",) if image_frozen else ("transformer.", "text.transformer.")
        for name, param in model.named_parameters():
            if name.startswith(body):
                param.requires_grad_(False)
        return
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


def _optimizer(model: torch.nn.Module, recipe: TrainConfig, total_steps: int):
    """AdamW (no decay on gains, biases, embeddings' scale) with linear warm-up then cosine.

    Frozen parameters (``train.trainable``) are left out. torch's AdamW skips a parameter whose
    grad is None, weight decay included, but that rests on ``zero_grad(set_to_none=True)``; a
    frozen parameter handed to it with a zero grad would still be decayed.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "logit_scale" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6,
        # fused: one kernel for all parameters; benchmarks/optimizer_step.py measured CPU
        # steps 4-7x faster than the default loop (the 49,408-token embedding dominates)
        fused=True,
    )
    warmup = max(1, int(recipe.warmup * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
