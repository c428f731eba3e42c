"""Training that survives its process: the loop's state after an epoch, saved to a folder
and loaded back, so a trial whose worker died goes on from its last finished epoch.

The state is everything the next epoch depends on: the weights, AdamW's moments, the
schedule's step, the fp16 scaler, the objective's own state (a defense's caption pool), the batch order's random stream and torch's, and the
epochs' reports so far. Resumed, the loop trains on exactly as it would have (a test
compares a resumed trial with an uninterrupted one, metric for metric).

Tensors go to ``train_state.pt`` (read back with ``weights_only=True``), everything else
to ``train_state.json``; the JSON is written last, so a folder without it is incomplete
and is never used.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

from poison.manifest import atomic_write

TENSORS, META = "train_state.pt", "train_state.json"


class Checkpointer(Protocol):
    """Where the loop keeps its state between epochs (a Ray Tune checkpoint in a sweep)."""

    def load(self) -> dict[str, Any] | None:
        """The last saved state, or None to start from the first epoch."""

    def save(self, state: dict[str, Any]) -> None:
        """Keeps ``state`` (after an epoch, before that epoch is reported)."""

    @property
    def every(self) -> int:
        """Save after every this many epochs (and after the last one)."""


def write_state(folder: str | Path, state: dict[str, Any]) -> None:
    """Writes a loop state (see :func:`trainers.loop.fit`) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: state[k] for k in ("model", "optimizer", "schedule", "scaler", "torch_rng", "objective")
               if k in state}
    meta = json.dumps({k: v for k, v in state.items() if k not in tensors})
    # each file whole or not at all, no temporary file left on any path (poison.manifest.atomic_write)
    atomic_write(folder / TENSORS, lambda fh: torch.save(tensors, fh))
    atomic_write(folder / META, lambda fh: fh.write(meta.encode()))


def read_state(folder: str | Path) -> dict[str, Any] | None:
    """The loop state in ``folder``, or None when there is none (or only part of one)."""
    folder = Path(folder)
    if not (folder / META).is_file() or not (folder / TENSORS).is_file():
        return None
    meta = json.loads((folder / META).read_text())
    return {**torch.load(folder / TENSORS, map_location="cpu", weights_only=True), **meta}


class FolderCheckpointer:
    """A :class:`Checkpointer` in one local folder (``poisonsweep train --checkpoint DIR``, tests)."""

    def __init__(self, folder: str | Path, every: int = 1) -> None:
        self.folder, self.every = Path(folder), every

    def load(self) -> dict[str, Any] | None:
        return read_state(self.folder)

    def save(self, state: dict[str, Any]) -> None:
        write_state(self.folder, state)


def rng_state(rng: Any) -> dict[str, Any]:
    """A numpy Generator's state as JSON-safe values (PCG64's 128-bit integers as strings)."""
    state = rng.bit_generator.state
    return {"bit_generator": state["bit_generator"],
            "state": {k: str(v) for k, v in state["state"].items()},
            "has_uint32": state["has_uint32"], "uinteger": state["uinteger"]}


def set_rng_state(rng: Any, saved: dict[str, Any]) -> None:
    if saved["bit_generator"] != rng.bit_generator.state["bit_generator"]:
        raise ValueError(f"saved random stream is {saved['bit_generator']}, "
                         f"not {rng.bit_generator.state['bit_generator']}")
    rng.bit_generator.state = {"bit_generator": saved["bit_generator"],
                               "state": {k: int(v) for k, v in saved["state"].items()},
                               "has_uint32": saved["has_uint32"], "uinteger": saved["uinteger"]}


__all__ = ["Checkpointer", "FolderCheckpointer", "read_state", "write_state"]
