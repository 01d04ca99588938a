"""Fourier labels for features of a modular-addition model (paper appendix F).

A feature is a function on the ``p × p`` grid of inputs ``(x, y)``, stored as a vector of length
``p*p`` in row-major order (index ``x*p + y``, as in :func:`ribray.data.modular_addition`). All
angles are ``2πk·x/p``: ``cos(3x)`` means ``cos(2π·3·x/p)``.

1-D basis (columns of the orthonormal ``(p, p)`` matrix of :func:`basis_1d`, in this order)::

    1/√p,  √(2/p)·cos(1x), √(2/p)·sin(1x), ..., √(2/p)·cos(kx), √(2/p)·sin(kx), ...

up to ``k = p//2``; at the Nyquist frequency ``k = p/2`` (even ``p``) only ``cos`` is kept,
normalised as ``(-1)^x/√p`` (``sin`` is identically 0 on the grid). Column ``0`` is the constant,
column ``2k-1`` is ``cos(k·)``, column ``2k`` is ``sin(k·)``.

2-D product dictionary: outer products of two 1-D columns, grouped by frequency pair
``(kx, ky)``; the coefficients of a feature ``A`` (reshaped to ``(p, p)``) are ``Fᵀ A F``.

Sum/difference basis of a group with ``0 < kx, ky < p/2`` (unit-norm product terms ``cc, cs,
sc, ss`` = ``cos(kx x)cos(ky y)``, ``cos·sin``, ``sin·cos``, ``sin·sin``)::

    cos(kx x + ky y) = (cc - ss)/√2        sin(kx x + ky y) = (sc + cs)/√2
    cos(kx x - ky y) = (cc + ss)/√2        sin(kx x - ky y) = (sc - cs)/√2

(each side unit-norm over the grid), an orthogonal rotation, so coefficients rotate the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUM_DIFF_ORDER = ("cos(+)", "sin(+)", "cos(-)", "sin(-)")
"""Order of the four sum/difference terms of a group in :func:`sum_difference_coefficients`."""

_SQRT_HALF = np.sqrt(0.5)


def frequencies(p: int) -> list[int]:
    """The frequencies ``0..p//2`` of a real Fourier basis on ``Z_p``."""
    _check_p(p)
    return list(range(p // 2 + 1))


@dataclass(frozen=True)
class Basis1D:
    """Real orthonormal Fourier basis on ``Z_p``.

    Attributes
    ----------
    matrix : (p, p) array, orthonormal columns (see module docstring for the order).
    freq : (p,) int array, the frequency of each column.
    kind : list of str, ``"1"``, ``"cos"`` or ``"sin"`` per column.
    """

    matrix: np.ndarray
    freq: np.ndarray
    kind: list[str]


def basis_1d(p: int) -> Basis1D:
    """The real orthonormal 1-D Fourier basis on ``Z_p`` (constant, then cos/sin by frequency)."""
    _check_p(p)
    x = np.arange(p)
    cols = [np.full(p, 1.0 / np.sqrt(p))]
    freq, kind = [0], ["1"]
    for k in range(1, p // 2 + 1):
        angle = 2.0 * np.pi * ((k * x) % p) / p
        if 2 * k == p:
            cols.append(np.cos(angle) / np.sqrt(p))
            freq.append(k)
            kind.append("cos")
            continue
        cols += [np.sqrt(2.0 / p) * np.cos(angle), np.sqrt(2.0 / p) * np.sin(angle)]
        freq += [k, k]
        kind += ["cos", "sin"]
    return Basis1D(np.stack(cols, axis=1), np.asarray(freq, dtype=np.int64), kind)


def product_coefficients(acts: np.ndarray, p: int) -> np.ndarray:
    """Coefficients of features on the 2-D product dictionary.

    Parameters
    ----------
    acts : (p*p, n) array, features in row-major grid order.
    p : modulus.

    Returns
    -------
    (n, p, p) array; ``[f, i, j]`` is the coefficient of feature ``f`` on
    ``basis_1d(p).matrix[:, i] ⊗ basis_1d(p).matrix[:, j]``.
    """
    a = _as_grid(acts, p)
    F = basis_1d(p).matrix
    return F.T @ a @ F


def from_product_coefficients(coefs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`product_coefficients`: (n, p, p) coefficients to (p*p, n) features."""
    coefs = np.asarray(coefs, dtype=np.float64)
    if coefs.ndim != 3 or coefs.shape[1] != coefs.shape[2]:
        raise ValueError(f"coefs must have shape (n, p, p), got {coefs.shape}")
    p = coefs.shape[1]
    F = basis_1d(p).matrix
    return (F @ coefs @ F.T).reshape(coefs.shape[0], p * p).T


def sum_difference_groups(p: int) -> np.ndarray:
    """The groups ``(kx, ky)`` with ``0 < kx, ky < p/2`` that have a sum/difference basis, as an
    (m, 2) int array, ``kx`` major."""
    _check_p(p)
    k = np.arange(1, (p - 1) // 2 + 1)
    kx, ky = np.meshgrid(k, k, indexing="ij")
    return np.stack([kx.ravel(), ky.ravel()], axis=1)


def sum_difference_coefficients(coefs: np.ndarray) -> np.ndarray:
    """Rotate product coefficients of every :func:`sum_difference_groups` group.

    Parameters
    ----------
    coefs : (n, p, p) array from :func:`product_coefficients`.

    Returns
    -------
    (n, m, 4) array: coefficients on ``cos(kx x + ky y), sin(kx x + ky y), cos(kx x - ky y),
    sin(kx x - ky y)`` (each unit-norm) for the m groups of :func:`sum_difference_groups`.
    """
    p = coefs.shape[1]
    cc, cs, sc, ss = (coefs[:, i, j] for i, j in _group_product_indices(p))
    return _SQRT_HALF * np.stack([cc - ss, sc + cs, cc + ss, sc - cs], axis=-1)


def dictionary(p: int, sum_difference: bool = False) -> tuple[np.ndarray, list[str]]:
    """Explicit orthonormal dictionary (no constant) for small ``p``; memory is O(p⁴).

    Parameters
    ----------
    p : modulus.
    sum_difference : if True, groups with ``0 < kx, ky < p/2`` use the sum/difference terms
        (built directly from ``cos/sin(2π(kx x ± ky y)/p)``, not by rotation).

    Returns
    -------
    (p*p, p*p - 1) matrix with orthonormal columns, and one term name per column. Columns are
    in product-index order ``i*p + j`` (skipping 0); sum/difference terms of a group replace its
    ``cc, cs, sc, ss`` columns in the order of :data:`SUM_DIFF_ORDER`.
    """
    F = basis_1d(p).matrix
    mat = np.einsum("xi,yj->xyij", F, F).reshape(p * p, p * p)
    names = [_product_name(p, i, j) for i in range(p) for j in range(p)]
    if sum_difference:
        x, y = np.divmod(np.arange(p * p), p)
        for (a, b), idx in zip(sum_difference_groups(p), _group_flat_indices(p).T):
            for t, (fn, sign) in enumerate([(np.cos, 1), (np.sin, 1), (np.cos, -1), (np.sin, -1)]):
                angle = 2.0 * np.pi * ((a * x + sign * b * y) % p) / p
                mat[:, idx[t]] = np.sqrt(2.0) / p * fn(angle)
                names[idx[t]] = _sum_name(int(a), int(b), t)
    return mat[:, 1:], names[1:]


@dataclass(frozen=True)
class FourierLabels:
    """Fourier description of features on the modular-addition grid.

    Attributes
    ----------
    p : modulus.
    group_power : (n_features, K, K) array, ``K = len(frequencies(p))``; the fraction of each
        feature's variance in group ``(kx, ky)`` (``[:, 0, 0] = 0``; all zero for a constant).
    labels : one string per feature, e.g. ``"cos(17(x+y)) [0.93] + cos(17x) [0.04]"``, or
        ``"constant"``.
    top_terms : per feature the ``(term name, variance fraction)`` pairs of its label.
    explained : (n_features,) array, the variance fraction of the label's terms (0 for a
        constant feature).
    """

    p: int
    group_power: np.ndarray
    labels: list[str]
    top_terms: list[list[tuple[str, float]]]
    explained: np.ndarray


def fourier_labels(acts: np.ndarray, p: int, top: int = 3,
                   min_fraction: float = 0.05) -> FourierLabels:
    """Label features by their largest Fourier terms.

    Parameters
    ----------
    acts : (p*p, n_features) array, features in row-major grid order (index ``x*p + y``).
    p : modulus.
    top : at most this many terms per label.
    min_fraction : terms below this variance fraction are left out, except the largest.

    Returns
    -------
    FourierLabels. Each feature is centred over the grid; one whose variance is 0 or at most
    1e-24 times the largest feature variance is labelled ``"constant"``. A group with
    ``0 < kx, ky < p/2`` is described in the product or the sum/difference basis, whichever puts
    the larger fraction in its largest term (product on a tie).
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    a = _as_grid(acts, p)
    a = a - a.mean(axis=(1, 2), keepdims=True)
    n = a.shape[0]
    var = np.einsum("fxy,fxy->f", a, a)
    constant = (var == 0) | (var <= 1e-24 * (var.max() if n else 0.0))
    scale = np.where(constant, 0.0, 1.0 / np.where(constant, 1.0, var))

    basis = basis_1d(p)
    coefs = basis.matrix.T @ a @ basis.matrix
    frac = coefs**2 * scale[:, None, None]  # (n, p, p) product-term fractions
    frac[:, 0, 0] = 0.0
    K = p // 2 + 1
    onehot = np.zeros((p, K))
    onehot[np.arange(p), basis.freq] = 1.0
    group_power = onehot.T @ frac @ onehot

    flat = frac.reshape(n, p * p)
    sd_idx = _group_flat_indices(p)  # (4, m)
    m = sd_idx.shape[1]
    prod_sd = flat[:, sd_idx.T]  # (n, m, 4)
    sum_sd = sum_difference_coefficients(coefs) ** 2 * scale[:, None, None]
    use_sum = sum_sd.max(axis=2) > prod_sd.max(axis=2)  # (n, m)
    chosen = np.where(use_sum[:, :, None], sum_sd, prod_sd).reshape(n, 4 * m)
    other = np.setdiff1d(np.arange(1, p * p), sd_idx.ravel())  # flat product indices
    cand = np.concatenate([flat[:, other], chosen], axis=1)  # (n, T)

    k = min(top, cand.shape[1])
    part = np.argpartition(-cand, k - 1, axis=1)[:, :k] if k < cand.shape[1] else \
        np.tile(np.arange(cand.shape[1]), (n, 1))
    groups = sum_difference_groups(p)

    def name(f: int, c: int) -> str:
        if c < len(other):
            return _product_name(p, *divmod(int(other[c]), p))
        g, t = divmod(c - len(other), 4)
        if use_sum[f, g]:
            return _sum_name(int(groups[g, 0]), int(groups[g, 1]), t)
        return _product_name(p, *divmod(int(sd_idx[t, g]), p))

    labels: list[str] = []
    top_terms: list[list[tuple[str, float]]] = []
    explained = np.zeros(n)
    for f in range(n):
        if constant[f]:
            labels.append("constant")
            top_terms.append([])
            continue
        idx = part[f]
        vals = cand[f, idx]
        order = np.lexsort((idx, -vals))
        terms = [(name(f, int(idx[o])), float(vals[o])) for o in order[:k]]
        terms = terms[:1] + [t for t in terms[1:] if t[1] >= min_fraction]
        top_terms.append(terms)
        explained[f] = sum(v for _, v in terms)
        labels.append(" + ".join(f"{t} [{v:.2f}]" for t, v in terms))
    return FourierLabels(p, group_power, labels, top_terms, explained)


def _check_p(p: int) -> None:
    if int(p) != p or p < 2:
        raise ValueError(f"p must be an integer >= 2, got {p}")


def _as_grid(acts: np.ndarray, p: int) -> np.ndarray:
    """(p*p, n) features to an (n, p, p) float64 array, checking the shape."""
    _check_p(p)
    acts = np.asarray(acts, dtype=np.float64)
    if acts.ndim != 2 or acts.shape[0] != p * p:
        raise ValueError(f"acts must have shape (p*p, n_features) = ({p * p}, n) for p={p} "
                         f"(rows in row-major grid order x*p + y), got {acts.shape}")
    return acts.T.reshape(acts.shape[1], p, p)


def _group_product_indices(p: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """1-D column indices (i, j) of the ``cc, cs, sc, ss`` terms of each sum/difference group."""
    g = sum_difference_groups(p)
    ci, si = 2 * g[:, 0] - 1, 2 * g[:, 0]
    cj, sj = 2 * g[:, 1] - 1, 2 * g[:, 1]
    return [(ci, cj), (ci, sj), (si, cj), (si, sj)]


def _group_flat_indices(p: int) -> np.ndarray:
    """(4, m) flat product indices ``i*p + j`` of ``cc, cs, sc, ss`` of each group."""
    return np.stack([i * p + j for i, j in _group_product_indices(p)])


def _product_name(p: int, i: int, j: int) -> str:
    """Name of product term (i, j), e.g. ``cos(3x)``, ``sin(5y)``, ``cos(3x)sin(5y)``."""
    kx, ky = (i + 1) // 2, (j + 1) // 2
    fx = f"{'cos' if i % 2 else 'sin'}({kx}x)" if i else ""
    fy = f"{'cos' if j % 2 else 'sin'}({ky}y)" if j else ""
    return fx + fy or "1"


def _sum_name(a: int, b: int, t: int) -> str:
    """Name of sum/difference term ``t`` (order :data:`SUM_DIFF_ORDER`) of group (a, b)."""
    fn = "cos" if t % 2 == 0 else "sin"
    op = "+" if t < 2 else "-"
    return f"{fn}({a}(x{op}y))" if a == b else f"{fn}({a}x{op}{b}y)"
