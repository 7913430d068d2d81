"""IndexLoader batching (training shards, evaluation shards, resume) and make_splits."""

from __future__ import annotations

import pytest
import torch

from dltemplate.data.base import (
    DataInfo,
    InMemoryDataset,
    TensorSplit,
    make_splits,
)
from dltemplate.data.loader import IndexLoader
from dltemplate.errors import ConfigError


def ids_split(n: int) -> TensorSplit:
    """Sample i has input [i, -i] and target i, so batches show which samples they hold."""
    ids = torch.arange(n)
    return TensorSplit(torch.stack([ids, -ids], dim=1).float(), ids)


def targets_of(loader) -> list[list[int]]:
    return [b.targets.tolist() for b in loader]


class TinyDataset(InMemoryDataset):
    """A pool of ``n_pool`` samples (ids 0..) and an optional own test split (ids 1000..)."""

    info = DataInfo(input_shape=(2,), num_classes=3, class_names=["a", "b", "c"])

    def __init__(self, n_pool: int = 100, n_test: int | None = None) -> None:
        super().__init__(root="", download=False)
        self.n_pool, self.n_test = n_pool, n_test

    def load(self):
        pool = ids_split(self.n_pool)
        if self.n_test is None:
            return pool, None
        test_ids = torch.arange(1000, 1000 + self.n_test)
        return pool, TensorSplit(test_ids[:, None].float(), test_ids)


# --- IndexLoader: training -------------------------------------------------------------------


def test_training_epoch_is_a_permutation_of_the_split():
    loader = IndexLoader(ids_split(23), 5, training=True, seed=3)
    batches = targets_of(loader)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    seen = [i for b in batches for i in b]
    assert sorted(seen) == list(range(23))
    assert seen != list(range(23))  # shuffled
    # inputs travel with their targets
    for batch in loader:
        assert torch.equal(batch.inputs[:, 0].long(), batch.targets)


def test_training_order_is_deterministic_by_seed_and_epoch():
    split = ids_split(40)

    def order(seed: int, epoch: int) -> list[list[int]]:
        loader = IndexLoader(split, 8, training=True, seed=seed)
        loader.set_epoch(epoch)
        return targets_of(loader)

    assert order(1, 0) == order(1, 0)
    assert order(1, 2) == order(1, 2)
    assert order(1, 0) != order(1, 1)  # a new epoch, a new order
    assert order(1, 0) != order(2, 0)  # another seed, another order
    loader = IndexLoader(split, 8, training=True, seed=1)
    first = targets_of(loader)
    assert targets_of(loader) == first  # iterating again without set_epoch repeats the epoch


def test_training_without_shuffle_keeps_stored_order():
    loader = IndexLoader(ids_split(7), 3, training=True, shuffle=False, seed=5)
    loader.set_epoch(4)
    assert targets_of(loader) == [[0, 1, 2], [3, 4, 5], [6]]


@pytest.mark.parametrize("n", [32, 29, 26])
def test_two_ranks_share_the_global_batches_of_one_process(n):
    split, batch_size, seed = ids_split(n), 4, 11
    single = IndexLoader(split, 2 * batch_size, training=True, seed=seed)
    ranks = [
        IndexLoader(split, batch_size, training=True, seed=seed, rank=r, world_size=2)
        for r in range(2)
    ]
    for loader in (single, *ranks):
        loader.set_epoch(3)
    single_batches = list(single)
    rank_batches = [list(r) for r in ranks]
    assert len(rank_batches[0]) == len(rank_batches[1]) == len(single_batches)
    for whole, b0, b1 in zip(single_batches, *rank_batches):
        assert torch.cat([b0.targets, b1.targets]).tolist() == whole.targets.tolist()
        assert b0.global_size == b1.global_size == whole.global_size == len(whole.targets)
        assert len(b0.targets) > 0 and len(b1.targets) > 0
        assert abs(len(b0.targets) - len(b1.targets)) <= 1  # even shares


def test_global_size_with_a_short_last_batch():
    loader = IndexLoader(ids_split(10), 4, training=True, seed=0)
    assert [b.global_size for b in loader] == [4, 4, 2]
    assert len(loader) == 3

    ranks = [IndexLoader(ids_split(22), 4, training=True, rank=r, world_size=2) for r in range(2)]
    for loader in ranks:
        assert [b.global_size for b in loader] == [8, 8, 6]
        assert len(loader) == 3
    assert [len(b.targets) for b in ranks[0]] == [4, 4, 3]
    assert [len(b.targets) for b in ranks[1]] == [4, 4, 3]


def test_len_matches_the_batches_yielded_with_a_tiny_last_global_batch():
    for rank in range(2):
        loader = IndexLoader(ids_split(9), 2, training=True, seed=1, rank=rank, world_size=2)
        assert len(list(loader)) == len(loader)


# --- IndexLoader: evaluation -----------------------------------------------------------------


def test_eval_shards_count_each_sample_exactly_once():
    split, world = ids_split(10), 3
    seen = []
    for rank in range(world):
        loader = IndexLoader(split, 2, training=False, rank=rank, world_size=world)
        batches = list(loader)
        assert len(batches) == len(loader)
        for b in batches:
            assert b.global_size == len(b.targets)
        seen += [i for b in batches for i in b.targets.tolist()]
    assert sorted(seen) == list(range(10))  # no padding, no duplicates


def test_eval_order_is_fixed_and_unshuffled():
    loader = IndexLoader(ids_split(7), 3, training=False, seed=9)
    loader.set_epoch(5)
    assert targets_of(loader) == [[0, 1, 2], [3, 4, 5], [6]]


