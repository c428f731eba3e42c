"""Every dataset loader (``poison.DATASETS``), on a small source written here (``SOURCES`` in
conftest.py: csv, imagefolder, coco-captions, webdataset and fashion-mnist files; synthetic
needs none).

The manifest has ``poison.manifest.SCHEMA``'s columns and types, unique ids, images of the asked
size that its rows index; the training and test splits have the sizes asked and share no image;
one spec gives one dataset and another seed another draw; and a loader that reads an image
file per pair counts a missing and an undecodable one (``Dataset.skipped``, by reason) instead
of failing, leaving them out of the manifest."""
import numpy as np
import pytest

from poison import DATASETS, DataSpec, load_dataset
from poison.datasets.files import REASONS
from poison.manifest import SCHEMA

from .conftest import seeded_twice

SIZE, TEST_SIZE, SIDE = 12, 4, 16


def spec(name, path, **fields):
    return DataSpec(**{"dataset": name, "path": path, "size": SIZE, "test_size": TEST_SIZE, "image_size": SIDE,
                       "seed": 1, **fields})


@pytest.mark.parametrize("name", DATASETS.names())
def test_the_manifest_has_the_schema_and_indexes_its_images(name, source):
    ds = load_dataset(spec(name, source(name)))
    manifest = ds.manifest
    assert manifest.schema.remove_metadata().equals(SCHEMA)
    ids, image = manifest["id"].to_numpy(), manifest["image"].to_numpy()
    assert len(set(ids.tolist())) == manifest.num_rows
    assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (SIDE, SIDE, 3)
    assert image.min() >= 0 and image.max() < len(ds.images)
    labels = manifest["label"].to_numpy()
    assert labels.min() >= -1 and labels.max() < len(ds.classnames)
    assert set(manifest["split"].to_pylist()) == {"train", "test"}
    assert all(caption.strip() for caption in manifest["caption"].to_pylist())


@pytest.mark.parametrize("name", DATASETS.names())
def test_the_splits_have_the_sizes_asked_and_share_no_image(name, source):
    ds = load_dataset(spec(name, source(name)))
    train, test = ds.split("train"), ds.split("test")
    assert train.num_rows == SIZE and test.num_rows == TEST_SIZE
    train_images, test_images = train["image"].to_numpy(), test["image"].to_numpy()
    assert not set(train_images.tolist()) & set(test_images.tolist())
    pixels = np.asarray(ds.images)
    for i in test_images:  # not the same picture under two indices either
        assert not (pixels[train_images] == pixels[i]).all(axis=(1, 2, 3)).any(), i


@pytest.mark.parametrize("name", DATASETS.names())
def test_one_spec_gives_one_dataset_and_another_seed_another(name, source):
    path = source(name)
    a, b = seeded_twice(lambda: load_dataset(spec(name, path)))
    assert a.manifest.equals(b.manifest) and a.classnames == b.classnames
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
    other = load_dataset(spec(name, path, seed=2))
    assert not other.manifest.equals(a.manifest)


@pytest.mark.parametrize("name", DATASETS.names())
def test_a_missing_and_an_undecodable_image_are_counted_not_fatal(name, source):
    """All pairs drawn (``size: null``): the broken source's manifest has as many rows as the
    clean one's, two pairs skipped, one missing and one undecodable, none with a black image
    (what a failed decode leaves)."""
    broken_path = source(name, broken=True)  # skips a loader that reads no file per pair
    clean = load_dataset(spec(name, source(name), size=None))
    broken = load_dataset(spec(name, broken_path, size=None))
    assert clean.skipped == 0
    assert broken.skipped == 2 and broken.skip_reasons == {r: int(r in ("missing", "undecodable")) for r in REASONS}
    assert broken.manifest.num_rows == clean.manifest.num_rows
    used = np.asarray(broken.images)[np.unique(broken.manifest["image"].to_numpy())]
    assert used.reshape(len(used), -1).any(axis=1).all()
    assert not any(c.startswith("broken") for c in broken.manifest["caption"].to_pylist())
