"""The base of ``poison.datasets``: what every plug-in imports (the package's ``__init__`` imports
the plug-ins, which register themselves), and the one schema of a trial's data.

The data is described at two levels, one model extending the other:

* :class:`DataConfig` is the YAML ``data:`` section, validated where it is read (the dataset
  registered, columns only for csv, classes from one source, sizes of at least 1);
  :class:`ZeroshotConfig` is its ``data.zeroshot``.
* :class:`DataSpec` is what the loaders take: a ``DataConfig`` plus the values a run supplies
  rather than its ``data:`` section (the trial's ``seed``, the node's ``cache_dir``, a
  ``trusted`` split a defense asks for). :meth:`DataConfig.spec` is the one way from the first
  to the second; a ``DataSpec`` may also be built directly (tests, benchmarks).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from poison.config import KEYED_WHEN_SET, POLICY, ConfigError, Section
from poison.manifest import Dataset
from poison.registry import Registry

DATASETS: Registry = Registry("dataset")


class DataError(ValueError):
    """A dataset that cannot be loaded as configured (missing files, bad sizes)."""


def registered_dataset(value: str) -> str:
    if value not in DATASETS:
        raise ValueError(f"unknown dataset {value!r}; valid: {', '.join(DATASETS.names())}")
    return value


class ZeroshotConfig(Section):
    """``data.zeroshot``: a labelled dataset whose test images and classes measure utility and
    attack success, while the training pairs come from ``data`` (``poison.datasets.zeroshot``).

    Attributes:
        dataset: its registered name.
        path: where its files are (``None``: the dataset's default location).
        size: its test images (``None``: the dataset's own test split, or its default).
    """

    dataset: str
    path: str | None = None
    size: int | None = Field(None, ge=1)

    _registered = field_validator("dataset")(classmethod(lambda cls, value: registered_dataset(value)))

    def spec(self, of: DataSpec) -> DataSpec:
        """The spec loading this dataset's test split at ``of``'s image size, seed and cache (its
        training pairs are unused: one is drawn)."""
        return DataSpec(dataset=self.dataset, path=self.path, size=1, test_size=self.size,
                        image_size=of.image_size, seed=of.seed, cache_dir=of.cache_dir, outside_paths=of.outside_paths)


class DataConfig(Section):
    """The ``data:`` section: what determines a trial's dataset, less what the run supplies.

    Attributes:
        dataset: registered name, e.g. ``"synthetic"`` or ``"fashion-mnist"``.
        path: where the files are (``None``: the dataset's default location).
        size: training pairs to use (``None``: all the dataset has).
        test_size: test pairs to use (``None``: the dataset's default).
        image_size: side of the square images, in pixels.
        image_column, caption_column: csv only: the header's names of the image-path and
            caption columns (``None``: the first of the usual names the file has,
            ``poison.datasets.csv_pairs.IMAGE_COLUMNS``/``CAPTION_COLUMNS``).
        zeroshot: when set, the dataset whose test split, classes and templates replace
            this one's (``poison.datasets.zeroshot``): train on web pairs (e.g. CC3M),
            classify zero-shot on a labelled set (e.g. ImageNet classes).
        classes: when set, zero-shot classes for pairs that have none of their own (csv,
            webdataset, coco-captions): each pair (training and test) takes the one class
            its caption names (``poison.datasets.zeroshot.caption_classes``), as Yang et al.
            pick COCO's captions and images "of a class".
        outside_paths: ``refuse`` (the default): a file dataset whose drawn image paths leave
            its folder (``../``, an absolute path, a symbolic link out of it) is refused in one
            line naming the first such path; ``allow`` reads them.

    The four optional keys enter cache keys only when set (``poison.config.KEYED_WHEN_SET``):
    the keys of caches made before they existed stay valid.
    """

    dataset: str = "synthetic"
    path: str | None = None
    size: int | None = Field(20000, ge=1)
    test_size: int | None = Field(None, ge=1)
    image_size: int = Field(32, ge=8)
    image_column: Annotated[str | None, KEYED_WHEN_SET] = Field(None, min_length=1)
    caption_column: Annotated[str | None, KEYED_WHEN_SET] = Field(None, min_length=1)
    zeroshot: Annotated[ZeroshotConfig | None, KEYED_WHEN_SET] = None
    classes: Annotated[list[str] | None, KEYED_WHEN_SET] = Field(None, min_length=2)
    outside_paths: Annotated[Literal["refuse", "allow"], POLICY] = "refuse"

    _registered = field_validator("dataset")(classmethod(lambda cls, value: registered_dataset(value)))

    @model_validator(mode="after")
    def _one_source_of_classes(self) -> DataConfig:
        if self.classes is not None and self.zeroshot is not None:
            raise ConfigError("data.classes: the classes come from data.zeroshot's dataset; give one of the two")
        return self

    @model_validator(mode="after")
    def _columns_only_for_csv(self) -> DataConfig:
        for key in ("image_column", "caption_column"):
            if getattr(self, key) is not None and self.dataset != "csv":
                raise ConfigError(f"data.{key}: only the csv dataset reads named columns, not {self.dataset}")
        return self

    def spec(self, seed: int, cache_dir: str | None = None, trusted: int | None = None) -> DataSpec:
        """The loaders' spec of this section with the run's values (see :class:`DataSpec`)."""
        return DataSpec(**{**dict(self), "seed": seed, "cache_dir": cache_dir, "trusted": trusted})


class DataSpec(DataConfig):
    """What determines a dataset's manifest and images: the ``data:`` section plus the run's values.

    Attributes:
        seed: seed of every random choice in generation and subsetting (the trial's ``seed``).
        cache_dir: where decoded images are cached (``None``: no cache).
        trusted: when set, the training split is instead this many *trusted* pairs,
            disjoint from the ``size`` training pairs the spec gives otherwise (the clean
            data of defenses: a filter's reference model, clean fine-tuning). Each
            dataset says how it keeps them apart (a loader that can sets ``TRUSTED``;
            others refuse); ``Dataset.trusted_capacity`` says how many it has.
    """

    seed: int = 0
    cache_dir: str | None = None
    trusted: int | None = None

    def cache_file(self, **extra: object) -> Path | None:
        from poison.manifest import cache_key

        if self.cache_dir is None:
            return None
        columns = [self.image_column, self.caption_column]
        key = cache_key(
            dataset=self.dataset, path=self.path, size=self.size, test_size=self.test_size,
            image_size=self.image_size, seed=self.seed, version=DATASETS.get(self.dataset).VERSION,
            **({"trusted": self.trusted} if self.trusted is not None else {}),
            **({"columns": columns} if columns != [None, None] else {}),
            **({"classes": list(self.classes)} if self.classes is not None else {}), **extra,
        )
        return Path(self.cache_dir) / "images" / f"{self.dataset}-{key}.npy"


MIN_ZEROSHOT_TEST = 10  # fewer test images than this in a zero-shot set is no evaluation


def load_dataset(spec: DataSpec) -> Dataset:
    """Loads the manifest of ``spec.dataset``; images are decoded lazily and cached."""
    if spec.zeroshot is not None:
        from poison.datasets.zeroshot import with_zeroshot

        train = load_dataset(spec.model_copy(update={"zeroshot": None}))
        try:
            test = load_dataset(spec.zeroshot.spec(spec))
        except DataError as err:  # its keys live under data.zeroshot (whose size is the test images)
            message = str(err).replace("data.test_size", "data.size", 1)
            raise DataError(f"data.zeroshot.{message[5:]}" if message.startswith("data.") else message) from None
        held = test.split("test").num_rows
        if spec.zeroshot.size is None and held < MIN_ZEROSHOT_TEST:  # a split drawn as 10% of nothing
            raise DataError(f"data.zeroshot.size: {test.name} has no test split of its own ({held} image drawn); "
                            "give the number of test images")
        return with_zeroshot(train, test)
    if spec.classes is not None:
        from poison.datasets.zeroshot import caption_classes

        return caption_classes(load_dataset(spec.model_copy(update={"classes": None})), list(spec.classes),
                               require=("train", "test") if spec.trusted is None else ())
    loader = DATASETS.get(spec.dataset)
    if spec.trusted is not None and not getattr(loader, "TRUSTED", False):  # never the training pairs again
        raise DataError(f"trusted split: {spec.dataset} cannot keep trusted pairs apart from its training pairs")
    return loader(spec)


__all__ = ["DataConfig", "DataError", "DATASETS", "DataSpec", "ZeroshotConfig", "load_dataset"]
