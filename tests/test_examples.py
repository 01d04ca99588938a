"""Feature examples (ribray.math.examples): independent of sharding, and what they claim."""

from __future__ import annotations

import numpy as np
import torch

from ribray.math.examples import contexts, intervals, merge, shard_examples


def _features(seed: int = 0) -> torch.Tensor:
    return torch.randn(20, 7, 3, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def test_shards_merge_to_the_whole():
    f = _features()
    whole = merge([shard_examples(f, 0, 6, pool_every=5)], 6)
    parts = merge([shard_examples(f[a:b], a, 6, pool_every=5)
                   for a, b in ((0, 3), (3, 11), (11, 20))], 6)
    for name in whole.__dataclass_fields__:
        assert np.array_equal(getattr(whole, name), getattr(parts, name)), name
    flat = f.reshape(-1, 3).numpy().T
    assert np.array_equal(whole.top_value, -np.sort(-flat, axis=1)[:, :6])
    assert np.array_equal(whole.bottom_value, np.sort(flat, axis=1)[:, :6])
    n_rows = f.shape[0] * f.shape[1]
    assert 0 < whole.pool_sample.size < n_rows  # about one row in five


def test_intervals_hold_their_examples_and_contexts_their_tokens():
    f = _features(1)
    ex = merge([shard_examples(f, 0, 4, pool_every=2)], 4)
    iv = intervals(ex, n=5, per=3)
    assert iv.edges.shape == (3, 6) and iv.value.shape == (3, 5, 3)
    for k in range(3):
        for i in range(5):
            v = iv.value[k, i][~np.isnan(iv.value[k, i])]
            assert ((v >= iv.edges[k, i]) & (v <= iv.edges[k, i + 1])).all()
            got = f[iv.sample[k, i][: v.size], iv.position[k, i][: v.size], k].numpy()
            np.testing.assert_array_equal(got, v)
    tokens = np.arange(20 * 7).reshape(20, 7)
    ctx = contexts(tokens, np.array([[2, -1]]), np.array([[1, 0]]), width=3)
    assert ctx.tolist() == [[[-1, 14, 15], [-1, -1, -1]]]
