"""The leave-one-shard-out (jackknife) report of each LIB layer and the stochastic sources'
error estimate (``ribray.math.stability``)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from ribray.math import basis as bases
from ribray.math.accumulators import Sum
from ribray.math.stability import (
    ONE_SOURCE,
    edges_error_attrs,
    jackknife,
    source_error,
    source_error_attrs,
)


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


def _sources(d: int, r: int, seed: int, noise: float) -> Sum:
    """A reduced sum with ``r`` per-source sums of J Jᵀ: a shared part plus source noise."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d))
    per = []
    for _ in range(r):
        B = A + noise * rng.standard_normal((d, d))
        per.append(50 * (B @ B.T))
    per = np.array(per)
    return Sum(50, per.mean(0), per)


def test_the_sources_error_matches_a_direct_computation():
    """M's relative error and the top Λ's standard errors equal the between-source formulas
    over bases recomputed from scratch from each source's M alone; identical sources have no
    spread; the attrs say why there is no estimate with one source and are absent without."""
    p = _pca(7, 0)
    full = _sources(7, 5, 3, noise=0.3)
    err = source_error(p, full, n_keep=5, top=4)
    M_r = full.per_source / full.count
    s2 = M_r.var(axis=0, ddof=1)
    assert err.r == 5
    assert err.m_rel_error == pytest.approx(np.sqrt(s2.sum() / 5)
                                            / np.linalg.norm(full.total / full.count), rel=1e-12)
    L = np.array([np.delete(bases.lib_basis(p, m, 0.0, "absolute").lambdas, 0)[:4]
                  for m in M_r])
    lam = np.delete(bases.lib_basis(p, full.mean(), 0.0, "absolute").lambdas, 0)[:4]
    se = L.std(axis=0, ddof=1) / np.sqrt(5)
    np.testing.assert_allclose(err.lambda_se, se, rtol=1e-9)
    np.testing.assert_allclose(err.lambda_rel_se, se / lam, rtol=1e-9)
    attrs = source_error_attrs(p, full, n_keep=5)
    assert attrs["r"] == 5 and attrs["m_rel_error"] == err.m_rel_error
    assert len(attrs["top_lambda_rel_se"]) == 5 and json.loads(json.dumps(attrs)) == attrs
    calm = source_error(p, _sources(7, 5, 3, noise=0.0), n_keep=5)
    assert calm.m_rel_error < 1e-12 and np.abs(calm.lambda_rel_se).max() < 1e-10
    one = _sources(7, 1, 3, noise=0.3)
    assert source_error(p, one, n_keep=5) is None
    assert source_error_attrs(p, one, n_keep=5) == {"r": 1, "reason": ONE_SOURCE}
    assert source_error_attrs(p, Sum(full.count, full.total), n_keep=5) is None
    assert edges_error_attrs(Sum(full.count, full.total)) == {}
    e = edges_error_attrs(full)
    assert e["sources_r"] == 5 and e["edges_rel_error"] == pytest.approx(err.m_rel_error)


def test_per_source_sums_merge_and_round_trip():
    """Per-source sums add when shards merge (None with None, and with either side none)
    and survive pickling (Ray); the store's round trip is in test_resume."""
    a, b = _sources(4, 3, 1, 0.2), _sources(4, 3, 2, 0.2)
    m = a.merge(b)
    np.testing.assert_array_equal(m.per_source, a.per_source + b.per_source)
    assert a.merge(Sum(b.count, b.total)).per_source is None
    assert Sum(1, np.ones(2)).merge(Sum(1, np.ones(2))).per_source is None
    assert pickle.loads(pickle.dumps(m)).per_source.tobytes() == m.per_source.tobytes()
