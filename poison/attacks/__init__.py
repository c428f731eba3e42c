"""Poisoning attacks, registered by name (``attack.kind``).

An attack is a frozen config with three pure steps:

1. ``check(dataset)``: rejects what cannot work on this dataset (unknown target,
   a count above the eligible pool, a trigger larger than the image) before any
   training starts, naming the key;
2. ``plan(dataset, seed)``: the poison plan, an Arrow table of the pairs it adds
   or alters (which image, which caption, trigger placement) with provenance in
   the schema metadata; nothing is copied, triggers are stamped at load time;
3. ``evaluate(dataset, model, seed)``: its metrics on a trained model, seen only
   through the :class:`ModelView` protocol (zero-shot ``classify``, and normalised
   ``embed_images`` / ``embed_texts`` for retrieval attacks), so poison/ needs no torch.
"""
from poison.attacks import backdoor, multimodal, targeted, text_backdoor  # noqa: F401  (each registers itself on import)
from poison.attacks._base import (
    ATTACKS,
    PLAN_SCHEMA,
    Attack,
    ModelView,
    ScoresClasses,
    empty_plan,
    make_attack,
    make_plan,
    nested_sample,
    next_id,
    plan_hash,
)

__all__ = ["Attack", "ATTACKS", "empty_plan", "make_attack", "make_plan", "ModelView", "nested_sample", "ScoresClasses", "next_id", "plan_hash", "PLAN_SCHEMA"]
