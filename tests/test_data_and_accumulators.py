"""Data sets, shards and the mergeable accumulators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ribray.data import digits, modular_addition, shard_ranges
from ribray.math.accumulators import Moments, Sum, reduce_in_order


def test_modular_addition_split():
    p = 13
    train, test, full = (modular_addition(p, 0.3, 0, s) for s in ("train", "test", "all"))
    assert len(train) == int(0.3 * p * p) and len(train) + len(test) == p * p
    # row-major enumeration and labels
    assert full.inputs[:3].tolist() == [[0, 0, p], [0, 1, p], [0, 2, p]]
    assert torch.equal(full.labels, (full.inputs[:, 0] + full.inputs[:, 1]) % p)
    # the split is the seeded permutation: train first, then test, disjoint
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(0))
    assert torch.equal(train.inputs, full.inputs[perm[: len(train)]])
    assert torch.equal(test.inputs, full.inputs[perm[len(train):]])
    other = modular_addition(p, 0.3, 1, "train")
    assert not torch.equal(other.inputs, train.inputs)


def test_digits_split():
    train, test = digits(0.8, 0, "train"), digits(0.8, 0, "test")
    assert len(train) + len(test) == 1797
    assert float(train.inputs.max()) <= 1.0 and train.inputs.dtype == torch.float64


def test_shard_ranges_cover_in_order():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(8, 4) == [(0, 4), (4, 8)]
    with pytest.raises(ValueError):
        shard_ranges(8, 0)


@pytest.mark.parametrize("cuts", [[5], [1, 2, 50], [10, 20, 30, 40]])
def test_moments_merge_equals_direct(cuts):
    """Chan's pairwise merge gives the same mean and centred Gram as one pass over all rows,
    also with a mean far larger than the spread (the case naive Σffᵀ - n m mᵀ loses)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)) * [1.0, 1e-3, 10.0, 1.0] + [1e4, -3.0, 0.0, 1.0]
    parts = np.split(x, cuts)
    merged = reduce_in_order({i: Moments.of(p) for i, p in enumerate(parts)})
    direct = Moments.of(x)
    assert merged.count == 60
    np.testing.assert_allclose(merged.mean, direct.mean, rtol=1e-14, atol=0)
    cov = np.cov(x.T, bias=True)
    np.testing.assert_allclose(merged.covariance(), cov, rtol=1e-9, atol=1e-12)


class Recorder:
    """A Mergeable that remembers the order in which parts were merged."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def merge(self, other: Recorder) -> Recorder:
        return Recorder(self.ids + other.ids)


def test_reduce_in_order_is_by_shard_id():
    parts = {2: Recorder([2]), 0: Recorder([0]), 3: Recorder([3]), 1: Recorder([1])}
    assert reduce_in_order(parts).ids == [0, 1, 2, 3]
    total = reduce_in_order({1: Sum(2, np.array([2.0])), 0: Sum(1, np.array([1.0]))})
    assert total.count == 3 and total.total.tolist() == [3.0]
    with pytest.raises(ValueError):
        reduce_in_order({})


def test_split_equals_torch_random_split():
    """The reference implementation splits with torch.utils.data.random_split(dataset,
    [int(frac·n), rest], generator seeded with the data seed); compare indices with it
    directly rather than with a copy of our own formula."""
    p = 113
    full = modular_addition(p, 0.3, 0, "all")
    n_train = int(0.3 * p * p)
    tr, te = torch.utils.data.random_split(range(p * p), [n_train, p * p - n_train],
                                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(modular_addition(p, 0.3, 0, "train").inputs, full.inputs[list(tr)])
    assert torch.equal(modular_addition(p, 0.3, 0, "test").inputs, full.inputs[list(te)])
