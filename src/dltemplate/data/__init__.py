"""Datasets (registered by name in :data:`dltemplate.registry.DATASETS`) and the loader."""

from dltemplate.data import carvana, digits, fashion_mnist  # noqa: F401  (registers the datasets)
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
