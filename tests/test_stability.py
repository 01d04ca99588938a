"""The leave-one-shard-out (jackknife) report of each LIB layer (``ribray.math.stability``)."""

from __future__ import annotations

import numpy as np

from ribray.math import basis as bases
from ribray.math.accumulators import Sum
from ribray.math.stability import jackknife


def _pca(d: int, seed: int) -> bases.Pca:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, d - 1)) @ rng.standard_normal((d - 1, d - 1))
    cov = np.zeros((d, d))
    cov[:-1, :-1] = np.cov(x.T, bias=True)
    return bases.pca(cov, np.r_[x.mean(0), 1.0], d - 1, 1e-12, "relative")


def _partials(d: int, n_shards: int, seed: int, noise: float) -> dict[int, Sum]:
    """Per-shard sums of J Jᵀ: a shared part plus shard-specific noise."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d))
    out = {}
    for s in range(n_shards):
        B = A + noise * rng.standard_normal((d, d))
        out[s] = Sum(10 + s, (10 + s) * (B @ B.T))
    return out


def test_identical_shards_have_no_spread():
    """Every shard the same M (a linear section: a constant Jacobian): zero spread."""
    p = _pca(7, 0)
    parts = _partials(7, 5, 1, noise=0.0)
    st = jackknife(p, parts, n_keep=4)
    assert st is not None and st.n_shards == 5
    assert np.abs(st.lambda_rel_se).max() < 1e-12
    assert st.max_angle_deg < 1e-5


def test_the_spread_matches_a_direct_leave_one_out():
    """The standard errors equal Efron's formula over bases recomputed from scratch without
    each shard, and grow with the shards' disagreement."""
    p = _pca(7, 0)
    parts = _partials(7, 6, 2, noise=0.3)
    st = jackknife(p, parts, n_keep=5, top=4)
    total = sum(s.total for s in parts.values())
    count = sum(s.count for s in parts.values())
    loo = []
    for part in parts.values():
        b = bases.lib_basis(p, (total - part.total) / (count - part.count), 0.0, "absolute")
        loo.append(np.delete(b.lambdas, 0)[:4])  # the constant feature first
    L = np.array(loo)
    se = np.sqrt(5 / 6 * ((L - L.mean(0)) ** 2).sum(0))
    np.testing.assert_allclose(st.lambda_se, se, rtol=1e-9)
    calmer = jackknife(p, _partials(7, 6, 2, noise=0.03), n_keep=5, top=4)
    assert (calmer.lambda_rel_se < st.lambda_rel_se).all()
    assert calmer.max_angle_deg < st.max_angle_deg
    assert jackknife(p, {0: parts[0]}, n_keep=5) is None  # one shard: nothing to leave out
