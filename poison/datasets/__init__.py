"""Built-in datasets, registered by name (``data.dataset``)."""
from poison.datasets import coco, csv_pairs, fashion_mnist, imagefolder, shards, synthetic  # noqa: F401  (each registers itself on import)
from poison.datasets._base import DATASETS, DataConfig, DataError, DataSpec, ZeroshotConfig, load_dataset

__all__ = ["DataConfig", "DataError", "DATASETS", "DataSpec", "ZeroshotConfig", "load_dataset"]