# --- limit and resume ------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_limit_batches(training):
    full = IndexLoader(ids_split(20), 3, training=training, seed=2)
    limited = IndexLoader(ids_split(20), 3, training=training, seed=2, limit_batches=2)
    assert len(full) == 7 and len(limited) == 2
    assert targets_of(limited) == targets_of(full)[:2]
    big_limit = IndexLoader(ids_split(20), 3, training=training, seed=2, limit_batches=100)
    assert len(big_limit) == 7 and targets_of(big_limit) == targets_of(full)


def test_skip_batches_resumes_at_the_right_batch_once():
    full = IndexLoader(ids_split(20), 3, training=True, seed=4)
    full.set_epoch(2)
    expected = targets_of(full)

    resumed = IndexLoader(ids_split(20), 3, training=True, seed=4)
    resumed.set_epoch(2)
    resumed.skip_batches = 4
    assert targets_of(resumed) == expected[4:]
    # the skip applies to the interrupted epoch only
    assert resumed.skip_batches == 0
    assert targets_of(resumed) == expected


def test_skip_batches_with_limit():
    loader = IndexLoader(ids_split(20), 3, training=True, seed=4, limit_batches=5)
    expected = targets_of(loader)
    loader.skip_batches = 3
    assert targets_of(loader) == expected[3:5]


def test_batch_size_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="batch_size"):
        IndexLoader(ids_split(4), 0, training=True)


# --- make_splits -----------------------------------------------------------------------------


def split_ids(split: TensorSplit) -> set[int]:
    return set(split.targets.tolist())


def _splits(dataset, seed=0, val=0.2, test=0.25, tv_rate=1.0, test_rate=1.0):
    return make_splits(
        dataset,
        seed=seed,
        val_fraction=val,
        test_fraction=test,
        train_val_sample_rate=tv_rate,
        test_sample_rate=test_rate,
    )


def test_splits_without_own_test_are_disjoint_and_cover_the_pool():
    s = _splits(TinyDataset(100), seed=1)
    train, val, test = split_ids(s.train), split_ids(s.val), split_ids(s.test)
    assert len(test) == 25 and len(val) == 15 and len(train) == 60
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(range(100))
    assert s.info.num_classes == 3
    assert any("25" in note for note in s.notes)
    # inputs travel with their targets
    assert torch.equal(s.train.inputs[:, 0].long(), s.train.targets)


def test_splits_are_deterministic_by_seed():
    a, b, c = (_splits(TinyDataset(100), seed=s) for s in (5, 5, 6))
    for name in ("train", "val", "test"):
        assert getattr(a, name).targets.tolist() == getattr(b, name).targets.tolist()
    assert a.val.targets.tolist() != c.val.targets.tolist()


def test_own_test_split_is_used_as_is():
    s = _splits(TinyDataset(80, n_test=30), seed=2, val=0.25)
    assert split_ids(s.test) == set(range(1000, 1030))
    assert split_ids(s.train) | split_ids(s.val) == set(range(80))
    assert len(s.val) == 20 and len(s.train) == 60
    assert s.notes == []


def test_sample_rates_shrink_the_splits():
    s = _splits(TinyDataset(100, n_test=40), seed=3, val=0.2, tv_rate=0.5, test_rate=0.25)
    assert len(s.train) + len(s.val) == 50
    assert len(s.val) == 10 and len(s.train) == 40
    assert len(s.test) == 10
    assert split_ids(s.test) <= set(range(1000, 1040))
    assert not (split_ids(s.train) & split_ids(s.val))

    # without an own test split: the test share is set aside first, then the rest sub-sampled
    s = _splits(TinyDataset(100), seed=3, val=0.2, test=0.2, tv_rate=0.5, test_rate=0.5)
    assert len(s.test) == 10
    assert len(s.train) + len(s.val) == 40
    assert len(s.val) == 8


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"tv_rate": 0.0}, "data.train_val_sample_rate"),
        ({"tv_rate": 1.5}, "data.train_val_sample_rate"),
        ({"test_rate": 0.0}, "data.test_sample_rate"),
        ({"test_rate": -0.1}, "data.test_sample_rate"),
        ({"test": 1.2}, "data.test_fraction"),
        ({"val": 1.0}, "data.val_fraction"),
    ],
)
def test_out_of_range_rates_are_config_errors(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        _splits(TinyDataset(50), **kwargs)


class _Grouped(InMemoryDataset):
    """40 samples in 10 groups of 4 (like the views of one car)."""

    info = DataInfo(input_shape=(1, 2, 2), num_classes=2, class_names=["a", "b"])

    def load(self):
        n = 40
        inputs = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
        groups = [f"car{i // 4:02d}" for i in range(n)]
        return TensorSplit(inputs, torch.arange(n) % 2, groups), None


def test_groups_never_fall_into_two_splits():
    splits = make_splits(_Grouped(), seed=3, val_fraction=0.25, test_fraction=0.2,
                         train_val_sample_rate=1.0, test_sample_rate=1.0)  # fmt: skip
    sets = [set(s.groups) for s in (splits.train, splits.val, splits.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert [len(s) for s in sets] == [6, 2, 2]
    assert len(splits.train) == 24  # whole groups of 4
    record = splits.group_record()
    assert record["test"] == sorted(sets[2])
    again = make_splits(_Grouped(), seed=3, val_fraction=0.25, test_fraction=0.2,
                        train_val_sample_rate=1.0, test_sample_rate=1.0)  # fmt: skip
    assert again.group_record() == record
