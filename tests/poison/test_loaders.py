"""The loaders of real files (csv, webdataset, coco-captions, imagefolder) on tiny files made here.

Every loader skips and counts a missing or undecodable image and an empty caption, before
the manifest exists: the exact kept and skipped counts are checked, and a poison plan drawn
afterwards refers only to kept pairs.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from poison import ConfigError, DataError, DataSpec, load_dataset, make_attack
from poison.datasets import files
from tests.support import COLOURS, backdoor, encoded_image, mean_colour, write_image


def _truncated(path: Path) -> Path:
    """A JPEG cut in half: its header opens, its pixels do not decode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encoded_image((90, 90, 90), seed=7)
    path.write_bytes(data[: len(data) // 2])
    return path


# -- csv -------------------------------------------------------------------------------------

@pytest.fixture
def tsv(tmp_path):
    """16 rows plus one malformed: 12 usable, 1 truncated JPEG, 1 missing file, 1 empty caption,
    1 file that is no image, 1 row with too many fields."""
    lines = ["filepath\tcaption"]
    for i in range(11):
        colour = list(COLOURS)[i % 4]
        write_image(tmp_path / "img" / f"{i}.{'png' if i % 2 else 'jpg'}", COLOURS[colour], seed=i)
        lines.append(f"img/{i}.{'png' if i % 2 else 'jpg'}\ta {colour} square number {i}")
    absolute = write_image(tmp_path / "elsewhere" / "abs.jpg", COLOURS["blue"])
    lines.append(f"{absolute}\tan absolute blue square")
    lines.append(f"{_truncated(tmp_path / 'img' / 'cut.jpg').relative_to(tmp_path)}\ta truncated file")
    lines.append("img/nowhere.jpg\ta missing file")
    write_image(tmp_path / "img" / "silent.jpg", COLOURS["red"])
    lines.append("img/silent.jpg\t   ")
    (tmp_path / "img" / "text.jpg").write_text("not an image")
    lines.append("img/text.jpg\ta text file called jpg")
    lines.append("img/0.jpg\ttoo\tmany fields")
    path = tmp_path / "pairs.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_keeps_the_usable_pairs_and_counts_the_rest(tsv):
    ds = load_dataset(DataSpec(dataset="csv", path=str(tsv), size=None, test_size=3, image_size=16, seed=0))
    assert ds.manifest.num_rows == 12 and ds.num_train + ds.split("test").num_rows == 12
    assert ds.skipped == 5
    assert ds.skip_reasons == {"empty_caption": 1, "missing": 1, "undecodable": 2, "malformed": 1, "too_large": 0}
    captions = set(ds.manifest["caption"].to_pylist())
    assert captions == {f"a {list(COLOURS)[i % 4]} square number {i}" for i in range(11)} | {"an absolute blue square"}
    assert ds.classnames == [] and set(ds.manifest["label"].to_pylist()) == {-1}
    assert ds.images.shape[1:] == (16, 16, 3) and ds.images.dtype == np.uint8
    for caption, image in zip(ds.manifest["caption"].to_pylist(), ds.manifest["image"].to_pylist()):
        colour = next(c for c in COLOURS if c in caption)
        assert np.abs(mean_colour(ds.images[image]) - COLOURS[colour]).max() < 12, caption


def test_csv_columns_are_recognised_by_name_and_separator_by_extension(tmp_path):
    for i in range(4):
        write_image(tmp_path / f"{i}.png", COLOURS["green"], seed=i)
    rows = [f'{i}.png,"green, number {i}"' for i in range(4)]
    (tmp_path / "pairs.csv").write_text("ID,Image,Title\n" + "\n".join(f"{i},{r}" for i, r in enumerate(rows)))
    ds = load_dataset(DataSpec(dataset="csv", path=str(tmp_path / "pairs.csv"), size=3, test_size=1, image_size=8))
    assert ds.manifest.num_rows == 4 and ds.skipped == 0
    assert sorted(ds.manifest["caption"].to_pylist()) == [f"green, number {i}" for i in range(4)]


def test_csv_columns_named_in_the_config(tmp_path):
    """``data.image_column``/``data.caption_column`` pick columns the usual names would not (or
    would pick wrongly: here ``caption`` is a photographer's credit, ``alt`` the description)."""
    from trainers.config import parse_trial_config

    for i in range(4):
        write_image(tmp_path / "shots" / f"{i}.png", COLOURS["green"], seed=i)
    (tmp_path / "pairs.tsv").write_text("shot\tcaption\talt\n" + "".join(
        f"shots/{i}.png\tphoto by someone\ta green square number {i}\n" for i in range(4)))
    data = {"dataset": "csv", "path": str(tmp_path / "pairs.tsv"), "size": 3, "test_size": 1, "image_size": 32,
            "image_column": "shot", "caption_column": "alt"}
    config = parse_trial_config({"data": data})
    ds = load_dataset(config.data_spec())
    assert sorted(ds.manifest["caption"].to_pylist()) == [f"a green square number {i}" for i in range(4)]
    assert ds.skipped == 0 and ds.images.shape == (4, 32, 32, 3)
    with pytest.raises(DataError, match=r"data.caption_column: .*pairs.tsv has no column 'Alt'; its columns: shot, caption, alt"):
        load_dataset(parse_trial_config({"data": {**data, "caption_column": "Alt"}}).data_spec())
    with pytest.raises(ConfigError, match="data.image_column: only the csv dataset reads named columns, not synthetic"):
        parse_trial_config({"data": {"image_column": "shot"}})
    # the columns are part of what a model is trained on: another caption column, another model
    from trainers.cache import model_key

    assert model_key(config) != model_key(parse_trial_config({"data": {**data, "caption_column": "caption"}}))


def test_csv_subsets_are_seeded(tsv):
    spec = DataSpec(dataset="csv", path=str(tsv), size=6, test_size=2, image_size=8, seed=1)
    a, b = load_dataset(spec), load_dataset(spec)
    assert a.manifest.equals(b.manifest) and a.skip_reasons == b.skip_reasons
    others = [load_dataset(DataSpec(dataset="csv", path=str(tsv), size=6, test_size=2, image_size=8, seed=s))
              for s in range(2, 6)]
    assert any(o.manifest["caption"].to_pylist() != a.manifest["caption"].to_pylist() for o in others)
    # size counts the pairs drawn: the skipped ones are not replaced
    assert a.num_train + sum(a.skip_reasons.values()) - _skipped_in_test(a) == 6


def _skipped_in_test(ds) -> int:
    return 2 - ds.split("test").num_rows


@pytest.mark.parametrize("attack", [
    backdoor(2),
    {"kind": "targeted", "target": "red", "poison_count": 2},
    {"kind": "text-backdoor", "target": "red", "poison_count": 2},
    {"kind": "mm-single-label", "source": "red", "target": "blue", "poison_count": 2},
], ids=lambda a: a["kind"])
def test_attacks_that_need_labels_refuse_unlabelled_data(tsv, attack):
    ds = load_dataset(DataSpec(dataset="csv", path=str(tsv), size=None, test_size=2, image_size=8))
    refusal = r"attack\.(target|source): csv has no class labels, and this attack needs them"
    with pytest.raises(ConfigError, match=refusal):
        make_attack(attack).plan(ds, 0)


def test_csv_bad_input_is_named_before_decoding(tmp_path, tsv, monkeypatch):
    monkeypatch.setattr(files, "decode", _must_not_decode)
    with pytest.raises(DataError, match=r"data.path: the csv dataset needs data.path \(a CSV or TSV file"):
        load_dataset(DataSpec(dataset="csv", path=None))
    with pytest.raises(DataError, match=r"data.path: .*/nope.tsv does not exist"):
        load_dataset(DataSpec(dataset="csv", path=str(tmp_path / "nope.tsv")))
    (tmp_path / "odd.csv").write_text("filepath,words,score\na.jpg,hello,1\n")
    with pytest.raises(DataError, match="no recognisable caption column .*; its columns: filepath, words, score"):
        load_dataset(DataSpec(dataset="csv", path=str(tmp_path / "odd.csv")))
    (tmp_path / "urls.csv").write_text("url,caption\nhttps://example.com/a.jpg,a dog\n")
    with pytest.raises(DataError, match="column 'url' of .* holds URLs"):
        load_dataset(DataSpec(dataset="csv", path=str(tmp_path / "urls.csv"), size=None, test_size=1))
    too_many = r"data.size: 20,000 exceeds the 15 training pairs of .*pairs.tsv; set data.size: null"
    with pytest.raises(DataError, match=too_many):
        load_dataset(DataSpec(dataset="csv", path=str(tsv), test_size=2))
    (tmp_path / "blank.csv").write_text("image,caption\na.jpg,\nb.jpg, \nc.jpg,\n")
    with pytest.raises(DataError, match=r"no usable pairs in .*blank.csv: none of its 3 images has a caption"):
        load_dataset(DataSpec(dataset="csv", path=str(tmp_path / "blank.csv"), size=None, test_size=1))


def _must_not_decode(*args, **kwargs):
    raise AssertionError("decoded an image before rejecting the input")


def test_nothing_decodable_is_an_error_naming_the_counts(tmp_path):
    (tmp_path / "gone.csv").write_text("image,caption\n" + "".join(f"{i}.jpg,pair {i}\n" for i in range(4)))
    with pytest.raises(DataError, match=r"no usable (train|test) pairs left .* \(skipped: 4 missing\)"):
        load_dataset(DataSpec(dataset="csv", path=str(tmp_path / "gone.csv"), size=None, test_size=1))


def test_decoded_images_are_cached_once_as_memory_maps(tsv, tmp_path, monkeypatch):
    spec = DataSpec(dataset="csv", path=str(tsv), size=None, test_size=2, image_size=16,
                    cache_dir=str(tmp_path / "cache"))
    first = load_dataset(spec)
    assert isinstance(first.images, np.memmap)
    pixels = np.array(first.images)
    assert len(list((tmp_path / "cache" / "images").glob("csv-*.status.npy"))) == 1
    monkeypatch.setattr(files, "decode", _must_not_decode)  # a second trial reads the cache
    again = load_dataset(spec)
    assert again.manifest.equals(first.manifest) and again.skip_reasons == first.skip_reasons
    assert (np.asarray(again.images) == pixels).all()
    monkeypatch.undo()
    cached = next(p for p in (tmp_path / "cache" / "images").glob("csv-*.npy") if ".status" not in p.name)
    broken = cached.with_suffix(".broken")
    broken.write_bytes(b"garbage")
    broken.replace(cached)  # a corrupt entry is rebuilt, never used (a new file: open maps stay valid)
    assert (np.asarray(load_dataset(spec).images) == pixels).all()


# -- webdataset ------------------------------------------------------------------------------

def _shard(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path):
    """Two shards: 7 complete samples, an image without caption, a caption without image,
    a truncated JPEG, a metadata-only key."""
    folder = tmp_path / "shards"
    first = {}
    for i in range(4):
        colour = list(COLOURS)[i]
        first[f"{i:05d}.jpg"] = encoded_image(COLOURS[colour], seed=i)
        first[f"{i:05d}.txt"] = f"a {colour} photo {i}".encode()
        first[f"{i:05d}.json"] = b"{}"
    first["00004.png"] = encoded_image(COLOURS["red"], "PNG")  # no caption
    first["00005.txt"] = b"a caption without its image"
    _shard(folder / "00000.tar", first)
    second = {"00006.json": b"{}"}
    for i in range(7, 10):
        second[f"{i:05d}.png"] = encoded_image(COLOURS["blue"], "PNG", seed=i)
        second[f"{i:05d}.txt"] = f"a blue photo {i}".encode()
    cut = encoded_image((90, 90, 90), seed=3)
    second["00010.jpg"], second["00010.txt"] = cut[: len(cut) // 2], b"a truncated photo"
    _shard(folder / "00001.tar", second)
    return folder


def test_webdataset_pairs_members_by_key_and_skips_the_incomplete(shards):
    ds = load_dataset(DataSpec(dataset="webdataset", path=str(shards), size=None, test_size=2, image_size=16))
    assert ds.manifest.num_rows == 7 and ds.skipped == 3
    assert ds.skip_reasons == {"empty_caption": 1, "missing": 1, "undecodable": 1, "malformed": 0, "too_large": 0}
    assert set(ds.manifest["caption"].to_pylist()) == (
        {f"a {c} photo {i}" for i, c in enumerate(COLOURS)} | {f"a blue photo {i}" for i in range(7, 10)})
    for caption, image in zip(ds.manifest["caption"].to_pylist(), ds.manifest["image"].to_pylist()):
        colour = next(c for c in COLOURS if c in caption)
        assert np.abs(mean_colour(ds.images[image]) - COLOURS[colour]).max() < 12, caption


def test_webdataset_shards_are_indexed_once_per_node(shards, tmp_path, monkeypatch):
    """With a cache folder each shard's tar headers are read once: a later load reads the
    cached samples (the same manifest); a shard that changes is read again."""
    from poison.datasets import shards as webdataset

    spec = DataSpec(dataset="webdataset", path=str(shards), size=None, test_size=2, image_size=16,
                    cache_dir=str(tmp_path / "cache"))
    plain = load_dataset(spec.model_copy(update={"cache_dir": None}))  # no cache: as before
    read: list[str] = []
    members = webdataset._members
    monkeypatch.setattr(webdataset, "_members", lambda shard: read.append(shard.name) or members(shard))
    first = load_dataset(spec)
    assert first.manifest.equals(plain.manifest)
    assert sorted(read) == ["00000.tar", "00001.tar"]
    again = load_dataset(spec)
    assert sorted(read) == ["00000.tar", "00001.tar"] and again.manifest.equals(first.manifest)
    assert again.skip_reasons == first.skip_reasons == {"empty_caption": 1, "missing": 1, "undecodable": 1,
                                                        "malformed": 0, "too_large": 0}
    _shard(shards / "00001.tar", {"00020.jpg": encoded_image(COLOURS["green"]), "00020.txt": b"a green photo 20"})
    changed = load_dataset(spec.model_copy(update={"test_size": 1}))
    assert sorted(read) == ["00000.tar", "00001.tar", "00001.tar"]  # only the rewritten shard again
    assert "a green photo 20" in changed.manifest["caption"].to_pylist()
    for cached in (tmp_path / "cache" / "webdataset-index").glob("*.arrow"):  # corrupt entries: read again
        cached.write_bytes(b"not arrow")
    assert load_dataset(spec.model_copy(update={"test_size": 1})).manifest.equals(changed.manifest)
    assert sorted(read) == ["00000.tar", "00000.tar", "00001.tar", "00001.tar", "00001.tar"]


def test_webdataset_paths_folder_file_brace_and_glob(shards):
    def captions(path: str) -> list[str]:
        spec = DataSpec(dataset="webdataset", path=path, size=None, test_size=2, image_size=8)
        return sorted(load_dataset(spec).manifest["caption"].to_pylist())

    every = captions(str(shards))
    assert captions(f"{shards}/{{00000..00001}}.tar") == every
    assert captions(f"{shards}/0000*.tar") == every
    assert len(captions(f"{shards}/00000.tar")) == 4
    with pytest.raises(DataError, match=r"data.path: 1 of the 3 shards of .* do not exist \(first: .*00002.tar\)"):
        load_dataset(DataSpec(dataset="webdataset", path=f"{shards}/{{00000..00002}}.tar"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DataSpec(dataset="webdataset", path=f"{shards}/nope-*.tar"))
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset(DataSpec(dataset="webdataset"))


def test_webdataset_header_reader_agrees_with_tarfile(shards, tmp_path, monkeypatch):
    from poison.datasets import shards as module

    long_name = "a-folder-name-long-enough-to-need-a-pax-header/" * 3
    pax = _shard(tmp_path / "pax.tar", {f"{long_name}0.jpg": encoded_image(COLOURS["red"]), f"{long_name}0.txt": b"red"})
    assert module._scan(pax) is None  # pax headers: read by tarfile
    assert [c for *_, c in module._samples(pax)] == ["red"]
    fast = {shard: module._members(shard) for shard in sorted(shards.glob("*.tar"))}
    monkeypatch.setattr(module, "_scan", lambda shard: None)
    assert {shard: module._members(shard) for shard in fast} == fast
    monkeypatch.undo()
    offset, size = fast[shards / "00001.tar"]["00010"]["jpg"]
    cut = tmp_path / "cut" / "00001.tar"
    cut.parent.mkdir()
    cut.write_bytes((shards / "00001.tar").read_bytes()[: offset + size // 2])  # cut inside the last image
    ds = load_dataset(DataSpec(dataset="webdataset", path=str(cut), size=None, test_size=1, image_size=8))
    assert ds.manifest.num_rows == 3 and ds.skipped == 1  # what was read is kept, the cut sample skipped


def test_webdataset_rejects_a_compressed_shard(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w:gz") as tar:
        info = tarfile.TarInfo("0.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DataError, match="s.tar is not an uncompressed tar shard"):
        load_dataset(DataSpec(dataset="webdataset", path=str(tmp_path / "s.tar")))


# -- coco-captions ---------------------------------------------------------------------------

@pytest.fixture
def karpathy(tmp_path):
    """5 training images (one restval, one missing) with 2 captions each (one empty),
    2 test images (the first one's first caption empty), 1 val image left out."""
    images = []
    for i, (split, colour) in enumerate([("train", "red"), ("train", "green"), ("train", "blue"),
                                         ("restval", "yellow"), ("train", "red"), ("test", "green"),
                                         ("test", "blue"), ("val", "red")]):
        name = f"COCO_{i:03d}.jpg"
        if i != 4:  # image 4 is missing
            write_image(tmp_path / "val2014" / name, COLOURS[colour], seed=i)
        sentences = [{"raw": f"a {colour} thing {i}"}, {"raw": f"the {colour} one, {i}"}]
        if i == 1:
            sentences[1]["raw"] = " "
        if i == 5:
            sentences = [{"raw": ""}, *sentences]
        images.append({"filepath": "val2014", "filename": name, "split": split, "sentences": sentences})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_coco_karpathy_split_pairs_every_caption_and_tests_one_per_image(karpathy):
    ds = load_dataset(DataSpec(dataset="coco-captions", path=str(karpathy), size=None, image_size=16))
    train, test = ds.split("train"), ds.split("test")
    assert train.num_rows == 7 and test.num_rows == 2  # 5 images x 2 - missing image's 2 - 1 empty
    assert ds.skip_reasons == {"empty_caption": 1, "missing": 2, "undecodable": 0, "malformed": 0, "too_large": 0}
    assert test["caption"].to_pylist() == ["a green thing 5", "a blue thing 6"]
    assert not any("thing 7" in c for c in ds.manifest["caption"].to_pylist())  # val is left out
    # captions of one image share its decoded image
    same = train.filter(pc.match_substring(train["caption"], "0"))
    assert same.num_rows == 2 and len(set(same["image"].to_pylist())) == 1
    assert ds.images.shape[0] == 7  # the images of the drawn pairs with captions, the missing one black
    assert load_dataset(DataSpec(dataset="coco-captions", path=str(karpathy.parent), size=None,
                                 image_size=16)).manifest.equals(ds.manifest)


def test_coco_captions_json_folders_and_single_files(tmp_path):
    notes = tmp_path / "annotations"
    for split, count in (("train2017", 4), ("val2017", 2)):
        images = [{"id": 100 + i, "file_name": f"{i:012d}.jpg"} for i in range(count)]
        annotations = [{"image_id": 100 + i, "id": j, "caption": f"{split} image {i} caption {j}"}
                       for i in range(count) for j in range(3)]
        for i in range(count):
            write_image(tmp_path / split / f"{i:012d}.jpg", COLOURS["red"], seed=i)
        notes.mkdir(exist_ok=True)
        (notes / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    ds = load_dataset(DataSpec(dataset="coco-captions", path=str(tmp_path), size=None, image_size=8))
    assert ds.num_train == 12 and ds.split("test").num_rows == 2 and ds.skipped == 0
    assert all(c.startswith("val2017") for c in ds.split("test")["caption"].to_pylist())
    single = load_dataset(DataSpec(dataset="coco-captions", path=str(notes / "captions_train2017.json"),
                                   size=None, test_size=1, image_size=8))
    assert single.num_train == 9 and single.split("test").num_rows == 1
    (tmp_path / "other.json").write_text(json.dumps({"things": []}))
    with pytest.raises(DataError, match="neither a Karpathy split file .* its keys: things"):
        load_dataset(DataSpec(dataset="coco-captions", path=str(tmp_path / "other.json")))


# -- imagefolder -----------------------------------------------------------------------------

def _folder(root: Path, per_class: int, *, seed: int = 0) -> Path:
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(per_class):
            write_image(root / f"{name}_thing" / f"{i}.{'png' if i % 3 == 0 else 'jpg'}", colour, seed=seed + 100 * c + i)
    return root


def test_imagefolder_labels_from_folders_and_captions_from_templates(tmp_path):
    root = _folder(tmp_path / "shapes", 5)
    _truncated(root / "red_thing" / "broken.jpg")
    (root / "red_thing" / "notes.txt").write_text("not an image, not counted")
    ds = load_dataset(DataSpec(dataset="imagefolder", path=str(root), size=None, test_size=4, image_size=16))
    assert ds.classnames == ["blue thing", "green thing", "red thing", "yellow thing"]
    assert ds.manifest.num_rows == 20 and ds.skip_reasons["undecodable"] == 1 and ds.skipped == 1
    for caption, label, image in zip(*(ds.manifest[k].to_pylist() for k in ("caption", "label", "image"))):
        name = ds.classnames[label]
        assert name in caption
        assert np.abs(mean_colour(ds.images[image]) - COLOURS[name.split()[0]]).max() < 12


def test_imagefolder_uses_its_own_train_and_val_folders(tmp_path):
    _folder(tmp_path / "train", 3)
    _folder(tmp_path / "val", 1, seed=50)
    ds = load_dataset(DataSpec(dataset="imagefolder", path=str(tmp_path), size=None, image_size=8))
    assert ds.num_train == 12 and ds.split("test").num_rows == 4
    assert sorted(ds.split("test")["label"].to_pylist()) == [0, 1, 2, 3]
    with pytest.raises(DataError, match="has no class subfolders with images"):
        load_dataset(DataSpec(dataset="imagefolder", path=str(tmp_path / "train" / "red_thing")))


def test_an_imagefolder_symlink_loop_is_one_error_naming_the_link(tmp_path):
    root = _folder(tmp_path / "shapes", 2)
    (root / "red_thing" / "more").mkdir()
    (root / "red_thing" / "more" / "again").symlink_to(root / "red_thing")  # red_thing/more/again/more/...
    (root / "blue_thing" / "alias").symlink_to(root / "green_thing")  # a link elsewhere: followed
    with pytest.raises(DataError) as info:
        load_dataset(DataSpec(dataset="imagefolder", path=str(root), size=None, test_size=2, image_size=8))
    assert str(info.value) == (f"data.path: {root / 'red_thing' / 'more' / 'again'} is a symbolic link loop "
                               f"(it points to {root / 'red_thing'}, which holds it); remove the link")
    (root / "red_thing" / "more" / "again").unlink()
    ds = load_dataset(DataSpec(dataset="imagefolder", path=str(root), size=None, test_size=2, image_size=8))
    assert ds.manifest.num_rows == 10  # 8 images, and green's 2 again under blue_thing/alias


def test_a_plan_drawn_after_skipping_uses_only_kept_pairs(tmp_path):
    root = _folder(tmp_path / "train", 6)
    _folder(tmp_path / "val", 1, seed=50)
    for name in COLOURS:
        _truncated(root / f"{name}_thing" / "cut.jpg")
    ds = load_dataset(DataSpec(dataset="imagefolder", path=str(tmp_path), size=None, image_size=16))
    assert ds.skipped == 4 and ds.num_train == 24
    attack = make_attack({**backdoor(18), "target": "red thing"})
    plan = attack.plan(ds, seed=0)  # every non-target training pair: the plan takes all of them
    train = ds.split("train")
    kept = dict(zip(train["id"].to_pylist(), train["image"].to_pylist()))
    assert plan.num_rows == 18 and set(plan["source_id"].to_pylist()) <= set(kept)
    assert all(kept[s] == i for s, i in zip(plan["source_id"].to_pylist(), plan["image"].to_pylist()))
    assert all(mean_colour(ds.images[i]).max() > 150 for i in plan["image"].to_pylist())  # decoded, not blank
    with pytest.raises(ConfigError, match="exceeds the 18 non-target training pairs"):
        make_attack({**backdoor(19), "target": "red thing"}).check(ds)


def test_a_trusted_split_shares_no_image_with_the_training_pairs(tmp_path):
    root = _folder(tmp_path / "shapes", 8)
    spec = DataSpec(dataset="imagefolder", path=str(root), size=12, test_size=4, image_size=8, seed=2)
    main = load_dataset(spec)
    assert main.trusted_capacity == 16
    trusted = load_dataset(spec.model_copy(update={"trusted": 10}))
    assert trusted.num_train == 10
    main_images = {main.images[i].tobytes() for i in main.split("train")["image"].to_pylist()}
    assert not main_images & {trusted.images[i].tobytes() for i in trusted.split("train")["image"].to_pylist()}
    with pytest.raises(DataError, match="trusted split: 17 pairs do not fit in the 16"):
        load_dataset(spec.model_copy(update={"trusted": 17}))


def test_a_short_trial_runs_on_an_imagefolder(tmp_path):
    from trainers import parse_trial_config, run_trial

    root = _folder(tmp_path / "shapes", 18)
    _truncated(root / "blue_thing" / "cut.jpg")
    config = parse_trial_config({
        "data": {"dataset": "imagefolder", "path": str(root), "size": 64, "test_size": 8, "image_size": 32},
        "model": {"arch": "tiny-rn"},
        "train": {"epochs": 40, "batch_size": 32, "threads": 1},
        "attack": {**backdoor(4), "target": "red thing"},
    })
    result = run_trial(config, cache_dir=str(tmp_path / "cache"), baseline=False)
    m = result.metrics
    # the model learns the folders' classes from the decoded images and their captions (zero-shot
    # top-1 on the 8 test images 1.0 at seeds 0-2 after 40 epochs of 2 steps; 0.38-0.63 after 20;
    # chance 1/4)
    assert m["zeroshot_top1"] >= 0.75 and m["poison_count"] == 4
    assert result.plan.num_rows == 4
    assert m["data_skipped"] == 1  # the truncated JPEG, counted in the trial's metrics


def test_an_image_replaced_under_the_same_name_is_decoded_again(tsv, tmp_path):
    spec = DataSpec(dataset="csv", path=str(tsv), size=None, test_size=2, image_size=16,
                    cache_dir=str(tmp_path / "cache"))
    first = load_dataset(spec)
    old, new = list(COLOURS)[2], list(COLOURS)[3]  # img/2.jpg's colour (the tsv fixture), and another
    row = first.manifest["caption"].to_pylist().index(f"a {old} square number 2")
    assert np.abs(mean_colour(first.images[first.manifest["image"][row].as_py()]) - COLOURS[old]).max() < 12
    write_image(tmp_path / "img" / "2.jpg", COLOURS[new], seed=2)  # same path, new picture, the csv untouched
    again = load_dataset(spec)
    assert np.abs(mean_colour(again.images[again.manifest["image"][row].as_py()]) - COLOURS[new]).max() < 12
    assert len([p for p in (tmp_path / "cache" / "images").glob("csv-*.npy") if ".status" not in p.name]) == 2
