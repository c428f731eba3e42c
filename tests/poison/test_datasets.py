import re
from pathlib import Path

import numpy as np
import pytest

from poison import DATASETS, DataError, DataSpec, load_dataset
from poison.datasets import fashion_mnist, synthetic
from tests.support import write_idx


def test_synthetic_is_seeded_and_sized():
    a = load_dataset(DataSpec(size=300, test_size=30, seed=1))
    b = load_dataset(DataSpec(size=300, test_size=30, seed=1))
    c = load_dataset(DataSpec(size=300, test_size=30, seed=2))
    assert a.manifest.equals(b.manifest) and (a.images == b.images).all()
    assert not a.manifest.equals(c.manifest)
    assert a.num_train == 300 and a.split("test").num_rows == 30
    assert a.images.shape == (330, 32, 32, 3) and a.images.dtype == np.uint8
    assert a.manifest.column_names == ["id", "image", "caption", "label", "split"]


def test_synthetic_captions_are_compositional_and_match_the_label():
    ds = load_dataset(DataSpec(size=2000, seed=0))
    captions, labels = ds.manifest["caption"].to_pylist(), ds.manifest["label"].to_pylist()
    assert len(set(captions)) > 500  # diverse: not one template per class
    for caption, label in zip(captions[:200], labels[:200]):
        colour, shape = ds.classnames[label].split()
        assert colour in caption and shape in caption
    assert len(set(labels)) == 24


def test_synthetic_images_show_the_object_colour():
    ds = load_dataset(DataSpec(size=200, seed=0))
    for i in range(20):
        colour = ds.classnames[ds.manifest["label"][i].as_py()].split()[0]
        rgb = np.array(synthetic.COLOURS[colour])
        close = np.abs(ds.images[i].astype(int) - rgb).max(axis=2) < 45
        assert close.sum() >= 12, (i, colour)


def test_images_are_cached_as_a_memory_map(tmp_path):
    spec = DataSpec(size=50, seed=0, cache_dir=str(tmp_path))
    first = np.array(load_dataset(spec).images)
    files = list((tmp_path / "images").glob("*.npy"))
    assert len(files) == 1
    again = load_dataset(spec).images
    assert isinstance(again, np.memmap) and (np.asarray(again) == first).all()
    del again
    broken = files[0].with_suffix(".broken")
    broken.write_bytes(b"garbage")
    broken.replace(files[0])  # a corrupt entry is rebuilt, never used
    assert (np.asarray(load_dataset(spec).images) == first).all()


@pytest.fixture
def tiny_idx(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_fashion_mnist_reads_idx_files(tiny_idx):
    ds = load_dataset(DataSpec(dataset="fashion-mnist", path=str(tiny_idx), size=None))
    assert ds.num_train == 30 and ds.split("test").num_rows == 10
    assert ds.images.shape == (40, 32, 32, 3)
    assert ds.manifest["label"].to_pylist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    raw = fashion_mnist.read_idx(tiny_idx / "train-images-idx3-ubyte.gz")
    native = load_dataset(DataSpec(dataset="fashion-mnist", path=str(tiny_idx), size=None, image_size=28))
    assert (native.images[:30, :, :, 0] == raw).all()  # no resize at 28 px: exact pixels


def test_fashion_mnist_missing_files_give_the_install_hint(tmp_path):
    with pytest.raises(DataError, match=r"data.path: .*train-images-idx3-ubyte\[.gz\] not found; install it with "
                                        r"`apt-get install dataset-fashion-mnist`"):
        load_dataset(DataSpec(dataset="fashion-mnist", path=str(tmp_path)))


def test_fashion_mnist_size_above_the_data_is_rejected(tiny_idx):
    with pytest.raises(DataError, match="data.size: 31 is not between 1 and the 30 pairs"):
        load_dataset(DataSpec(dataset="fashion-mnist", path=str(tiny_idx), size=31))


@pytest.mark.skipif(not Path(fashion_mnist.DEFAULT_PATH).is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package():
    ds = load_dataset(DataSpec(dataset="fashion-mnist", size=None))
    assert ds.num_train == 60000 and ds.split("test").num_rows == 10000
    assert sorted(set(ds.manifest["label"].to_pylist())) == list(range(10))


def test_an_unknown_dataset_names_the_registered_ones():
    with pytest.raises(KeyError, match=re.escape(f"unknown dataset 'cifar'; valid: {', '.join(DATASETS.names())}")):
        DATASETS.get("cifar")
