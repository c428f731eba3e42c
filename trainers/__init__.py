"""trainers: one trial without Ray — open_clip models, the training loop, evaluation, the model
cache, defense hooks and the defenses that need the model.

Imports ``poison``; never ``sweeps``. The public names below are imported on first use
(PEP 562), so reading a trial config (``trainers.config``) does not import torch.
"""
import importlib
from typing import Any

import trainers.defenses  # noqa: F401  (names the defenses that need the model, before any config is read)

_HOME = {"TrialConfig": "trainers.config", "parse_trial_config": "trainers.config",
         "NonFiniteLossError": "trainers.loop",
         "TrialResult": "trainers.trial", "clean_model": "trainers.trial", "run_trial": "trainers.trial"}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'trainers' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


def __dir__() -> list[str]:
    return sorted(_HOME)
