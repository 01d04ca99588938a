"""Fourier labels (paper appendix F): bases, Parseval, closed forms, modular-addition structure.

Everything is float64 on O(1) data over at most 113² grid points, so round-off is ~1e-14;
the checks use 1e-12, far below any real error (a wrong sign or normalisation is O(1)).
"""

from __future__ import annotations

import numpy as np
import pytest

from ribray.math import fourier

TOL = 1e-12


def grid(p: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y of every grid point, row-major (index x*p + y)."""
    return np.divmod(np.arange(p * p), p)


def wave(p: int, fn, kx: int, ky: int) -> np.ndarray:
    """fn(2π(kx x + ky y)/p) over the grid."""
    x, y = grid(p)
    return fn(2 * np.pi * (kx * x + ky * y) / p)


@pytest.mark.parametrize("p", [2, 3, 12, 13])
def test_basis_1d_orthonormal_and_frequencies(p):
    b = fourier.basis_1d(p)
    assert fourier.frequencies(p) == list(range(p // 2 + 1))
    np.testing.assert_allclose(b.matrix.T @ b.matrix, np.eye(p), atol=TOL)
    assert sorted(set(b.freq.tolist())) == fourier.frequencies(p)
    # sin is omitted only at the Nyquist frequency of even p
    n_sin = b.kind.count("sin")
    assert n_sin == (p - 1) // 2 and b.kind.count("cos") == p // 2 and b.kind[0] == "1"
    x = np.arange(p)
    scale = np.sqrt(p) if p == 2 else np.sqrt(p / 2)  # Nyquist cos has norm √p, others √(p/2)
    np.testing.assert_allclose(b.matrix[:, 1] * scale, np.cos(2 * np.pi * x / p), atol=TOL)


@pytest.mark.parametrize("p", [12, 13])
def test_product_coefficients_reconstruct(p):
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(p * p, 5))
    coefs = fourier.product_coefficients(acts, p)
    assert coefs.shape == (5, p, p)
    np.testing.assert_allclose(fourier.from_product_coefficients(coefs), acts, atol=TOL)
    np.testing.assert_allclose((coefs**2).sum(axis=(1, 2)), (acts**2).sum(axis=0), rtol=TOL)


@pytest.mark.parametrize("p", [12, 13])
@pytest.mark.parametrize("sum_difference", [False, True])
def test_dictionary_orthonormal_and_complete(p, sum_difference):
    mat, names = fourier.dictionary(p, sum_difference)
    assert mat.shape == (p * p, p * p - 1) and len(names) == p * p - 1
    assert len(set(names)) == len(names)
    np.testing.assert_allclose(mat.T @ mat, np.eye(p * p - 1), atol=TOL)
    np.testing.assert_allclose(mat.sum(axis=0), 0.0, atol=TOL)  # orthogonal to the constant


@pytest.mark.parametrize("p", [12, 13])
def test_sum_difference_rotation_matches_explicit_terms(p):
    """The 2×2-block rotation of product coefficients equals projection on the explicitly built
    cos/sin(kx x ± ky y) columns (catches any sign error in the rotation)."""
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(p * p, 4))
    rotated = fourier.sum_difference_coefficients(fourier.product_coefficients(acts, p))
    mat, names = fourier.dictionary(p, sum_difference=True)
    direct = acts.T @ mat
    groups = fourier.sum_difference_groups(p)
    assert rotated.shape == (4, len(groups), 4)
    for g, (a, b) in enumerate(groups):
        for t, (fn, op) in enumerate([("cos", "+"), ("sin", "+"), ("cos", "-"), ("sin", "-")]):
            nm = f"{fn}({a}(x{op}y))" if a == b else f"{fn}({a}x{op}{b}y)"
            np.testing.assert_allclose(rotated[:, g, t], direct[:, names.index(nm)], atol=TOL)


@pytest.mark.parametrize("p", [12, 13])
def test_parseval_and_invariance(p):
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(p * p, 6))
    res = fourier.fourier_labels(acts, p)
    K = len(fourier.frequencies(p))
    assert res.group_power.shape == (6, K, K)
    np.testing.assert_allclose(res.group_power.sum(axis=(1, 2)), 1.0, atol=TOL)
    np.testing.assert_array_equal(res.group_power[:, 0, 0], 0.0)
    assert (res.group_power >= 0).all()
    scaled = fourier.fourier_labels(acts * np.array([1e-6, 3.0, -2.0, 1e5, 7.0, 0.5]) + 4.0, p)
    np.testing.assert_allclose(scaled.group_power, res.group_power, atol=TOL)
    np.testing.assert_allclose(scaled.explained, res.explained, atol=TOL)
    assert scaled.labels == res.labels
    for terms, expl in zip(res.top_terms, res.explained):
        assert 1 <= len(terms) <= 3
        vals = [v for _, v in terms]
        assert vals == sorted(vals, reverse=True)
        assert abs(sum(vals) - expl) < TOL


@pytest.mark.parametrize("p", [12, 13])
def test_closed_forms(p):
    x, y = grid(p)
    feats = np.stack([
        wave(p, np.cos, 3, 3),                                   # cos(3(x+y))
        np.cos(2 * np.pi * 2 * x / p) * np.cos(2 * np.pi * 5 * y / p),
        wave(p, np.sin, 4, -4),                                  # sin(4(x-y))
        np.sqrt(0.8) * np.sqrt(2) * np.cos(2 * np.pi * 2 * x / p)
        + np.sqrt(0.2) * np.sqrt(2) * np.sin(2 * np.pi * 5 * y / p),
        wave(p, np.cos, 2, -5) + 3.0,                            # cos(2x-5y) plus a constant
        wave(p, np.sin, 5, 3),                                   # sin(5x+3y)
    ], axis=1)
    res = fourier.fourier_labels(feats, p)
    gp = res.group_power

    def only(f: int, name: str) -> None:
        (term, frac), = res.top_terms[f]
        assert term == name and abs(frac - 1.0) < TOL
        assert res.labels[f] == f"{name} [1.00]"
        assert abs(res.explained[f] - 1.0) < TOL

    only(0, "cos(3(x+y))")
    assert abs(gp[0, 3, 3] - 1.0) < TOL
    only(1, "cos(2x)cos(5y)")  # the sum basis would split it 0.5/0.5
    assert abs(gp[1, 2, 5] - 1.0) < TOL
    only(2, "sin(4(x-y))")
    assert abs(gp[2, 4, 4] - 1.0) < TOL
    (t0, f0), (t1, f1) = res.top_terms[3]
    assert (t0, t1) == ("cos(2x)", "sin(5y)")
    assert abs(f0 - 0.8) < TOL and abs(f1 - 0.2) < TOL
    assert res.labels[3] == "cos(2x) [0.80] + sin(5y) [0.20]"
    assert abs(gp[3, 2, 0] - 0.8) < TOL and abs(gp[3, 0, 5] - 0.2) < TOL
    only(4, "cos(2x-5y)")
    only(5, "sin(5x+3y)")
    assert abs(gp[5, 5, 3] - 1.0) < TOL


def test_nyquist_terms_even_p():
    p = 12
    x, y = grid(p)
    feats = np.stack([(-1.0) ** x, (-1.0) ** (x + y), (-1.0) ** x * np.sin(2 * np.pi * 2 * y / p)],
                     axis=1)
    res = fourier.fourier_labels(feats, p)
    assert res.labels == ["cos(6x) [1.00]", "cos(6x)cos(6y) [1.00]", "cos(6x)sin(2y) [1.00]"]
    assert abs(res.group_power[1, 6, 6] - 1.0) < TOL
    assert abs(res.group_power[2, 6, 2] - 1.0) < TOL


def test_constant_feature_and_shape_errors():
    p = 13
    rng = np.random.default_rng(3)
    feats = np.stack([np.full(p * p, 2.5), rng.normal(size=p * p), np.zeros(p * p),
                      np.full(p * p, 1.0) + 1e-14 * rng.normal(size=p * p)], axis=1)
    res = fourier.fourier_labels(feats, p)
    for f in (0, 2, 3):
        assert res.labels[f] == "constant" and res.top_terms[f] == []
        np.testing.assert_array_equal(res.group_power[f], 0.0)
        assert res.explained[f] == 0.0
    assert res.labels[1] != "constant"
    with pytest.raises(ValueError, match="p\\*p"):
        fourier.fourier_labels(rng.normal(size=(p * p - 1, 2)), p)
    with pytest.raises(ValueError, match="p\\*p"):
        fourier.fourier_labels(rng.normal(size=p * p), p)
    with pytest.raises(ValueError):
        fourier.fourier_labels(feats, p, top=0)


def test_top_and_min_fraction():
    p = 13
    x, y = grid(p)
    w = np.array([0.5, 0.3, 0.15, 0.04, 0.01])
    waves = [np.cos(2 * np.pi * 1 * x / p), np.sin(2 * np.pi * 2 * y / p), wave(p, np.cos, 3, 3),
             wave(p, np.sin, 4, -1), np.cos(2 * np.pi * 6 * y / p)]
    feat = sum(np.sqrt(2 * wi) * wv for wi, wv in zip(w, waves))[:, None]
    res = fourier.fourier_labels(feat, p, top=5, min_fraction=0.05)
    assert [t for t, _ in res.top_terms[0]] == ["cos(1x)", "sin(2y)", "cos(3(x+y))"]
    np.testing.assert_allclose([v for _, v in res.top_terms[0]], w[:3], atol=TOL)
    res = fourier.fourier_labels(feat, p, top=2, min_fraction=0.0)
    assert len(res.top_terms[0]) == 2 and abs(res.explained[0] - 0.8) < TOL
    res = fourier.fourier_labels(feat, p, top=4, min_fraction=0.0)
    assert res.top_terms[0][3][0] == "sin(4x-1y)"
    res = fourier.fourier_labels(feat, p, top=3, min_fraction=0.9)
    assert res.top_terms[0] == [("cos(1x)", pytest.approx(0.5, abs=TOL))]


def test_modular_addition_structure():
    """Features of the modular-addition task built on the grid directly: any function of
    (x + y) mod p lives on diagonal groups, all of it on the x+y terms; a logit-like
    cos(k(x+y-z)) splits cos²/sin² over cos(k(x+y)) and sin(k(x+y)); a ReLU neuron of
    cos(kx+φ) + cos(ky+φ) (the embedding-neuron pattern) carries most variance at frequency k."""
    p = 113
    x, y = grid(p)
    rng = np.random.default_rng(4)
    g = rng.normal(size=(p, 3))
    fun_of_sum = g[(x + y) % p]                                      # (p*p, 3)
    k, z = 17, 40
    logit = np.cos(2 * np.pi * k * (x + y - z) / p)
    phi = 0.7
    neuron = np.maximum(np.cos(2 * np.pi * k * x / p + phi) + np.cos(2 * np.pi * k * y / p + phi),
                        0.0)
    feats = np.column_stack([fun_of_sum, logit, neuron])
    res = fourier.fourier_labels(feats, p, top=3, min_fraction=0.01)
    gp = res.group_power
    K = len(fourier.frequencies(p))
    for f in range(3):
        np.testing.assert_allclose(np.trace(gp[f]), 1.0, atol=TOL)  # diagonal groups only
        np.testing.assert_allclose(gp[f][~np.eye(K, dtype=bool)], 0.0, atol=TOL)
    # x+y terms only: the difference coefficients vanish for functions of x+y
    sd = fourier.sum_difference_coefficients(fourier.product_coefficients(fun_of_sum, p))
    np.testing.assert_allclose(sd[:, :, 2:], 0.0, atol=1e-10)
    for terms in res.top_terms[:3]:
        assert all(t.endswith("(x+y))") for t, _ in terms)

    c, s = np.cos(2 * np.pi * k * z / p) ** 2, np.sin(2 * np.pi * k * z / p) ** 2
    terms = dict(res.top_terms[3])
    expected = {f"cos({k}(x+y))": c, f"sin({k}(x+y))": s}
    assert set(terms) == {t for t, v in expected.items() if v >= 0.01}
    for t in terms:
        assert abs(terms[t] - expected[t]) < TOL
    assert abs(gp[3, k, k] - 1.0) < TOL

    # ReLU neuron: groups (k,0) and (0,k) dominate; symmetric in x and y, so gp is symmetric
    assert gp[4, k, 0] > 0.3 and gp[4, 0, k] > 0.3
    np.testing.assert_allclose(gp[4], gp[4].T, atol=TOL)
    top2 = {t for t, _ in res.top_terms[4][:2]}
    assert top2 <= {f"cos({k}x)", f"sin({k}x)", f"cos({k}y)", f"sin({k}y)"}


def test_full_size_p113():
    """The paper's modulus and a layer's worth of features (speed is a benchmark matter)."""
    p = 113
    acts = np.random.default_rng(5).normal(size=(p * p, 128))
    res = fourier.fourier_labels(acts, p)
    assert len(res.labels) == 128
    np.testing.assert_allclose(res.group_power.sum(axis=(1, 2)), 1.0, atol=TOL)
