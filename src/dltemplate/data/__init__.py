"""Datasets (registered by name in :data:`dltemplate.registry.DATASETS`) and the loader."""

from dltemplate.data import (  # noqa: F401  (registers the datasets)
    carvana,
    digits,
    fashion_mnist,
    image_folder,
)
from dltemplate.data.base import (
    Batch,
    DataInfo,
    DataSplits,
    IndexLoader,
    InMemoryDataset,
    TensorSplit,
    make_splits,
)

__all__ = [
    "Batch",
    "DataInfo",
    "DataSplits",
    "IndexLoader",
    "InMemoryDataset",
    "TensorSplit",
    "make_splits",
]
