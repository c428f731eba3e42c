"""trainers: one trial without Ray — open_clip models, training loop, evaluation.

Imports ``poison``; never ``sweeps``.
"""
from trainers.config import TrialConfig, parse_trial_config
from trainers.trial import NonFiniteLossError, TrialResult, clean_model, run_trial

__all__ = ["NonFiniteLossError", "TrialConfig", "TrialResult", "clean_model", "parse_trial_config", "run_trial"]
