"""Text triggers, registered by name (``attack.text_trigger.kind``).

A text trigger inserts a token or phrase into captions. Like an image trigger it
has a seeded ``placement`` (the word position in each caption, stored in the
poison plan) and a pure ``apply``. Captions are short strings, so a plan holds
the triggered caption itself; ``apply`` is used again at evaluation time on
clean test captions.
"""
from poison.text_triggers import phrase  # noqa: F401  (each registers itself on import)
from poison.text_triggers._base import TEXT_TRIGGERS, TextTrigger, make_text_trigger
from poison.text_triggers.phrase import PhraseTrigger

__all__ = ["PhraseTrigger", "TEXT_TRIGGERS", "TextTrigger", "make_text_trigger"]
