"""scikit-learn's handwritten digits: real data that ships with a package, for offline demos."""

from __future__ import annotations

import numpy as np
import torch

from dltemplate.data.base import DataInfo, InMemoryDataset, TensorSplit
from dltemplate.registry import DATASETS


@DATASETS.register("digits")
class Digits(InMemoryDataset):
    """1,797 grey 8x8 digits (0-16 levels, stored as uint8 0-255). No official test split."""

    info = DataInfo(
        input_shape=(1, 8, 8),
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        mean=(0.3,),
        std=(0.37,),
    )

    def load(self) -> tuple[TensorSplit, TensorSplit | None]:
        """All digits as one pool; the test split is carved out by seed."""
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        inputs = torch.from_numpy(images).unsqueeze(1)  # N, 1, 8, 8
        targets = torch.from_numpy(bunch.target.astype(np.int64))
        return TensorSplit(inputs, targets), None
