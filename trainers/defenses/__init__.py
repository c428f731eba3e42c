"""Defenses that need the model (torch), registered in ``poison.defenses.DEFENSES`` like the
data-side ones; the trial runs their hooks through ``trainers.hooks``.

This package only defines configs and hook bodies: importing it pulls in no training code,
so ``trainers.config`` can import it to register them.
"""
from trainers.defenses import finetune  # noqa: F401  (registration on import)
