"""Bases of a node layer from its statistics (paper appendix B, reference conventions).

Row vectors throughout: a node layer's raw activation ``f`` (width d, constant coordinate at raw
index ``const``) maps to features ``f_hat = f @ C`` and back with ``f ≈ f_hat @ C_pinv``.

PCA step (paper eqs. 8-10, B.1). With ``G`` the centred Gram matrix (covariance over data and
positions, constant entry 1, cross terms 0) and ``Y`` the centring map (``f @ Y = f - mean`` in
every coordinate but the constant):

    G = U D Uᵀ (eigh, |eigenvalue| descending), constant eigenvector e_const first, D_0 = 1;
    directions with eigenvalue <= threshold are dropped;
    W = Y U                   (the ``pca`` basis: centred and rotated, not whitened)
    R = W D^{-1/2},  R⁺ = D^{1/2} Uᵀ Y⁻¹   (whitened PCA coordinates z = f R).

LIB step (paper eqs. 11-15, B.2-B.3). With ``M_raw`` the Jacobian-Gram of the next layer's
features with respect to this layer's raw inputs (see :mod:`ribray.math.jacobian`):

    M = R⁺ M_raw R⁺ᵀ                          (whitened coordinates)
    Λ_0 = M[0, 0]; M[1:, 1:] = V' Λ' V'ᵀ       (constant direction kept in place, never rotated)
    C = R V diag(√Λ),  C⁺ = diag(√Λ)⁻¹ Vᵀ R⁺  (Λ <= threshold dropped)

so each LIB feature has second moment ``E[f_hat_i²] = Λ_i`` and the features are uncorrelated
(the reference implementation multiplies by √Λ; the paper's eq. 15 reads as a division).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Basis:
    """A node layer's basis. ``C``: (raw, features); ``C_pinv``: (features, raw);
    ``lambdas``: (features,), Λ for LIB/GIB, PCA eigenvalues for PCA, variances for neuron.
    ``const_feature``: index of the constant feature (0) or None (``output`` has none)."""

    C: np.ndarray
    C_pinv: np.ndarray
    lambdas: np.ndarray
    const_feature: int | None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    variance_feature: int | None = None  # the layer-norm variance feature, kept isolated
    stability: dict | None = None  # leave-one-shard-out spread (ribray.math.stability)
    stochastic_error: dict | None = None  # the sources' error (ribray.math.stability)

    @property
    def n_features(self) -> int:
        return int(self.C.shape[1])


def cutoff(values: np.ndarray, threshold: float, mode: str) -> float:
    """The value at or below which eigenvalues are dropped.

    ``absolute``: ``threshold`` itself (the paper's 1e-15). ``relative``: ``threshold`` times the
    largest |value| of ``values`` (callers pass the eigenvalues of the non-constant block), so
    the cutoff scales with the activations and the kept dimension does not change when they are
    rescaled; at an absolute 1e-15 the kept dimension of a layer with eigenvalues of O(1)-O(1e5)
    sits inside float64 round-off.
    """
    if mode == "absolute":
        return float(threshold)
    if mode == "relative":
        return float(threshold) * float(np.max(np.abs(values))) if values.size else 0.0
    raise ValueError(f"threshold mode must be absolute or relative, got {mode!r}")


def eigh_descending(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """|eigenvalues| sorted descending and matching eigenvectors of a symmetric matrix (float64).

    The absolute value follows the reference implementation: a positive semi-definite matrix's
    negative eigenvalues are round-off, and they then fall below any truncation threshold.
    """
    a = np.asarray(a, dtype=np.float64)
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    vals = np.abs(vals)
    order = np.argsort(-vals, kind="stable")
    return vals[order], vecs[:, order]


def centred_gram(cov: np.ndarray, const: int | None) -> np.ndarray:
    """The centred Gram matrix: covariance with the constant coordinate's entry set to 1."""
    g = np.array(cov, dtype=np.float64, copy=True)
    if const is not None:
        g[const, :] = 0.0
        g[:, const] = 0.0
        g[const, const] = 1.0
    return g


def centring(mean: np.ndarray, const: int) -> tuple[np.ndarray, np.ndarray]:
    """``Y`` with ``f @ Y = f - mean`` off the constant coordinate, and its inverse."""
    d = mean.shape[0]
    Y, Y_inv = np.eye(d), np.eye(d)
    shift = np.array(mean, dtype=np.float64, copy=True)
    shift[const] = 0.0
    Y[const, :] -= shift
    Y_inv[const, :] += shift
    return Y, Y_inv


@dataclass(frozen=True)
class Pca:
    """Truncated PCA of a node layer with the constant direction first (see module docstring)."""

    U: np.ndarray  # (raw, kept), column 0 = e_const, then e_var when kept
    D: np.ndarray  # (kept,), D[0] = 1
    Y: np.ndarray
    Y_inv: np.ndarray
    n_fixed: int = 1  # leading directions never rotated: the constant, the variance

    @property
    def W(self) -> np.ndarray:
        return self.Y @ self.U

    @property
    def R(self) -> np.ndarray:
        return self.W / np.sqrt(self.D)

    @property
    def R_pinv(self) -> np.ndarray:
        return (np.sqrt(self.D)[:, None] * self.U.T) @ self.Y_inv


def pca(cov: np.ndarray, mean: np.ndarray, const: int, threshold: float, mode: str,
        var: int | None = None) -> Pca:
    """PCA of a node layer with a constant coordinate at raw index ``const`` and, for the
    output half of a layer norm, its variance coordinate at ``var``.

    The centred Gram is block diagonal (covariance, and 1 for the constant), so the constant
    eigenvector is exactly e_const with eigenvalue 1; the covariance block is decomposed alone.
    The variance coordinate is kept isolated (issue: excluded from the rotations): e_var with
    eigenvalue its own variance, second, unless that is under the cutoff; its covariance with
    the other coordinates is left out of the decomposition.
    """
    d = cov.shape[0]
    iso = [var] if var is not None else []
    rest = np.array([i for i in range(d) if i != const and i not in iso])
    vals, vecs = eigh_descending(cov[np.ix_(rest, rest)])
    cut = cutoff(vals, threshold, mode)
    keep = vals > cut
    iso = [i for i in iso if cov[i, i] > cut]
    fixed = 1 + len(iso)
    U = np.zeros((d, fixed + int(keep.sum())))
    U[const, 0] = 1.0
    for j, i in enumerate(iso):
        U[i, 1 + j] = 1.0
    U[rest, fixed:] = vecs[:, keep]
    Y, Y_inv = centring(mean, const)
    D = np.concatenate([[1.0], [cov[i, i] for i in iso], vals[keep]])
    return Pca(U=U, D=D, Y=Y, Y_inv=Y_inv, n_fixed=fixed)


def pca_basis(p: Pca) -> Basis:
    """The ``pca`` basis: C = W = Y U (centred, rotated, not whitened); Λ = PCA eigenvalues."""
    return Basis(C=p.W, C_pinv=p.U.T @ p.Y_inv, lambdas=p.D.copy(), const_feature=0,
                 variance_feature=1 if p.n_fixed > 1 else None)


def lib_basis(p: Pca, M_raw: np.ndarray, threshold: float, mode: str) -> Basis:
    """LIB (or GIB) basis from the PCA and the raw Jacobian-Gram ``M_raw`` (raw, raw)."""
    R, R_pinv = p.R, p.R_pinv
    M = R_pinv @ M_raw @ R_pinv.T  # whitened coordinates, (kept, kept)
    M = (M + M.T) / 2
    f = p.n_fixed  # the constant (and the variance) are masked off and kept in place
    vals, vecs = eigh_descending(M[f:, f:])
    lam_all = np.concatenate([np.abs(np.diag(M)[:f]), vals])
    cut = cutoff(vals, threshold, mode)
    keep = np.concatenate([lam_all[:f] > cut, vals > cut])
    k = p.D.shape[0]
    V = np.zeros((k, k))
    V[:f, :f] = np.eye(f)
    V[f:, f:] = vecs
    V, lam = V[:, keep], lam_all[keep]
    sqrt_lam = np.sqrt(lam)
    C = R @ V * sqrt_lam
    C_pinv = (V.T / sqrt_lam[:, None]) @ R_pinv
    var = int(keep[0]) if f > 1 and keep[1] else None  # its index among the kept features
    return Basis(C=C, C_pinv=C_pinv, lambdas=lam, const_feature=0 if keep[0] else None,
                 extra={"M": M, "pca_eigenvalues": p.D.copy()}, variance_feature=var)


def unrotated_basis(cov: np.ndarray, const: int | None) -> Basis:
    """Raw coordinates, the constant moved first: the ``neuron`` basis and the default for the
    final node layer. Λ = the diagonal of the centred Gram (each coordinate's variance; 1 for
    the constant)."""
    d = cov.shape[0]
    order = list(range(d)) if const is None else [const] + [i for i in range(d) if i != const]
    C = np.eye(d)[:, order]
    return Basis(C=C, C_pinv=C.T.copy(), lambdas=np.diag(centred_gram(cov, const))[order].copy(),
                 const_feature=None if const is None else 0)


def rotated_output_basis(cov: np.ndarray) -> Basis:
    """PCA rotation of a final layer without a constant coordinate (``output``): C = U, the
    eigenvectors of its covariance; features are rotated but not centred (no constant to carry
    the mean)."""
    vals, vecs = eigh_descending(cov)
    return Basis(C=vecs, C_pinv=vecs.T.copy(), lambdas=vals, const_feature=None)
