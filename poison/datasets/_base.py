"""The base of ``poison.datasets``: what every plug-in imports (the package's ``__init__`` imports the plug-ins, which register themselves)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from poison.manifest import Dataset
from poison.registry import Registry

DATASETS: Registry = Registry("dataset")


class DataError(ValueError):
    """A dataset that cannot be loaded as configured (missing files, bad sizes)."""


@dataclass(frozen=True)
class DataSpec:
    """What determines a dataset's manifest and images.

    Attributes:
        dataset: registered name, e.g. ``"synthetic"`` or ``"fashion-mnist"``.
        path: where the files are (``None``: the dataset's default location).
        size: training pairs to use (``None``: all the dataset has).
        test_size: test pairs to use (``None``: the dataset's default).
        image_size: side of the square images, in pixels.
        seed: seed of every random choice in generation and subsetting.
        cache_dir: where decoded images are cached (``None``: no cache).
        trusted: when set, the training split is instead this many *trusted* pairs,
            disjoint from the ``size`` training pairs the spec gives otherwise (the clean
            data of defenses: a filter's reference model, clean fine-tuning). Each
            dataset says how it keeps them apart (a loader that can sets ``TRUSTED``;
            others refuse); ``Dataset.trusted_capacity`` says how many it has.
        columns: the names of the image-path and caption columns of a table of pairs
            (``csv``); ``None`` in either place: the loader finds it by its usual names.
        classes: when set, zero-shot classes for pairs that have none of their own: each
            pair (training and test) takes the one class its caption names
            (``poison.datasets.zeroshot.caption_classes``), as Yang et al. pick COCO's
            captions and images "of a class".
        zeroshot: when set, the dataset whose test split, classes and templates replace
            this one's (``poison.datasets.zeroshot``): train on web pairs, classify zero-shot
            on a labelled set. Its own ``size`` is irrelevant (its training pairs are unused).
    """

    dataset: str = "synthetic"
    path: str | None = None
    size: int | None = 20000
    test_size: int | None = None
    image_size: int = 32
    seed: int = 0
    cache_dir: str | None = None
    trusted: int | None = None
    columns: tuple[str | None, str | None] = (None, None)
    classes: tuple[str, ...] | None = None
    zeroshot: DataSpec | None = None

    def cache_file(self, **extra: object) -> Path | None:
        from poison.manifest import cache_key

        if self.cache_dir is None:
            return None
        key = cache_key(
            dataset=self.dataset, path=self.path, size=self.size, test_size=self.test_size,
            image_size=self.image_size, seed=self.seed, version=DATASETS.get(self.dataset).VERSION,
            **({"trusted": self.trusted} if self.trusted is not None else {}),
            **({"columns": list(self.columns)} if self.columns != (None, None) else {}),
            **({"classes": list(self.classes)} if self.classes is not None else {}), **extra,
        )
        return Path(self.cache_dir) / "images" / f"{self.dataset}-{key}.npy"


MIN_ZEROSHOT_TEST = 10  # fewer test images than this in a zero-shot set is no evaluation


def load_dataset(spec: DataSpec) -> Dataset:
    """Loads the manifest of ``spec.dataset``; images are decoded lazily and cached."""
    if spec.zeroshot is not None:
        from poison.datasets.zeroshot import with_zeroshot

        train = load_dataset(dataclasses.replace(spec, zeroshot=None))
        try:
            test = load_dataset(spec.zeroshot)
        except DataError as err:  # its keys live under data.zeroshot (whose size is the test images)
            message = str(err).replace("data.test_size", "data.size", 1)
            raise DataError(f"data.zeroshot.{message[5:]}" if message.startswith("data.") else message) from None
        held = test.split("test").num_rows
        if spec.zeroshot.test_size is None and held < MIN_ZEROSHOT_TEST:  # a split drawn as 10% of nothing
            raise DataError(f"data.zeroshot.size: {test.name} has no test split of its own ({held} image drawn); "
                            "give the number of test images")
        return with_zeroshot(train, test)
    if spec.classes is not None:
        from poison.datasets.zeroshot import caption_classes

        return caption_classes(load_dataset(dataclasses.replace(spec, classes=None)), list(spec.classes),
                               require=("train", "test") if spec.trusted is None else ())
    loader = DATASETS.get(spec.dataset)
    if spec.trusted is not None and not getattr(loader, "TRUSTED", False):  # never the training pairs again
        raise DataError(f"trusted split: {spec.dataset} cannot keep trusted pairs apart from its training pairs")
    return loader(spec)


__all__ = ["DataError", "DATASETS", "DataSpec", "load_dataset"]
