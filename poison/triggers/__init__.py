"""Image triggers, registered by name (``attack.trigger.kind``).

A trigger has a frozen config, a seeded ``placement`` (where it goes on each of
n images: stored in the poison plan) and a pure ``apply`` that stamps it on a
batch of uint8 (N, H, W, 3) images when the batch is loaded.
"""
from poison.triggers import blended, patch, sig, wanet  # noqa: F401  (each registers itself on import)
from poison.triggers._base import CORNERS, TRIGGERS, Trigger, make_trigger
from poison.triggers.blended import BlendedTrigger
from poison.triggers.patch import CARLINI_SIDE, PatchTrigger
from poison.triggers.sig import SigTrigger
from poison.triggers.wanet import WaNetTrigger

__all__ = ["BlendedTrigger", "CARLINI_SIDE", "CORNERS", "PatchTrigger", "SigTrigger", "TRIGGERS", "Trigger", "WaNetTrigger",
           "make_trigger"]
