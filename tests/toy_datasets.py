"""Map-style datasets for the tests: what a user's ``torch.utils.data.Dataset`` may look like,
and what it may get wrong. Named in configs as ``toy_datasets:Name`` (tests/ is on the path)."""

from __future__ import annotations

import os

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import Dataset, IterableDataset


class DigitSamples(Dataset):
    """scikit-learn's 8x8 digits, one sample at a time, with per-sample noise drawn from
    torch's global generator (as a user's random augmentation would)."""

    classes = [str(i) for i in range(10)]

    def __init__(self, n: int | None = None, noise: float = 8.0) -> None:
        digits = load_digits()
        images = (digits.images * 16).clip(0, 255).astype(np.uint8)[:, None]
        self.images, self.labels = images[:n], digits.target[:n].astype(np.int64)
        self.noise = noise

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.images[i]).float()
        image = (image + self.noise * torch.randn(image.shape)).clamp(0, 255).to(torch.uint8)
        return image, int(self.labels[i])


class DictDigits(DigitSamples):
    """Samples as dicts, with groups and names."""

    def __init__(self, n: int | None = None) -> None:
        super().__init__(n)
        self.groups = [f"writer{i % 7}" for i in range(len(self))]
        self.names = [f"digit{i:04d}.png" for i in range(len(self))]

    def __getitem__(self, i: int) -> dict[str, object]:
        image, label = super().__getitem__(i)
        return {"image": image, "label": label, "extra": "ignored"}


class Ragged(DigitSamples):
    """Sample 37 is a 9x8 image."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = super().__getitem__(i)
        return (torch.cat([image, image[:, :1]], 1) if i == 37 else image), label


class Failing(DigitSamples):
    """Reading sample 23 raises, as a corrupt file would."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == 23:
            raise ValueError("cannot decode digit023.png: truncated")
        return super().__getitem__(i)


class Crashing(DigitSamples):
    """Reading sample 23 kills the worker process that reads it (as a crash in C would)."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == 23 and torch.utils.data.get_worker_info() is not None:
            os._exit(7)
        return super().__getitem__(i)


class Empty(Dataset):
    """No samples."""

    classes = ["a", "b"]

    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        raise IndexError(i)


class Unlabelled(DigitSamples):
    """Class labels, but nothing says how many classes there are."""

    classes = None


class Stream(IterableDataset):
    """An iterable dataset: no length, no indexing."""

    def __iter__(self):
        yield torch.zeros(1, 8, 8), 0
