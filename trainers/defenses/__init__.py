"""Defenses that need the model (torch), registered in ``poison.defenses.DEFENSES`` like the
data-side ones; the trial runs their hooks through ``trainers.hooks`` and their training
objectives (``trainers.objectives``) through the one loop.

This package only defines configs, objectives and hook bodies: importing it pulls in no
training loop, so ``trainers.config`` can import it to register them.
"""
from trainers.defenses import cleanclip, finetune, roclip, safeclip  # noqa: F401  (registration on import)
