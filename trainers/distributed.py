"""Data-parallel training of one trial over several processes (ranks), with torch.distributed.

The training loop (``trainers.loop.fit``) trains data-parallel whenever a process group of more
than one rank is initialised; what starts the processes and the group (Ray Train in a sweep,
``torch.multiprocessing`` in the tests) is not its business, and a single process trains exactly
as before. With W ranks:

- every rank draws the same seeded global batch order and takes the 1/W contiguous slice of each
  global batch (``Ranks.local``): the global batch is the single-process batch;
- the model is wrapped in DistributedDataParallel, which averages the gradients;
- the local image and text features are gathered from all ranks, with their gradients, before the
  objective sees them (``Ranks.gather``), so an objective (``trainers.objectives``, a defense's)
  sees the whole global batch, as in one process, and computes the same loss on every rank.
  Since every rank then backpropagates the full loss through the gathered features, each local
  feature's gradient arrives W times (all_gather's backward sums them) and DDP's average over
  the ranks undoes that: the update is the single-process one;
- rank 0 evaluates and saves checkpoints; the evaluation is shared with the other ranks.

BatchNorm statistics (tiny-rn, ResNets) are computed per rank over the local slice, as in
open_clip_train without ``--use-bn-sync``; architectures without BatchNorm (ViTs) train like one
process up to floating-point summation order.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
#: Model outputs gathered over the ranks (per-row features); the rest (logit_scale) is shared.
GATHERED = ("image_features", "text_features")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the trial's process group: rank ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The initialised default process group's ranks, else one process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def lead(self) -> bool:
        """Rank 0: the one that evaluates, saves and reports."""
        return self.rank == 0

    def usable(self, n: int) -> int:
        """Rows of a global batch of ``n`` that split evenly over the ranks (all of a full batch,
        whose size the config checks; a smaller last batch loses at most ``size - 1`` rows)."""
        return n - n % self.size

    def local(self, n: int) -> slice:
        """This rank's contiguous slice of a global batch of ``n`` rows (``usable(n) == n``)."""
        if not self.parallel:
            return slice(None)
        if n % self.size:
            raise ValueError(f"a batch of {n} pairs does not split evenly over {self.size} ranks")
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The module to run forward passes through: DDP over the ranks, or ``model`` itself.

        ``find_unused_parameters``: an objective may leave a whole tower without a gradient in
        some steps (roclip's matching epochs train the image tower only)."""
        if not self.parallel:
            return model
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def gather(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model outputs of the global batch: each rank's features concatenated in rank order
        (its own keep their autograd graph; the others' gradients flow back to their ranks)."""
        if not self.parallel:
            return out
        from torch.distributed.nn.functional import all_gather  # autograd-aware

        return {k: torch.cat(all_gather(v.contiguous()), dim=0) if k in GATHERED else v for k, v in out.items()}

    def from_lead(self, compute: Callable[[], T]) -> T:
        """``compute()`` on rank 0, its result handed to every rank (the others wait)."""
        if not self.parallel:
            return compute()
        return self.share(compute() if self.lead else None)

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (picklable objects)."""
        if not self.parallel:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


__all__ = ["Ranks", "GATHERED"]
