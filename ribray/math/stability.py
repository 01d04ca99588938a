"""Is the data enough? Leave-one-shard-out (jackknife) spread of a LIB layer.

The Jacobian-Gram M is a mean of per-shard sums, so leaving shard s out is exact and cheap:

    M_(−s) = (Σ_{s'} S_{s'} − S_s) / (N − n_s)

(S_s the shard's raw sum, n_s its rows). For each s the LIB rotation is recomputed from
M_(−s) with the layer's PCA unchanged (the statistics phase sees far more data than the
Jacobian phase in the language-model jobs, so M is the part that runs short), giving
Λ_(−s) and the kept subspace. Reported per layer (Efron's jackknife, S shards):

* the jackknife standard error of each of the top Λ,
  ``se_i = sqrt((S − 1)/S · Σ_s (Λ_(−s),i − mean_s Λ_(−s),i)²)``, and relative to Λ_i;
* the principal angles between the kept (non-constant, non-variance) LIB subspace of the full
  data and of each leave-one-out estimate, in whitened PCA coordinates where both bases are
  orthonormal, over the first min(k, k_(−s)) directions of each: their largest and median.

Small numbers mean the features would not move with more (or other) data of the same kind.

The error of stochastic sources (paper appendix C), :func:`source_error`: with R sources each
source r alone gives an unbiased estimate ``M_r`` of the exact sum over output positions, the
R are independent given the data, and ``M̂`` is their mean. So the between-source sample
variance over r (ddof 1), divided by R, estimates the variance of ``M̂`` that comes from the
sources (not from the data): reported as the Frobenius-summed standard error relative to
``‖M̂‖_F`` (likewise for the edges), and as the standard error of the top Λ over the rotations
recomputed from each ``M_r`` alone (the PCA kept, as for the jackknife).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ribray.math.accumulators import Sum, reduce_in_order
from ribray.math.basis import Pca, eigh_descending


@dataclass(frozen=True)
class Stability:
    """Leave-one-shard-out spread of a LIB layer (see module docstring)."""

    n_shards: int
    lambda_se: np.ndarray  # (top,) jackknife standard errors of the top Λ (non-fixed)
    lambda_rel_se: np.ndarray  # (top,) the same relative to the full data's Λ
    max_angle_deg: float  # the largest principal angle over every left-out shard
    median_angle_deg: float  # the median over shards of each shard's largest angle

    def as_attrs(self) -> dict:
        return {"n_shards": self.n_shards,
                "top_lambda_rel_se": [float(v) for v in self.lambda_rel_se[:8]],
                "max_principal_angle_deg": self.max_angle_deg,
                "median_principal_angle_deg": self.median_angle_deg}


def _rotation(p: Pca, M_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Λ (descending) and eigenvectors of the non-fixed block of M in whitened coordinates."""
    M = p.R_pinv @ M_raw @ p.R_pinv.T
    f = p.n_fixed
    return eigh_descending((M + M.T)[f:, f:] / 2)


def jackknife(p: Pca, partials: dict[int, Sum], n_keep: int, top: int = 16
              ) -> Stability | None:
    """:class:`Stability` of a layer whose full-data basis kept ``n_keep`` non-fixed
    features; None with fewer than two shards."""
    if len(partials) < 2 or n_keep == 0:
        return None
    full = reduce_in_order(partials)  # in shard order, as the basis itself
    total, count = full.total, full.count
    lam, vecs = _rotation(p, total / count)
    k = min(n_keep, lam.size)
    top = min(top, k)
    loo, worst = [], []
    for s in sorted(partials):
        part = partials[s]
        lam_s, vecs_s = _rotation(p, (total - part.total) / (count - part.count))
        loo.append(lam_s[:top])
        m = min(k, lam_s.size)
        cos = np.linalg.svd(vecs[:, :m].T @ vecs_s[:, :m], compute_uv=False)
        worst.append(float(np.degrees(np.arccos(np.clip(cos.min(), -1.0, 1.0)))))
    L = np.array(loo)
    S = L.shape[0]
    se = np.sqrt((S - 1) / S * ((L - L.mean(0)) ** 2).sum(0))
    rel = se / np.where(lam[:top] > 0, lam[:top], np.inf)
    return Stability(S, se, rel, float(max(worst)), float(np.median(worst)))


#: why a layer with a single stochastic source has no error estimate (the stored reason:
#: one source gives no spread to estimate its error from)
ONE_SOURCE = "needs r >= 2"


@dataclass(frozen=True)
class SourceError:
    """The error of the stochastic sources' estimate of a layer's M (see module docstring)."""

    r: int
    m_rel_error: float  # sqrt(Σ_ij s²_ij / R) / ‖M̂‖_F
    lambda_se: np.ndarray  # (top,) between-source standard errors of the top Λ (non-fixed)
    lambda_rel_se: np.ndarray  # (top,) the same relative to M̂'s Λ

    def as_attrs(self) -> dict:
        return {"r": self.r, "m_rel_error": self.m_rel_error,
                "top_lambda_rel_se": [float(v) for v in self.lambda_rel_se[:8]]}


def source_variance(s: Sum) -> float | None:
    """``Σ_ij s²_ij / R``: the estimated expected squared Frobenius error of the mean
    ``s.mean()`` from the sources, s² the unbiased sample variance over r of each source's
    own estimate ``per_source[r] / count``; None with fewer than two sources."""
    r = s.n_sources
    if r is None or r < 2:
        return None
    assert s.per_source is not None
    return float((s.per_source / s.count).var(axis=0, ddof=1).sum() / r)


def rel_error(s: Sum) -> float | None:
    """``sqrt(source_variance) / ‖mean‖_F`` (0 where the mean is zero: the per-source sums
    of squares are then all zero too); None with fewer than two sources."""
    var = source_variance(s)
    if var is None:
        return None
    norm = float(np.linalg.norm(s.mean()))
    return float(np.sqrt(var) / norm) if norm > 0 else 0.0


def source_error(p: Pca, full: Sum, n_keep: int, top: int = 16) -> SourceError | None:
    """:class:`SourceError` of a layer's M from its reduced sum ``full`` (with
    ``per_source``) and the PCA; its basis kept ``n_keep`` non-fixed features. None with
    fewer than two sources."""
    m_rel = rel_error(full)
    if m_rel is None:
        return None
    assert full.per_source is not None
    r = full.per_source.shape[0]
    lam, _ = _rotation(p, full.total / full.count)
    top = min(top, n_keep, lam.size)
    L = np.array([_rotation(p, m / full.count)[0][:top] for m in full.per_source])
    se = L.std(axis=0, ddof=1) / np.sqrt(r)
    rel = se / np.where(lam[:top] > 0, lam[:top], np.inf)
    return SourceError(r, m_rel, se, rel)


def source_error_attrs(p: Pca, full: Sum, n_keep: int) -> dict | None:
    """The layer attr ``stochastic_error``: :meth:`SourceError.as_attrs`, ``{"r": 1,
    "reason": ...}`` with a single source, None where no sources were in effect."""
    if full.n_sources is None:
        return None
    err = source_error(p, full, n_keep)
    return err.as_attrs() if err is not None else {"r": full.n_sources, "reason": ONE_SOURCE}


def edges_error_attrs(s: Sum) -> dict:
    """Attrs of an edge group from its reduced sum: ``edges_rel_error`` (:func:`rel_error`)
    and ``sources_r`` with two or more sources, else none."""
    err = rel_error(s)
    return {} if err is None else {"edges_rel_error": err, "sources_r": s.n_sources}
