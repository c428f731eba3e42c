"""Bad data files: one line naming the file and the entry; image paths that leave the dataset's
folder refused unless allowed; images too large for the run skipped before they are decoded;
every image mode Pillow reads converted to the right RGB."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from poison import DataError, DataSpec, load_dataset
from poison.datasets import files
from poison.datasets.shards import expand_braces, shard_paths
from tests.support import COLOURS, backdoor, mean_colour, write_image

# -- COCO JSON entries ------------------------------------------------------------------------

def _karpathy(tmp_path, images):
    write_image(tmp_path / "img" / "a.jpg", COLOURS["red"])
    good = {"filepath": "img", "filename": "a.jpg", "split": "train", "sentences": [{"raw": "a red thing"}]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": [good, *images]}))
    return path


@pytest.mark.parametrize("entry, message", [
    ("a.jpg", "images[1] is a JSON string, not an object"),
    ({"filepath": "img", "split": "train", "sentences": []}, "images[1] has no 'filename'"),
    ({"filename": 7, "sentences": []}, "images[1].filename is a JSON number, not a file name"),
    ({"filename": "a.jpg", "sentences": "a red thing"}, "images[1].sentences is a JSON string, not a list"),
    ({"filename": "a.jpg", "sentences": ["a red thing"]}, "images[1].sentences[0] is a JSON string, not an object"),
    ({"filename": "a.jpg", "sentences": [{"raw": 3}]}, "images[1].sentences[0].raw is a JSON number, not a string"),
    ({"filename": "a.jpg", "sentences": [{"tokens": "a red"}]}, "images[1].sentences[0].tokens is not a list of strings"),
])
def test_a_malformed_karpathy_entry_is_named(tmp_path, entry, message):
    path = _karpathy(tmp_path, [entry])
    with pytest.raises(DataError, match=re.escape(f"data.path: {path}: {message}")):
        load_dataset(DataSpec(dataset="coco-captions", path=str(path), size=None, image_size=8))


@pytest.mark.parametrize("images, annotations, message", [
    ([{"id": 1, "file_name": "a.jpg"}], [["a red thing"]], "annotations[0] is a JSON array, not an object"),
    ([{"id": 1, "file_name": "a.jpg"}], [{"image_id": 1, "caption": {"en": "x"}}],
     "annotations[0].caption is a JSON object, not a string"),
    ([{"id": 1}], [{"image_id": 1, "caption": "a red thing"}], "images[0] has no 'file_name'"),
    ([None], [], "images[0] is a JSON null, not an object"),
])
def test_a_malformed_coco_entry_is_named(tmp_path, images, annotations, message):
    write_image(tmp_path / "a.jpg", COLOURS["red"])
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    with pytest.raises(DataError, match=re.escape(f"data.path: {path}: {message}")):
        load_dataset(DataSpec(dataset="coco-captions", path=str(path), size=None, image_size=8))


# -- WebDataset brace ranges ------------------------------------------------------------------

@pytest.mark.parametrize("pattern, message", [
    ("shards/{010..002}.tar", "the range {010..002} runs backwards"),
    ("shards/{0..99999999}.tar", "the range {0..99999999} names 100,000,000 shards"),
    ("shards/{}.tar", "empty braces {}"),
    ("shards/{a,,b}.tar", "an empty choice in {a,,b}"),
])
def test_a_malformed_brace_pattern_is_named(pattern, message):
    with pytest.raises(DataError, match=re.escape(f"data.path: {pattern}: {message}")):
        expand_braces(pattern)
    with pytest.raises(DataError, match=re.escape(message)):
        shard_paths(pattern)


# -- paths outside the dataset's folder -------------------------------------------------------

def _pairs(tmp_path, image_path: str):
    folder = tmp_path / "data"
    for i in range(6):
        write_image(folder / f"{i}.jpg", COLOURS["blue"], seed=i)
    rows = [f"{i}.jpg\tblue thing {i}" for i in range(6)] + [f"{image_path}\tred thing"]
    (folder / "pairs.tsv").write_text("\n".join(["filepath\tcaption", *rows]) + "\n")
    return folder / "pairs.tsv"


@pytest.mark.parametrize("kind", ["parent", "absolute", "link"])
def test_an_image_path_leaving_the_folder_is_refused_unless_allowed(tmp_path, kind):
    outside = write_image(tmp_path / "elsewhere" / "red.jpg", COLOURS["red"])
    if kind == "link":
        (tmp_path / "data").mkdir()
        os.symlink(outside, tmp_path / "data" / "red.jpg")
    given = {"parent": "../elsewhere/red.jpg", "absolute": str(outside), "link": "red.jpg"}[kind]
    tsv = _pairs(tmp_path, given)
    spec = {"dataset": "csv", "path": str(tsv), "size": None, "test_size": 2, "image_size": 8}
    with pytest.raises(DataError, match=r"data.outside_paths: 1 of the 7 drawn image paths leave .*/data "
                                        r"\(the first: .*red.jpg.*\); set data.outside_paths: allow"):
        load_dataset(DataSpec(**spec))
    ds = load_dataset(DataSpec(**spec, outside_paths="allow"))
    assert ds.skipped == 0 and "red thing" in ds.manifest["caption"].to_pylist()


def test_an_image_folder_link_out_of_it_is_refused(tmp_path):
    for c, colour in enumerate(("red", "blue")):
        for i in range(3):
            write_image(tmp_path / "shapes" / f"{colour}_thing" / f"{i}.png", COLOURS[colour], seed=10 * c + i)
    os.symlink(write_image(tmp_path / "secret.png", COLOURS["green"]), tmp_path / "shapes" / "red_thing" / "x.png")
    spec = {"dataset": "imagefolder", "path": str(tmp_path / "shapes"), "size": None, "test_size": 2, "image_size": 8}
    with pytest.raises(DataError, match=r"data.outside_paths: 1 of the 7 .*x.png -> .*secret.png"):
        load_dataset(DataSpec(**spec))
    assert load_dataset(DataSpec(**spec, outside_paths="allow")).manifest.num_rows == 7


def test_the_policy_does_not_key_the_trained_model():
    from trainers.cache import model_key
    from trainers.config import parse_trial_config

    refuse = parse_trial_config({"data": {"dataset": "csv", "path": "/d/p.tsv"}})
    allow = parse_trial_config({"data": {"dataset": "csv", "path": "/d/p.tsv", "outside_paths": "allow"}})
    assert refuse != allow and model_key(refuse) == model_key(allow)


# -- sizes ------------------------------------------------------------------------------------

def test_an_image_too_large_for_the_run_is_skipped_before_it_is_decoded(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "MIN_MAX_SIDE", 64)  # max_side(8) = max(64 x 8, 64) = 512 px
    folder = tmp_path / "data"
    for i in range(6):
        write_image(folder / f"{i}.png", COLOURS["blue"], seed=i)
    Image.new("RGB", (513, 4), (255, 0, 0)).save(folder / "wide.png")   # one pixel too wide
    Image.new("RGB", (512, 4), (255, 0, 0)).save(folder / "edge.png")   # exactly the limit
    (folder / "huge.png").write_bytes(b"\x89PNG" + bytes(files.max_bytes(8)))  # more bytes than allowed
    rows = [f"{i}.png\tblue thing {i}" for i in range(6)] + ["wide.png\twide", "edge.png\tedge", "huge.png\thuge"]
    (folder / "pairs.tsv").write_text("\n".join(["filepath\tcaption", *rows]) + "\n")
    ds = load_dataset(DataSpec(dataset="csv", path=str(folder / "pairs.tsv"), size=None, test_size=2, image_size=8))
    assert ds.skip_reasons["too_large"] == 2 and ds.skipped == 2
    assert "edge" in ds.manifest["caption"].to_pylist()


# -- image modes ------------------------------------------------------------------------------

def _encoded(image: Image.Image, fmt: str) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    buffer.seek(0)
    return buffer


RED = (200, 40, 30)
MODES = {  # an image of each mode Pillow reads, and the RGB it must decode to
    "RGB": (Image.new("RGB", (8, 8), RED), "PNG", RED),
    "RGBA": (Image.new("RGBA", (8, 8), (*RED, 255)), "PNG", RED),
    "LA": (Image.new("LA", (8, 8), (90, 255)), "PNG", (90, 90, 90)),
    "L": (Image.new("L", (8, 8), 90), "PNG", (90, 90, 90)),
    "1": (Image.new("1", (8, 8), 1), "PNG", (255, 255, 255)),
    "P": (Image.new("RGB", (8, 8), RED).convert("P", palette=Image.Palette.ADAPTIVE), "PNG", RED),
    "CMYK": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
    "I;16": (Image.fromarray(np.full((8, 8), 65535, np.uint16)), "PNG", (255, 255, 255)),
    "I;16 mid": (Image.fromarray(np.full((8, 8), 16384, np.uint16)), "PNG", (64, 64, 64)),
    "I": (Image.fromarray(np.full((8, 8), 32768, np.int32)), "TIFF", (128, 128, 128)),
    "F": (Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF", (128, 128, 128)),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_image_mode_decodes_to_its_rgb(mode):
    image, fmt, expected = MODES[mode]
    decoded = files.decode(_encoded(image, fmt), 8)
    assert decoded.shape == (8, 8, 3)
    assert np.abs(mean_colour(decoded) - np.array(expected)).max() <= 3, (mode, mean_colour(decoded))


# -- temporary files --------------------------------------------------------------------------

def test_a_failed_write_leaves_the_last_state_and_no_temporary_file(tmp_path, monkeypatch):
    """A loop state, a launch file and a decoded-image cache whose writing fails (here: the disk
    full) leave what was there before and no temporary file beside it."""
    import torch

    from sweeps.config import validate_config
    from sweeps.tracking import Launch
    from trainers.resume import read_state, write_state

    write_state(tmp_path / "state", {"model": {"w": torch.ones(2)}, "epoch": 1})
    launch = Launch("l", "e", "r", "sqlite:///x", validate_config({"name": "l", "attack": backdoor()}, check_data=False).to_yaml())
    launch.write(tmp_path / "launch")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def half_written(obj, target):  # torch.save filling the disk half-way through its file
        with open(target, "wb") if isinstance(target, (str, Path)) else contextlib.nullcontext(target) as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        disk_full()

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="No space"):
        write_state(tmp_path / "state", {"model": {"w": torch.zeros(2)}, "epoch": 2})
    monkeypatch.setattr(os, "replace", disk_full)  # the rename fails (another file system, say)
    monkeypatch.setattr(Path, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        Launch("l2", "e", "r", "sqlite:///x", "").write(tmp_path / "launch")
    monkeypatch.undo()
    state = read_state(tmp_path / "state")
    assert state["epoch"] == 1 and state["model"]["w"].tolist() == [1.0, 1.0]
    assert Launch.read(tmp_path / "launch").run_name == "l"

    folder = tmp_path / "data"  # the image cache: decoding fails half-way
    for i in range(6):
        write_image(folder / f"{i}.png", COLOURS["blue"], seed=i)
    (folder / "pairs.tsv").write_text("\n".join(["filepath\tcaption", *(f"{i}.png\tthing {i}" for i in range(6))]))
    monkeypatch.setattr(files, "_decode_all", disk_full)
    spec = DataSpec(dataset="csv", path=str(folder / "pairs.tsv"), size=None, test_size=2, image_size=8,
                    cache_dir=str(tmp_path / "cache"))
    with pytest.raises(OSError, match="No space"):
        load_dataset(spec)
    left = [p.name for p in tmp_path.rglob("*") if p.is_file() and ".tmp" in p.name]
    assert left == []
