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
