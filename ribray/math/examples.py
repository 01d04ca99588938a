"""Feature examples for visualisation (paper figures 11-12): per LIB feature of a node layer,
its top and bottom activating (sample, position) pairs, and examples drawn from intervals of
its activation range.

Every (sample, position) row of the data set has the features ``f̂ = f @ C``. A shard returns,
per feature, its own top-k and bottom-k rows (value, sample, position) and the values of a
*pool* of rows kept by a hash of (sample, position) alone, about one in ``pool_every``, so the
pool does not depend on sharding. The driver merges the shards in shard order (ties by sample,
then position), takes the global top and bottom k, and splits each feature's range
[min, max] into ``intervals`` equal intervals, taking from the pool the ``per_interval`` rows
of each interval that come first in hash order. Pure: no Ray, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_MIX = np.uint64(0x9E3779B97F4A7C15)


def row_hash(samples: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """A 64-bit mixing hash of (sample, position) pairs (splitmix64 finaliser)."""
    z = samples.astype(np.uint64) * np.uint64(1_000_003) + positions.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z + _MIX) * np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(31)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(29)
    return z


@dataclass(frozen=True)
class Examples:
    """One shard's (or the merged) candidates of one layer, k features wide. ``*_value``:
    (features, n); ``*_sample``/``*_position``: (features, n) int64. The pool: rows
    ``pool_sample``/``pool_position`` (n_pool,) with their hashes and feature values
    ``pool_value`` (features, n_pool)."""

    top_value: np.ndarray
    top_sample: np.ndarray
    top_position: np.ndarray
    bottom_value: np.ndarray
    bottom_sample: np.ndarray
    bottom_position: np.ndarray
    pool_value: np.ndarray
    pool_sample: np.ndarray
    pool_position: np.ndarray
    pool_hash: np.ndarray


def _select(values: np.ndarray, samples: np.ndarray, positions: np.ndarray, k: int,
            largest: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per feature (row of ``values`` (F, n)), the k largest (or smallest) entries, ties by
    sample then position: (F, k') each, k' = min(k, n)."""
    key = -values if largest else values
    take = np.take_along_axis
    n = values.shape[1]
    if values.shape[0] == 0 or n == 0:
        shape = (values.shape[0], min(k, n))
        return (np.zeros(shape), np.zeros(shape, dtype=np.int64),
                np.zeros(shape, dtype=np.int64))
    if n > k:  # the k best of each feature first (linear time), then ordered among themselves
        cand = np.argpartition(key, k - 1, axis=1)[:, :k]
        values, key = take(values, cand, 1), take(key, cand, 1)
        samples, positions = take(samples, cand, 1), take(positions, cand, 1)
    # lexicographic: value first, then sample, then position (np.lexsort sorts by last key)
    order = np.stack([np.lexsort((positions[f], samples[f], key[f]))
                      for f in range(values.shape[0])])
    return take(values, order, 1), take(samples, order, 1), take(positions, order, 1)


def shard_examples(features: Tensor, start: int, k: int, pool_every: int) -> Examples:
    """Candidates of one shard: ``features`` (batch, T, F) of samples start, start+1, ...
    (float64 on any device)."""
    f = features.detach().to(torch.float64).cpu().numpy()
    B, T, F = f.shape
    samples = np.repeat(np.arange(start, start + B), T)
    positions = np.tile(np.arange(T), B)
    vals = f.reshape(B * T, F).T  # (F, rows)
    S = np.broadcast_to(samples, vals.shape)
    P = np.broadcast_to(positions, vals.shape)
    top = _select(vals, S, P, k, largest=True)
    bottom = _select(vals, S, P, k, largest=False)
    h = row_hash(samples, positions)
    keep = (h % np.uint64(max(1, pool_every))) == 0
    return Examples(*top, *bottom, vals[:, keep], samples[keep], positions[keep], h[keep])


def merge(parts: list[Examples], k: int) -> Examples:
    """The candidates of several shards (given in shard order) as one."""
    cat = {name: np.concatenate([getattr(p, name) for p in parts], axis=-1)
           for name in Examples.__dataclass_fields__}
    top = _select(cat["top_value"], cat["top_sample"], cat["top_position"], k, largest=True)
    bottom = _select(cat["bottom_value"], cat["bottom_sample"], cat["bottom_position"], k,
                     largest=False)
    return Examples(*top, *bottom, cat["pool_value"], cat["pool_sample"],
                    cat["pool_position"], cat["pool_hash"])


@dataclass(frozen=True)
class Intervals:
    """Examples from equal intervals of each feature's range: ``edges`` (F, n + 1);
    ``value``/``sample``/``position`` (F, n, per), NaN/-1 where an interval has fewer."""

    edges: np.ndarray
    value: np.ndarray
    sample: np.ndarray
    position: np.ndarray


def intervals(ex: Examples, n: int, per: int) -> Intervals:
    """Split each feature's [min, max] (its bottom and top example) into ``n`` intervals and
    take the first ``per`` pooled rows of each in hash order."""
    F = ex.top_value.shape[0]
    lo, hi = ex.bottom_value[:, 0], ex.top_value[:, 0]
    edges = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, n + 1)[None, :]
    value = np.full((F, n, per), np.nan)
    sample = np.full((F, n, per), -1, dtype=np.int64)
    position = np.full((F, n, per), -1, dtype=np.int64)
    order = np.argsort(ex.pool_hash, kind="stable")
    for f in range(F):
        v = ex.pool_value[f, order]
        b = np.clip(np.searchsorted(edges[f], v, side="right") - 1, 0, n - 1)
        for i in range(n):
            idx = np.flatnonzero(b == i)[:per]
            value[f, i, : idx.size] = v[idx]
            sample[f, i, : idx.size] = ex.pool_sample[order][idx]
            position[f, i, : idx.size] = ex.pool_position[order][idx]
    return Intervals(edges, value, sample, position)


def contexts(tokens: np.ndarray, samples: np.ndarray, positions: np.ndarray, width: int
             ) -> np.ndarray:
    """The ``width`` tokens up to and including each (sample, position), -1 before the start
    of a sequence or for a missing example (sample -1): shape (*samples.shape, width)."""
    out = np.full((*samples.shape, width), -1, dtype=np.int64)
    for idx in np.ndindex(samples.shape):
        s, p = int(samples[idx]), int(positions[idx])
        if s < 0:
            continue
        seg = tokens[s, max(0, p - width + 1): p + 1]
        out[idx][width - seg.size:] = seg
    return out
