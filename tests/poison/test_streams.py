"""The table of random streams: no two uses of a seed share a stream, and every use is in the table."""
from __future__ import annotations

import ast
import itertools
from pathlib import Path

import numpy as np
import pytest

from poison import streams

ROOT = Path(__file__).resolve().parents[2]


def _padded(key: tuple[int, ...]) -> tuple[int, ...]:
    """A SeedSequence's view of an entropy suffix: trailing zeros change nothing."""
    while key and key[-1] == 0:
        key = key[:-1]
    return key


def test_no_two_streams_share_a_key():
    keys = {name: _padded(s.key) for name, s in streams.TABLE.items()}
    same = [(a, b) for a, b in itertools.combinations(keys, 2) if keys[a] == keys[b]]
    assert not same, same


def test_an_indexed_streams_key_is_no_other_streams_key_or_prefix():
    """``[seed, 22, epoch]`` at epoch 0 is ``[seed, 22]``, and at epoch 7 ``[seed, 22, 7]``: no
    other stream may be either (the image-folder captions were ``[seed, 22]``)."""
    clashes = [(a, b) for (a, s), (b, t) in itertools.permutations(streams.TABLE.items(), 2)
               if s.index is not None and _padded(t.key)[:len(s.key)] == s.key
               and len(_padded(t.key)) <= len(s.key) + 1]
    assert not clashes, clashes


def test_every_streams_first_draws_differ_from_every_others():
    """Drawn for real: every stream at seeds 0-2 (indexed ones at indices 0-2) starts differently
    from every other stream, seed and index."""
    draws = {}
    for (name, stream), seed in itertools.product(streams.TABLE.items(), range(3)):
        for index in (range(3) if stream.index else (None,)):
            draws[(name, seed, index)] = tuple(streams.rng(seed, stream, index).integers(2**63, size=4))
    twins = [k for k, v in draws.items() if list(draws.values()).count(v) > 1]
    assert not twins, twins


def test_the_two_collisions_are_gone():
    """The file loaders' trusted split drew the training loop's batch order, and the image
    folders' captions the first post-training defense epoch's batch order."""
    assert streams.FILES_TRUSTED.key != streams.BATCHES.key
    assert _padded(streams.IMAGEFOLDER_CAPTIONS.key) != streams.DEFENSE_BATCHES.key
    first = streams.rng(5, streams.FILES_TRUSTED).permutation(100)
    assert not np.array_equal(first, streams.rng(5, streams.BATCHES).permutation(100))
    captions = streams.rng(5, streams.IMAGEFOLDER_CAPTIONS).integers(2**63, size=4)
    assert not np.array_equal(captions, streams.rng(5, streams.DEFENSE_BATCHES, 0).integers(2**63, size=4))


def test_an_index_is_given_exactly_to_an_indexed_stream():
    with pytest.raises(TypeError, match="takes an index"):
        streams.rng(0, streams.DEFENSE_BATCHES)
    with pytest.raises(TypeError, match="takes no index"):
        streams.rng(0, streams.BATCHES, 3)


def _seeded_generators(path: Path) -> list[str]:
    """Calls of ``default_rng``/``SeedSequence`` whose argument is a list or tuple: a stream
    built by hand rather than taken from the table."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], (ast.List, ast.Tuple)):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"default_rng", "SeedSequence"}:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_code_builds_a_stream_outside_the_table():
    files = [f for package in ("poison", "trainers", "sweeps") for f in (ROOT / package).rglob("*.py")
             if f != ROOT / "poison" / "streams.py"]
    assert len(files) > 20
    found = [hit for f in files for hit in _seeded_generators(f)]
    assert not found, found
    assert _seeded_generators(ROOT / "poison" / "streams.py")  # the scan sees the form it looks for
