"""Mergeable float64 accumulators for per-shard partial sums.

Workers return one accumulator per shard; the driver merges them in shard order
(:func:`reduce_in_order`), so the result depends on neither the number of workers nor the order
in which they finish.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np


class Mergeable(Protocol):
    def merge(self, other: Mergeable) -> Mergeable: ...


T = TypeVar("T", bound=Mergeable)


@dataclass(frozen=True)
class Moments:
    """Count, mean and centred co-moment ``Σ (f - mean)(f - mean)ᵀ`` of a set of row vectors.

    Merged with the pairwise update of Chan, Golub & LeVeque (1979), which keeps the centred Gram
    matrix accurate in float64 even when the mean is large compared with the spread.
    """

    count: int
    mean: np.ndarray  # (d,)
    comoment: np.ndarray  # (d, d)

    @classmethod
    def of(cls, x: np.ndarray) -> Moments:
        """Moments of the rows of ``x`` (n, d), computed in float64."""
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=0)
        xc = x - mean
        return cls(int(x.shape[0]), mean, xc.T @ xc)

    def merge(self, other: Moments) -> Moments:
        n = self.count + other.count
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        comoment = (self.comoment + other.comoment
                    + np.outer(delta, delta) * (self.count * other.count / n))
        return Moments(n, mean, comoment)

    def covariance(self) -> np.ndarray:
        """Centred Gram ``Σ (f - m)(f - m)ᵀ / count`` (normalised over data and positions)."""
        return self.comoment / self.count


@dataclass(frozen=True)
class ActSums:
    """What the Jacobian-Gram M of a position-wise section ``y = x P + act(x A) B`` needs from
    its rows, whatever the next layer's basis (float64): the row count, Σ_r g_r (m,) and
    Σ_r g_r g_rᵀ (m, m), with g_r the integrated activation derivative of row r
    (:func:`ribray.math.closed_form.act_moments`). Both sums are None for an affine section,
    whose M needs the count alone. Workers take them in the Gram pass, so such a layer's
    basis needs no pass of its own (algorithm §13)."""

    count: int
    g_sum: np.ndarray | None = None
    gram: np.ndarray | None = None

    def merge(self, other: ActSums) -> ActSums:
        if self.g_sum is None or other.g_sum is None or self.gram is None or other.gram is None:
            return ActSums(self.count + other.count)
        return ActSums(self.count + other.count, self.g_sum + other.g_sum,
                       self.gram + other.gram)


@dataclass(frozen=True)
class Sum:
    """A float64 sum and the number of (sample, position) terms it normalises by.

    ``per_source`` (R, ...): with R ≥ 2 stochastic sources in effect, each source's own sum
    (``total`` is their mean over r); an empty (1, 0) marker with one source; None without
    sources. Merged by addition; None when either side has none."""

    count: int
    total: np.ndarray
    per_source: np.ndarray | None = None

    def merge(self, other: Sum) -> Sum:
        per = (None if self.per_source is None or other.per_source is None
               else self.per_source + other.per_source)
        return Sum(self.count + other.count, self.total + other.total, per)

    @property
    def n_sources(self) -> int | None:
        """R, the number of stochastic sources behind ``per_source`` (None without)."""
        return None if self.per_source is None else int(self.per_source.shape[0])

    def mean(self) -> np.ndarray:
        return self.total / self.count


def reduce_in_order(partials: Mapping[int, T]) -> T:
    """Merge per-shard partials in increasing shard id; raises if there are none."""
    if not partials:
        raise ValueError("no partial results to reduce")
    keys = sorted(partials)
    acc = partials[keys[0]]
    for k in keys[1:]:
        acc = acc.merge(partials[k])
    return acc
