"""trainers: one trial without Ray — open_clip models, the training loop, evaluation, the model
cache, defense hooks and the defenses that need the model.

Imports ``poison``; never ``sweeps``. The public names below are imported on first use
(PEP 562), so reading a trial config (``trainers.config``) does not import torch.
"""
import trainers.defenses  # noqa: F401  (names the defenses that need the model, before any config is read)
from poison.lazy import exports

__all__, __getattr__, __dir__ = exports("trainers", {
    "config": ["TrialConfig", "parse_trial_config"],
    "loop": ["NonFiniteLossError"],
    "trial": ["TrialResult", "clean_model", "run_trial"],
})
