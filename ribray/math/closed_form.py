"""Closed-form Jacobian-Grams and edges of sections whose only nonlinearity is elementwise.

A section ``y = x P + act(x A) B`` (:class:`ribray.math.sequential.Parts`: an MLP with its
residual pass-through and folded biases, an affine map, a chain of identities) acts on each
position separately. Row vectors throughout; ``x`` is one row (a sample at a position), with
its constant coordinate.

Integrated Jacobian (eq. 11's integrated gradient, the whole input scaled by α, rule weights
w_α summing to σ), as the map ``dx -> dy``:

    D(x) = Σ_α w_α (P + A diag(act'(α x A)) B) = σ P + A diag(g) B,   g = Σ_α w_α act'(α x A)

With the next layer's features ``F = y C`` and ``K = C Cᵀ``, the raw Jacobian-Gram of
:func:`ribray.math.jacobian.m_sum` is Σ_rows D K Dᵀ (the Jacobian is block-diagonal over
positions). Summed over rows r with ``G`` the rows' g (N, m):

    M = N σ² P K Pᵀ + σ (A diag(Σ_r g_r) B K Pᵀ + its transpose) + A ((B K Bᵀ) ∘ GᵀG) Aᵀ

a Gram of activation derivatives instead of one backward pass per output feature.

Edges (eq. 2 squared, :func:`ribray.math.jacobian.edge_sum`) between input features
``f = x C_in`` (evaluated at ``x = f C_in⁺``) and output features ``y C_out``: with
``Q = C_in⁺ P C_out``, ``U = C_in⁺ A``, ``V = B C_out``, the Jacobian with respect to the
features at row r is ``Ĵ_r = σ Q + U diag(g_r) V`` (in_feature, out_feature), and

    E[i, j] = Σ_r ( f_rj Ĵ_r[j, i] )²

computed one block of input features j at a time as one (N, m) @ (m, b·k_out) product.

Derivatives ``act'`` come from autograd on the elementwise function itself, so they equal
what the exact path (:func:`ribray.math.jacobian.integrated_jacobian`) differentiates,
including ReLU's 0 at 0. Everything is computed in float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ribray.math.jacobian import Point
from ribray.math.models import ACTIVATIONS
from ribray.math.sequential import Attention, Parts


def _f64(t: Tensor) -> Tensor:
    return t.to(torch.float64)


def act_derivative(act: str, pre: Tensor, points: list[Point]) -> Tensor:
    """g = Σ_α w_α act'(α pre), elementwise (same shape as ``pre``), in float64."""
    g = torch.zeros_like(pre, dtype=torch.float64)
    fn = ACTIVATIONS[act]
    for pt in points:
        z = (pt.alpha * pre).detach().requires_grad_(True)
        with torch.enable_grad():
            (d,) = torch.autograd.grad(fn(z).sum(), z)
        g.add_(_f64(d), alpha=pt.weight)
    return g


def _sigma(points: list[Point]) -> float:
    return float(sum(pt.weight for pt in points))


def m_closed(parts: Parts, x: Tensor, C_out: Tensor, points: list[Point]) -> Tensor:
    """Σ over rows of D K Dᵀ (d_in, d_in) in float64; ``x``: (N, d_in) rows of the section's
    input (model dtype), ``C_out``: (d_out, k_out) the next layer's basis."""
    P, C = parts.P, _f64(C_out)
    s = _sigma(points)
    K = C @ C.T
    PK = P @ K
    M = (x.shape[0] * s * s) * (PK @ P.T)
    if parts.act is None:
        return M
    A, B = parts.A, parts.B
    pre = x @ A.to(x.dtype)
    G = act_derivative(parts.act, pre, points)  # (N, m)
    BK = B @ K
    cross = (A * G.sum(0)) @ (BK @ P.T)  # A diag(Σ g) B K Pᵀ
    M += s * (cross + cross.T)
    M += (A @ ((BK @ B.T) * (G.T @ G))) @ A.T
    return M


