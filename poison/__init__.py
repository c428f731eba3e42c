"""poison: datasets → manifests, triggers, attacks → poison plans, data-side defenses.

Imports no other package of poisonsweep (it is the bottom layer).
"""
from poison.attacks import ATTACKS, Attack, make_attack, plan_hash
from poison.config import ConfigError
from poison.datasets import DATASETS, DataError, DataSpec, load_dataset
from poison.defenses import DEFENSES, Defense, make_defense
from poison.manifest import Dataset
from poison.text_triggers import TEXT_TRIGGERS, make_text_trigger
from poison.triggers import TRIGGERS, make_trigger

__all__ = ["ATTACKS", "Attack", "ConfigError", "DATASETS", "DEFENSES", "DataError", "DataSpec", "Dataset", "Defense",
           "TEXT_TRIGGERS", "TRIGGERS", "load_dataset", "make_attack", "make_defense", "make_text_trigger", "make_trigger",
           "plan_hash"]
