"""A trained model's cache key (``trainers.cache.model_key``) follows the schema's markers: a
``SPEED_ONLY`` or ``POLICY`` field never changes it, every other field of the sections that determine the
model (the seed, ``data``, ``model``, ``train``) does. The fields are read from the schema, so
a field added later is checked too (one whose other valid value needs context goes in CONTEXT)."""
import types
import typing

import pytest

from poison.config import UNKEYED
from trainers.cache import model_key
from trainers.config import TrialConfig, parse_trial_config

SECTIONS = ("data", "model", "train")
# (the section's other values the change needs, the changed value) of the fields whose other
# valid values the annotation does not tell
CONTEXT = {
    "data.dataset": ({}, "fashion-mnist"),
    "data.path": ({}, "/data/elsewhere"),
    "data.image_column": ({"dataset": "csv"}, "img"),
    "data.caption_column": ({"dataset": "csv"}, "alt"),
    "data.zeroshot": ({"dataset": "csv"}, {"dataset": "fashion-mnist"}),
    "data.classes": ({"dataset": "csv"}, ["red", "blue"]),
    "data.image_size": ({}, 64),  # tiny-rn takes multiples of 32
    "model.arch": ({}, "tiny-vit"),
    "model.pretrained": ({}, "{tmp}/weights.pt"),
}


def _fields(speed_only: bool) -> list[str]:
    found = [f"{section}.{name}" for section in SECTIONS
             for name, field in TrialConfig.model_fields[section].annotation.model_fields.items()
             if any(m in field.metadata for m in UNKEYED) == speed_only]
    return found if speed_only else ["seed", *found]


def _other(path: str) -> object:
    """A valid value of ``path`` other than its default, from its annotation."""
    *section, name = path.split(".")
    owner = TrialConfig.model_fields[section[0]].annotation if section else TrialConfig
    field = owner.model_fields[name]
    union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
    for kind in typing.get_args(field.annotation) if union else [field.annotation]:
        if typing.get_origin(kind) is typing.Literal:
            choices = [c for c in typing.get_args(kind) if c != field.default]
            if choices:
                return choices[0]
        elif kind in (int, float):
            return field.default * 2 if isinstance(field.default, kind) and field.default else kind(2)
    raise AssertionError(f"{path}: no other value known; add one to CONTEXT")


def _changed(path: str, tmp_path) -> tuple[TrialConfig, TrialConfig]:
    """The default trial (with the context ``path`` needs) and the same with ``path`` changed."""
    context, value = CONTEXT[path] if path in CONTEXT else ({}, _other(path))
    if isinstance(value, str) and value.startswith("{tmp}"):
        value = value.format(tmp=tmp_path)
        (tmp_path / "weights.pt").write_bytes(b"")
    if path == "seed":
        return parse_trial_config({}), parse_trial_config({"seed": value})
    section, name = path.split(".")
    return (parse_trial_config({section: context}),
            parse_trial_config({section: {**context, name: value}}))


def test_some_fields_are_marked_speed_only():
    assert _fields(speed_only=True)


@pytest.mark.parametrize("path", _fields(speed_only=True))
def test_a_speed_only_field_leaves_the_model_key_unchanged(path, tmp_path):
    before, after = _changed(path, tmp_path)
    assert before != after
    assert model_key(before) == model_key(after)


@pytest.mark.parametrize("path", _fields(speed_only=False))
def test_every_other_field_changes_the_model_key(path, tmp_path):
    before, after = _changed(path, tmp_path)
    assert model_key(before) != model_key(after)
