"""What the contract suites share: plug-in configs made from a registry's names, tiny training,
and small source files for the dataset loaders.

Every suite is parametrized over a registry's names read at collection time, so a newly
registered plug-in is tested with no edit here. A plug-in is built from its defaults; a
field it requires is filled by the field's *name* (``REQUIRED``: a class of the dataset for
``target``, a registered kind for a field named after a registry, as ``trigger``), never by
the plug-in's name. Two things do need an edit here, and their cases fail, saying so, until
they get it: a required field of a new name, and a loader of a new file format (a small source
of it in ``SOURCES``).
"""
from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import numpy as np
import pytest
from PIL import Image

from poison.config import make_registered
from poison.manifest import Dataset
from poison.registry import Registry

# -- plug-in configs from a registry ----------------------------------------------------------


def variants(registry: Registry) -> list:
    """``pytest.param(name, overrides)`` for every registered name: its defaults, then each other
    value of each ``Literal`` or ``bool`` field, one field at a time; a field named after a
    registry (``attack.trigger``: a kind of the registry ``trigger``) takes each variant of that
    registry in turn."""
    cases = []
    for name in registry.names():
        cases.append(pytest.param(name, {}, id=name))
        for field, info in registry.get(name).model_fields.items():
            for value in _alternatives(field, info):
                cases.append(pytest.param(name, {field: value}, id=f"{name}:{field}={_shown(value)}"))
    return cases


def _alternatives(field: str, info: Any) -> list:
    if field == "kind":
        return []
    nested = Registry.find(field)
    if nested is not None:
        default = nested.names()[0] if info.is_required() else info.get_default(call_default_factory=True).kind
        values = [{"kind": kind, **overrides} for kind, overrides in (case.values for case in variants(nested))]
        return [v for v in values if v != {"kind": default}]
    if info.annotation is bool:
        return [not info.default]
    if get_origin(info.annotation) is Literal:
        return [v for v in get_args(info.annotation) if v != info.default]
    return []


def _shown(value: Any) -> str:
    if not isinstance(value, dict):
        return str(value)
    rest = ",".join(f"{k}={_shown(v)}" for k, v in value.items() if k != "kind")
    return f"{value['kind']}({rest})" if rest else value["kind"]


def populated_classes(dataset: Dataset) -> list[str]:
    """The dataset's classes with training and test pairs, the most training pairs first."""
    labels = {s: dataset.split(s)["label"].to_numpy() for s in ("train", "test")}
    counts = {s: np.bincount(v[v >= 0], minlength=len(dataset.classnames)) for s, v in labels.items()}
    order = sorted(range(len(dataset.classnames)), key=lambda c: (-counts["train"][c], c))
    return [dataset.classnames[c] for c in order if counts["train"][c] and counts["test"][c]]


#: A value for each required field a plug-in may have, by the field's name, from the dataset.
REQUIRED: dict[str, Callable[[list[str]], Any]] = {
    "target": lambda classes: classes[0],
    "source": lambda classes: classes[1],
    "goals": lambda classes: [{"source": classes[1], "target": classes[0]},
                              {"source": classes[2], "target": classes[3]}],
}


def build(registry: Registry, name: str, overrides: dict | None = None, dataset: Dataset | None = None,
          **fixed: Any) -> Any:
    """The plug-in ``name`` of ``registry``, validated as a config would be: its defaults, its
    required fields filled by name (see ``REQUIRED``), then ``fixed`` and ``overrides``."""
    data: dict[str, Any] = {"kind": name, **fixed, **(overrides or {})}
    classes = populated_classes(dataset) if dataset is not None else []
    for field, info in registry.get(name).model_fields.items():
        if field in data or not info.is_required():
            continue
        if Registry.find(field) is not None:
            data[field] = {"kind": Registry.find(field).names()[0]}
        elif field in REQUIRED and classes:
            data[field] = REQUIRED[field](classes)
        else:
            pytest.fail(f"{registry.kind} {name!r} requires {field!r}: give it an example value in "
                        f"REQUIRED of tests/contracts/conftest.py")
    return make_registered(registry, data, registry.kind)


