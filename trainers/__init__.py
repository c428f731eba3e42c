"""trainers: one trial without Ray — open_clip models, the training loop, evaluation, the model
cache, defense hooks and the defenses that need the model.

Imports ``poison``; never ``sweeps``.
"""
import trainers.defenses  # noqa: F401  (registers the defenses that need the model, before any config is read)
from trainers.config import TrialConfig, parse_trial_config
from trainers.loop import NonFiniteLossError
from trainers.trial import TrialResult, clean_model, run_trial

__all__ = ["NonFiniteLossError", "TrialConfig", "TrialResult", "clean_model", "parse_trial_config", "run_trial"]
