"""Datasets (registered by name in :data:`dltemplate.registry.DATASETS`) and the loader."""

from dltemplate.data import (  # noqa: F401  (registers the datasets)
    carvana,
    digits,
    fashion_mnist,
    image_folder,
    transforms,
)
from dltemplate.data.base import (
    Batch,
    DataInfo,
    DataSplits,
    InMemoryDataset,
    TensorSplit,
    concat_splits,
    make_splits,
)
from dltemplate.data.loader import IndexLoader, ReadOptions
from dltemplate.data.samples import MapStyleDataset, SampleSplit

__all__ = [
    "Batch",
    "DataInfo",
    "DataSplits",
    "IndexLoader",
    "InMemoryDataset",
    "MapStyleDataset",
    "ReadOptions",
    "SampleSplit",
    "TensorSplit",
    "concat_splits",
    "make_splits",
]