def seeded_twice(make: Callable[[], Any]) -> tuple[Any, Any]:
    """``make()`` twice, numpy's and Python's global random state scrambled differently before
    each: a plug-in that draws from a global generator instead of its seed gives two results."""
    import random

    out = []
    for scramble in (11, 12):
        np.random.seed(scramble)
        random.seed(scramble)
        out.append(make())
    return out[0], out[1]


# -- tiny training ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_arch() -> str:
    """The architecture a trial trains by default (a bundled tiny one)."""
    from trainers import parse_trial_config

    return parse_trial_config({}).model.arch


def parameters(model: Any) -> dict:
    """A copy of ``model``'s parameters (not its buffers: BatchNorm's statistics move without a step)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def tower_changes(before: dict, after: dict) -> dict[str, bool]:
    """Whether any parameter of the image tower (open_clip's ``visual.*``) and any of the rest
    (text tower, projections, temperature) in ``before`` differs in the state dict ``after``."""
    changed = {"image": False, "text": False}
    for key, tensor in before.items():
        if not bool((tensor == after[key]).all()):
            changed["image" if key.startswith("visual.") else "text"] = True
    return changed


@dataclass
class Run:
    """What :func:`train_tiny` trained: the parameters before, the state dict after, the objective,
    the loop's result."""

    before: dict
    after: dict
    objective: Any
    fitted: Any


@pytest.fixture
def train_tiny(tiny_arch) -> Callable[..., Run]:
    """``train_tiny(defense, epochs=...)``: the trial's own loop (``trainers.loop.fit``) on the
    default tiny model, ``pairs`` clean synthetic pairs plus 8 poisoned ones, batches of 16 (an
    epoch takes a step per 16 clean pairs), minimising the objective ``defense`` gives;
    ``checkpointer`` and ``on_epoch`` go to the loop. Seeded: two calls with the same arguments
    train alike."""
    import torch

    from poison import load_dataset, streams
    from tests.support import backdoor
    from trainers import parse_trial_config
    from trainers.data import TrainingSet
    from trainers.loop import fit
    from trainers.models import build_model

    def run(defense: dict, *, epochs: int, pairs: int = 32, checkpointer: Any = None, on_epoch: Any = None,
            seed: int = 0) -> Run:
        config = parse_trial_config({
            "seed": seed, "data": {"size": pairs, "test_size": 8}, "model": {"arch": tiny_arch},
            "train": {"epochs": epochs, "batch_size": 16, "device": "cpu", "loader_threads": 0},
            "attack": backdoor(8), "defense": defense})
        dataset = load_dataset(config.data_spec())
        torch.manual_seed(seed)
        built = build_model(config.model.arch, None, device=torch.device("cpu"), image_size=config.data.image_size)
        data = TrainingSet(dataset, config.attack, config.attack.plan(dataset, seed), built.tokenize)
        before = parameters(built.model)
        objective = config.defense.objective(seed)
        fitted = fit(built, data, config, evaluate=dict, rng=streams.rng(seed, streams.BATCHES), on_epoch=on_epoch,
                     checkpointer=checkpointer, objective=objective)
        return Run(before, built.model.state_dict(), objective, fitted)

    return run


# -- small sources for the dataset loaders ------------------------------------------------------
# One builder per loader that reads files: ``build(folder, broken)`` writes 24 usable pairs of
# 4 colours (captions "a <colour> thing <i>"), and with ``broken`` also one pair whose image file
# is missing and one whose image does not decode (captions "broken ..."); it returns data.path.

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
PAIRS = 24


def _encoded(i: int, fmt: str = "PNG") -> bytes:
    colour = list(COLOURS.values())[i % 4]
    noise = np.random.default_rng(i).integers(-20, 21, (20, 26, 3))  # every image its own pixels
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def _caption(i: int) -> str:
    return f"a {list(COLOURS)[i % 4]} thing {i}"


UNDECODABLE = b"\x89PNG\r\n\x1a\n but then no image at all"


def _csv(folder: Path, broken: bool) -> str:
    lines = ["filepath\tcaption"]
    for i in range(PAIRS):
        (folder / f"{i}.png").write_bytes(_encoded(i))
        lines.append(f"{i}.png\t{_caption(i)}")
    if broken:
        (folder / "bad.png").write_bytes(UNDECODABLE)
        lines += ["gone.png\tbroken: missing", "bad.png\tbroken: undecodable"]
    (folder / "pairs.tsv").write_text("\n".join(lines) + "\n")
    return str(folder / "pairs.tsv")


def _imagefolder(folder: Path, broken: bool) -> str:
    for i in range(PAIRS):
        (folder / list(COLOURS)[i % 4]).mkdir(exist_ok=True)
        (folder / list(COLOURS)[i % 4] / f"{i}.png").write_bytes(_encoded(i))
    if broken:  # a folder lists only files that exist: a missing one is a dangling link
        (folder / "red" / "bad.png").write_bytes(UNDECODABLE)
        (folder / "red" / "gone.png").symlink_to(folder / "nowhere.png")
    return str(folder)


def _coco(folder: Path, broken: bool) -> str:
    """Karpathy's split file: 16 training images with two captions each, 8 test images."""
    images = []
    for i in range(PAIRS):
        (folder / "images").mkdir(exist_ok=True)
        (folder / "images" / f"{i}.png").write_bytes(_encoded(i))
        sentences = [{"raw": _caption(i)}] + ([{"raw": f"{_caption(i)}, again"}] if i < 16 else [])
        images.append({"filepath": "images", "filename": f"{i}.png", "split": "train" if i < 16 else "test",
                       "sentences": sentences})
    if broken:
        (folder / "images" / "bad.png").write_bytes(UNDECODABLE)
        images += [{"filepath": "images", "filename": n, "split": "train", "sentences": [{"raw": f"broken: {n}"}]}
                   for n in ("gone.png", "bad.png")]
    (folder / "dataset_coco.json").write_text(json.dumps({"images": images}))
    return str(folder / "dataset_coco.json")


def _webdataset(folder: Path, broken: bool) -> str:
    members = {}
    for i in range(PAIRS):
        members[f"{i:05d}.png"], members[f"{i:05d}.txt"] = _encoded(i), _caption(i).encode()
    if broken:  # a caption without its image; an image that does not decode
        members["00100.txt"] = b"broken: missing"
        members["00101.png"], members["00101.txt"] = UNDECODABLE, b"broken: undecodable"
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(folder)


def _idx(path: Path, array: np.ndarray) -> None:
    import gzip
    import struct

    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _fashion_mnist(folder: Path, broken: bool) -> str:
    """Fashion-MNIST's four IDX files, 40 training and 12 test images of random pixels."""
    if broken:
        pytest.skip("fashion-mnist reads four IDX files, no file per image to lose or corrupt")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 12)):
        _idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return str(folder)


def _generated(folder: Path, broken: bool) -> None:
    if broken:
        pytest.skip("synthetic generates its pairs: it reads no files")
    return None


#: data.path of a small source for each loader, by its registered name.
SOURCES: dict[str, Callable[[Path, bool], str | None]] = {
    "synthetic": _generated, "csv": _csv, "imagefolder": _imagefolder, "coco-captions": _coco,
    "webdataset": _webdataset, "fashion-mnist": _fashion_mnist,
}


@pytest.fixture
def source(tmp_path) -> Callable[..., str | None]:
    """``source(dataset, broken=False)``: the data.path of a small source for the loader."""
    def make(dataset: str, broken: bool = False) -> str | None:
        if dataset not in SOURCES:
            pytest.fail(f"no small source for the dataset {dataset!r}: add a builder to SOURCES in "
                        "tests/contracts/conftest.py")
        folder = tmp_path / ("broken" if broken else "clean")
        folder.mkdir(exist_ok=True)
        return SOURCES[dataset](folder, broken)

    return make

