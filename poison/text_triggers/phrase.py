"""``phrase``: a token or phrase inserted into captions."""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import field_validator

from poison.text_triggers._base import TEXT_TRIGGERS, TextTrigger


@TEXT_TRIGGERS.register("phrase")
class PhraseTrigger(TextTrigger):
    """A token or phrase inserted at the start, the end or a random word boundary.

    The default ``cf`` is a rare token, as in the NLP backdoor literature
    (Kurita et al. 2020); any phrase works. Words are split on whitespace, so
    ``position: random`` never cuts a word.
    """

    kind: Literal["phrase"] = "phrase"
    text: str = "cf"
    position: Literal["start", "end", "random"] = "start"

    @field_validator("text")
    @classmethod
    def _words(cls, value: str) -> str:
        if not value.split():
            raise ValueError(f"the trigger needs at least one word, got {value!r}")
        return " ".join(value.split())

    def placement(self, captions: list[str], rng: np.random.Generator) -> np.ndarray:
        words = np.array([len(c.split()) for c in captions], dtype=np.int64)
        if self.position == "start":
            return np.zeros(len(captions), np.int64)
        if self.position == "end":
            return words
        return rng.integers(0, words + 1) if len(captions) else np.zeros(0, np.int64)

    def apply(self, captions: list[str], positions: np.ndarray) -> list[str]:
        """Inserts the trigger before word ``positions[i]`` of caption i.

        Example:
            >>> PhraseTrigger(text="cf").apply(["a red circle", "a blue square"], np.array([0, 2]))
            ['cf a red circle', 'a blue cf square']
        """
        out = []
        for caption, at in zip(captions, positions):
            words = caption.split()
            out.append(" ".join([*words[: int(at)], self.text, *words[int(at):]]))
        return out