def edges_closed(parts: Parts, f_hat: Tensor, C_in_pinv: Tensor, C_out: Tensor,
                 points: list[Point], block_elements: int = 1 << 22) -> Tensor:
    """Σ over rows of (f_j Ĵ[j, i])², shape (k_out, k_in), in float64. ``f_hat``: (N, k_in)
    the input features of each row; the section is evaluated at ``f_hat @ C_in_pinv``.
    Input features are taken in blocks of b, each one GEMM ``G (N, m) @ W (m, b·k_out)``
    with ``W[:, j, i] = U_jk V_ki`` (rows in chunks); ``block_elements`` bounds the size of W
    and of each chunk's product (memory). Pass all rows of a shard at once: W is formed once
    per block."""
    Cip, Co = _f64(C_in_pinv), _f64(C_out)
    f = _f64(f_hat)
    s = _sigma(points)
    Q = Cip @ parts.P @ Co  # (k_in, k_out)
    if parts.act is None:
        return ((s * Q) ** 2 * (f * f).sum(0)[:, None]).T
    U, V = Cip @ parts.A, parts.B @ Co  # (k_in, m), (m, k_out)
    x = f_hat @ C_in_pinv.to(f_hat.dtype)
    G = act_derivative(parts.act, x @ parts.A.to(x.dtype), points)  # (N, m)
    (N, m), (k_in, k_out) = G.shape, Q.shape
    E = torch.zeros(k_out, k_in, dtype=torch.float64, device=f.device)
    b = max(1, min(k_in, block_elements // max(1, m * k_out)))  # W: (m, b, k_out)
    rows = max(1, block_elements // (b * k_out))  # Ĵ: (rows, b, k_out)
    f2 = f * f
    for j0 in range(0, k_in, b):
        j = slice(j0, min(k_in, j0 + b))
        W = (U[j].T.unsqueeze(-1) * V.unsqueeze(1)).reshape(m, -1)  # W[:, j, i] = U_jk V_ki
        for r0 in range(0, N, rows):
            r = slice(r0, min(N, r0 + rows))
            jac = (G[r] @ W).reshape(-1, j.stop - j0, k_out) + s * Q[j]  # Ĵ_r[j, :]
            E[:, j] += torch.einsum("rjk,rj->kj", jac * jac, f2[r, j])
    return E


# --- attention: the Jacobian from its parts, never assembled whole ---------------------------


class AttentionTerms(NamedTuple):
    """The integrated Jacobian of one attention step's output features, by parts (float64):

        J[b, t, s] = δ(s = pos t) Jd[b, t] + Σ_h Ā[b, h, t, s] LVOC[h]
                     + Σ_g La[b, g, t] ⊗ ū[b, g, t, s]                    (k_left, k_out)

    ``Jd`` holds everything at the query's own position (residual, constant, queries, and the
    value and key terms there); ``Ā`` and ``ū`` are zero at it. ``g`` runs over (integration
    point, head) pairs, the point's weight folded into ``ū``; ``Ā`` is already integrated."""

    Jd: Tensor  # (B, Tq, k_left, k_out)
    A: Tensor  # (B, H, Tq, T)
    LVOC: Tensor  # (H, k_left, k_out)
    La: Tensor  # (B, G, Tq, k_left)
    u: Tensor  # (B, G, Tq, T, k_out)
    qpos: list[int]


def _attention_point(att: Attention, z: Tensor, C: Tensor, L: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, list[int]]:
    """One point's (Jd, A, LVOC, La, u, qpos) before masking, at input ``z`` (B, T, d+1).

    Per sample and head, with queries q_t, keys k_s, values v_s (biases folded), pattern A,
    head outputs o_t = Σ_s A_ts v_s, ṽ_ts = v_s − o_t and W_O' = [W_O, 0]:

    * residual and constant (s = t):  P C, P passing the residual and adding b_O;
    * values:                          A_ts · W_V W_O' C;
    * keys (through the scores):       (W_K q_t / √d_head) ⊗ (A_ts ṽ_ts W_O' C);
    * queries (s = t):                 W_Q Z_t W_O' C,  Z_t = Σ_s A_ts k_s ⊗ ṽ_ts / √d_head;

    each left-multiplied by L.
    """
    WQ, WK, WV = (_f64(w) for w in (att.W_Q, att.W_K, att.W_V))  # (H, d+1, dh)
    WO, bO = _f64(att.W_O), _f64(att.b_O)  # (H, dh, d), (d,)
    H, d1, dh = WQ.shape
    d = d1 - 1
    B, T, _ = z.shape
    OC = torch.einsum("hqd,dk->hqk", WO, C[:d])  # W_O' C: (H, dh, k)
    P = torch.eye(d1, dtype=torch.float64, device=z.device)
    P[d, :d] = bO
    LVOC = torch.einsum("ld,hdq,hqk->hlk", L, WV, OC)
    LWK, LWQ = torch.einsum("ld,hdq->hlq", L, WK), torch.einsum("ld,hdq->hlq", L, WQ)

    qpos = [T - 1] if att.last_pos_only else list(range(T))
    q = torch.einsum("bpd,hdq->bhpq", z[:, qpos], WQ)
    k = torch.einsum("bpd,hdq->bhpq", z, WK)
    v = torch.einsum("bpd,hdq->bhpq", z, WV)
    scale = 1.0 / math.sqrt(dh)
    scores = torch.einsum("bhtq,bhsq->bhts", q, k) * scale
    keys = torch.arange(T, device=z.device)
    causal = keys[None, :] <= torch.tensor(qpos, device=z.device)[:, None]
    A = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)  # (B, H, Tq, T)
    o = torch.einsum("bhts,bhsq->bhtq", A, v)
    vt = v.unsqueeze(2) - o.unsqueeze(3)  # ṽ: (B, H, Tq, T, dh)
    u = A.unsqueeze(-1) * torch.einsum("bhtsq,hqk->bhtsk", vt, OC)
    La = torch.einsum("hlq,bhtq->bhtl", LWK, q) * scale
    Z = torch.einsum("bhts,bhsq,bhtsr->bhtqr", A, k, vt) * scale
    ZOC = torch.einsum("bhtqr,hrk->bhtqk", Z, OC).permute(0, 2, 1, 3, 4)  # (B, Tq, H, dh, k)
    Jd = (LWQ.permute(1, 0, 2).reshape(L.shape[0], H * dh)
          @ ZOC.reshape(B, len(qpos), H * dh, -1)) + L @ P @ C
    own = torch.tensor(qpos, device=z.device)
    A_own = A[:, :, torch.arange(len(qpos)), own]  # (B, H, Tq)
    u_own = u[:, :, torch.arange(len(qpos)), own]  # (B, H, Tq, k)
    Jd += torch.einsum("bht,hlk->btlk", A_own, LVOC)
    Jd += torch.einsum("bhtl,bhtk->btlk", La, u_own)
    return Jd, A, LVOC, La, u, qpos


def attention_terms(att: Attention, z: Tensor, C_out: Tensor, points: list[Point],
                    left: Tensor | None = None) -> AttentionTerms:
    """:class:`AttentionTerms` of Σ_α w_α J(α z) (the whole input scaled, as in eq. 11).
    ``left`` (default the identity): C_in⁺ gives the Jacobian with respect to input features.
    The constant coordinate is an ordinary input, as in the exact path."""
    z, C = _f64(z), _f64(C_out)
    L = torch.eye(z.shape[-1], dtype=torch.float64, device=z.device) if left is None \
        else _f64(left)
    Jd = A = None
    Las, us = [], []
    for pt in points:
        jd, a, LVOC, la, u, qpos = _attention_point(att, pt.alpha * z, C, L)
        Jd = jd * pt.weight if Jd is None else Jd + jd * pt.weight
        A = a * pt.weight if A is None else A + a * pt.weight
        Las.append(la)
        us.append(u * pt.weight)
    assert Jd is not None and A is not None
    off = torch.ones(A.shape[-2:], dtype=torch.float64, device=z.device)
    off[torch.arange(len(qpos)), torch.tensor(qpos, device=z.device)] = 0.0  # s ≠ pos t
    return AttentionTerms(Jd, A * off, LVOC, torch.cat(Las, 1),
                          torch.cat(us, 1) * off[..., None], qpos)


def attention_bytes_per_sample(att: Attention, T: int, k_left: int, k_out: int) -> int:
    """Memory of the largest per-sample term (float64): Jd, or ū of all heads."""
    Tq = 1 if att.last_pos_only else T
    H = att.W_Q.shape[0]
    return 8 * Tq * max(k_left * k_out, H * T * k_out, H * T * att.W_Q.shape[2])


def m_attention(att: Attention, z: Tensor, C_out: Tensor, points: list[Point]) -> Tensor:
    """Σ_{b, t, s} J Jᵀ (d_in, d_in) from :func:`attention_terms`, never forming J whole:

        Σ Jd Jdᵀ  +  Σ_{h,h'} (Σ Ā_h Ā_h') LVOC_h LVOC_h'ᵀ  +  (VK + VKᵀ)  +  Σ_bt La W La ᵀ

    with VK = Σ_h LVOC_h Σ_{b,t,s,g} Ā_h ū_g ⊗ La_g and W[g, g'] = Σ_s ū_g · ū_g'."""
    tm = attention_terms(att, z, C_out, points)
    Jd, A, LVOC, La, u = tm.Jd, tm.A, tm.LVOC, tm.La, tm.u
    X = Jd.permute(2, 0, 1, 3).reshape(Jd.shape[2], -1)
    M = X @ X.T
    c = torch.einsum("bhts,bgts->hg", A, A)
    M += torch.einsum("hlk,hmk->lm", LVOC, torch.einsum("hg,gmk->hmk", c, LVOC))
    Wv = torch.einsum("bhts,bgtsk->bhtgk", A, u)  # Σ_s Ā_h ū_g
    R = torch.einsum("bhtgk,bgtl->hkl", Wv, La)
    VK = torch.einsum("hlk,hkm->lm", LVOC, R)
    M += VK + VK.T
    w = torch.einsum("bgtsk,bftsk->btgf", u, u)
    M += torch.einsum("bgtl,btgf,bftm->lm", La, w, La)
    return M


def edges_attention(att: Attention, f_hat: Tensor, C_in_pinv: Tensor, C_out: Tensor,
                    points: list[Point]) -> Tensor:
    """Σ_{b,t} a[b,t,j,i]², a = Σ_s f[b,s,j] Ĵ[b,t,s,j,i]; shape (k_out, k_in). ``f_hat``:
    (B, T, k_in); the Jacobian Ĵ is taken with respect to the features at ``f_hat @ C_in⁺``:

        a = f[b, pos t, j] Jd[b,t,j,i] + Σ_h (Σ_s f_bsj Ā_h) LVOC_h[j,i]
            + Σ_g La_g[j] (Σ_s f_bsj ū_g[i])"""
    Cip, f = _f64(C_in_pinv), _f64(f_hat)
    tm = attention_terms(att, f @ Cip, C_out, points, left=Cip)
    a = f[:, tm.qpos].unsqueeze(-1) * tm.Jd
    a += torch.einsum("bhtj,hji->btji", torch.einsum("bsj,bhts->bhtj", f, tm.A), tm.LVOC)
    a += torch.einsum("bgtj,bsj,bgtsi->btji", tm.La, f, tm.u)
    return (a * a).sum(dim=(0, 1)).T
