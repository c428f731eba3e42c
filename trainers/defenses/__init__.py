"""Defenses that need the model (torch), registered in ``poison.defenses.DEFENSES`` like the
data-side ones; the trial runs their hooks through ``trainers.hooks`` and their training
objectives (``trainers.objectives``) through the one loop.

Each is named here with the module that defines it, imported when a config first names it:
reading or validating a config that uses none of them does not import torch.
"""
from poison.defenses import DEFENSES

for _name, _module in (("clean-finetune", "finetune"), ("cleanclip", "cleanclip"), ("roclip", "roclip"),
                       ("safeclip", "safeclip"), ("safeclip-mixed", "safeclip")):
    DEFENSES.register_module(_name, f"trainers.defenses.{_module}")
