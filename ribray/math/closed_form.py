"""Closed-form Jacobian-Grams and edges of sections whose only nonlinearity is elementwise.

A section ``y = x P + act(x A) B`` (:class:`ribray.math.sequential.Parts`: an MLP with its
residual pass-through and folded biases, an affine map, a chain of identities) acts on each
position separately. Row vectors throughout; ``x`` is one row (a sample at a position), with
its constant coordinate.

Integrated Jacobian (eq. 11's integrated gradient, the whole input scaled by α, rule weights
w_α summing to σ), as the map ``dx -> dy``:

    D(x) = Σ_α w_α (P + A diag(act'(α x A)) B) = σ P + A diag(g) B,   g = Σ_α w_α act'(α x A)

With the next layer's features ``F = y C`` and ``K = C Cᵀ``, the raw Jacobian-Gram of
:func:`ribray.math.jacobian.m_stream` is Σ_rows D K Dᵀ (the Jacobian is block-diagonal over
positions). Summed over rows r with ``G`` the rows' g (N, m):

    M = N σ² P K Pᵀ + σ (A diag(Σ_r g_r) B K Pᵀ + its transpose) + A ((B K Bᵀ) ∘ GᵀG) Aᵀ

a Gram of activation derivatives instead of one backward pass per output feature.

Edges (eq. 2 squared, :func:`ribray.math.jacobian.edges_stream`) between input features
``f = x C_in`` (evaluated at ``x = f C_in⁺``) and output features ``y C_out``: with
``Q = C_in⁺ P C_out``, ``U = C_in⁺ A``, ``V = B C_out``, the Jacobian with respect to the
features at row r is ``Ĵ_r = σ Q + U diag(g_r) V`` (in_feature, out_feature), and

    E[i, j] = Σ_r ( f_rj Ĵ_r[j, i] )²

computed one block of input features j at a time as one (N, m) @ (m, b·k_out) product.

Derivatives ``act'`` come from autograd on the elementwise function itself, so they equal
what the exact path (:func:`ribray.math.jacobian.integrated_gradients`) differentiates,
including ReLU's 0 at 0.

Precision: the large products run in the model's dtype (float64 for the reference jobs,
float32 for language models, as the exact path's backward passes do); every partial sum
returned is float64 and is summed in float64 across batches and shards.
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
    """g = Σ_α w_α act'(α pre), elementwise (same shape and dtype as ``pre``)."""
    g = torch.zeros_like(pre)
    fn = ACTIVATIONS[act]
    for pt in points:
        z = (pt.alpha * pre).detach().requires_grad_(True)
        with torch.enable_grad():
            (d,) = torch.autograd.grad(fn(z).sum(), z)
        g.add_(d, alpha=pt.weight)
    return g


def _sigma(points: list[Point]) -> float:
    return float(sum(pt.weight for pt in points))


class ActMoments(NamedTuple):
    """What M of an elementwise section needs from its rows: the row count, Σ_r g_r and
    Σ_r g_r g_rᵀ (float64). Mergeable by addition, so a shard's batches are summed first and
    the fixed products with A, B, P and K are formed once per shard."""

    n: int
    g_sum: Tensor | None  # (m,)
    gram: Tensor | None  # (m, m)

    def __add__(self, other: ActMoments) -> ActMoments:  # type: ignore[override]
        if self.g_sum is None or other.g_sum is None:
            return ActMoments(self.n + other.n, None, None)
        return ActMoments(self.n + other.n, self.g_sum + other.g_sum, self.gram + other.gram)


def act_moments(parts: Parts, x: Tensor, points: list[Point]) -> ActMoments:
    """:class:`ActMoments` of rows ``x`` (N, d_in), in the model's dtype then float64."""
    if parts.act is None:
        return ActMoments(x.shape[0], None, None)
    G = act_derivative(parts.act, x @ parts.A.to(x.dtype), points)  # (N, m)
    return ActMoments(x.shape[0], _f64(G.sum(0)), _f64(G.T @ G))


def m_from_moments(parts: Parts, mom: ActMoments, C_out: Tensor, points: list[Point]
                   ) -> Tensor:
    """Σ over rows of D K Dᵀ (d_in, d_in) in float64 from the rows' :class:`ActMoments`;
    ``C_out``: (d_out, k_out) the next layer's basis."""
    P, C = parts.P, _f64(C_out)
    s = _sigma(points)
    K = C @ C.T
    PK = P @ K
    M = (mom.n * s * s) * (PK @ P.T)
    if parts.act is None or mom.g_sum is None:
        return M
    A, B = parts.A, parts.B
    BK = B @ K
    cross = (A * mom.g_sum) @ (BK @ P.T)  # A diag(Σ g) B K Pᵀ
    M += s * (cross + cross.T)
    M += (A @ ((BK @ B.T) * mom.gram)) @ A.T
    return M


def edges_closed(parts: Parts, f_hat: Tensor, C_in_pinv: Tensor, C_out: Tensor,
                 points: list[Point], block_elements: int = 1 << 18) -> Tensor:
    """Σ over rows of (f_j Ĵ[j, i])², shape (k_out, k_in), in float64. ``f_hat``: (N, k_in)
    the input features of each row; the section is evaluated at ``f_hat @ C_in_pinv``.
    Input features are taken in blocks of b, each one GEMM ``G (N, m) @ W (m, b·k_out)``
    with ``W[:, j, i] = U_jk V_ki`` (rows in chunks); ``block_elements`` bounds the size of W
    and of each chunk's product; the default keeps both within a core's share of the cache
    (larger blocks made the products memory-bound: 20% slower with two workers on two cores).
    Pass all rows of a shard at once: W is formed once per block."""
    Cip, Co = _f64(C_in_pinv), _f64(C_out)
    f = _f64(f_hat)
    s = _sigma(points)
    Q = Cip @ parts.P @ Co  # (k_in, k_out)
    if Q.numel() == 0:  # a layer that kept no feature
        return Q.T.clone()
    if parts.act is None:
        return ((s * Q) ** 2 * (f * f).sum(0)[:, None]).T
    dt = f_hat.dtype  # the product below runs in the model's dtype
    U, V = (Cip @ parts.A).to(dt), (parts.B @ Co).to(dt)  # (k_in, m), (m, k_out)
    x = f_hat @ C_in_pinv.to(dt)
    G = act_derivative(parts.act, x @ parts.A.to(dt), points)  # (N, m)
    Q, f = Q.to(dt), f.to(dt)
    (N, m), (k_in, k_out) = G.shape, Q.shape
    E = torch.zeros(k_out, k_in, dtype=torch.float64, device=f.device)
    b = max(1, min(k_in, block_elements // max(1, m * k_out)))  # W: (m, b, k_out)
    rows = max(1, block_elements // (b * k_out))  # Ĵ: (rows, b, k_out)
    for j0 in range(0, k_in, b):
        j = slice(j0, min(k_in, j0 + b))
        W = (U[j].T.unsqueeze(-1) * V.unsqueeze(1)).reshape(m, -1)  # W[:, j, i] = U_jk V_ki
        sQ = (s * Q[j]).reshape(1, -1)
        for r0 in range(0, N, rows):
            r = slice(r0, min(N, r0 + rows))
            jac = torch.addmm(sQ, G[r], W).view(-1, j.stop - j0, k_out)  # Ĵ_r[j, :]
            jac.mul_(f[r, j, None]).square_()  # (f_rj Ĵ_rji)², in place
            E[:, j] += _f64(jac.sum(0)).T
    return E


# --- attention: the Jacobian from its parts, never assembled whole ---------------------------


class AttentionTerms(NamedTuple):
    """The integrated Jacobian of one attention step's output features, by parts:

        J[b, t, s] = δ(s = pos t) (LPC + Σ_{g,s'} Lk[b,g,s'] ⊗ u[b,g,t,s'])  (residual, queries)
                     + Σ_h A[b, h, t, s] LVOC[h]                            (values)
                     + Σ_g La[b, g, t] ⊗ u[b, g, t, s]                      (keys)

    each (k_left, k_out). ``g`` runs over (integration point, head) pairs, the point's weight
    folded into ``u``; ``A`` is already integrated (a weighted sum over points). The query part
    of a query t is the sum of G·T rank-one terms (one per head, point and key), never the
    (H·dh)-wide product W_Q Z W_O' C: for the short contexts this path serves (one sample's
    terms within the budget) G·T is the smaller inner dimension."""

    LPC: Tensor  # (k_left, k_out)
    A: Tensor  # (B, H, Tq, T)
    LVOC: Tensor  # (H, k_left, k_out)
    La: Tensor  # (B, G, Tq, k_left)
    Lk: Tensor  # (B, G, T, k_left)
    u: Tensor  # (B, G, Tq, T, k_out)
    qpos: list[int]

    def own(self) -> tuple[Tensor, Tensor]:
        """A and u at each query's own position: (B, H, Tq), (B, G, Tq, k_out)."""
        t, s = torch.arange(len(self.qpos)), torch.tensor(self.qpos)
        return self.A[:, :, t, s], self.u[:, :, t, s]

    def factors(self) -> tuple[Tensor, Tensor]:
        """The query part Q[b, t] = X[b, t]ᵀ Y[b, t] as batched factors over the rows
        (b, t): X (B·Tq, G·T, k_left) (Lk, the same for every query of a sample) and
        Y (B·Tq, G·T, k_out) (u)."""
        B, G, Tq, T, k = self.u.shape
        X = self.Lk.unsqueeze(1).expand(B, Tq, G, T, -1).reshape(B * Tq, G * T, -1)
        Y = self.u.permute(0, 2, 1, 3, 4).reshape(B * Tq, G * T, k)
        return X, Y


class AttentionMaps(NamedTuple):
    """What the by-parts Jacobian of one attention step needs besides its input, formed once
    per shard (float64, then cast to the compute dtype): the folded weights, W_O' C and the
    left-multiplied maps of :class:`AttentionTerms`."""

    WQ: Tensor  # (H, d+1, dh)
    WK: Tensor
    WV: Tensor
    OC: Tensor  # W_O' C: (H, dh, k_out)
    LPC: Tensor  # (k_left, k_out)
    LVOC: Tensor  # (H, k_left, k_out)
    LWV: Tensor  # (H, k_left, dh): LVOC[h] = LWV[h] OC[h]
    LWK: Tensor  # (H, k_left, dh)
    LWQ: Tensor  # (H, k_left, dh)
    last_pos_only: bool


def attention_maps(att: Attention, C_out: Tensor, left: Tensor | None = None,
                   dtype: torch.dtype | None = None) -> AttentionMaps:
    """:class:`AttentionMaps` of ``att`` for the next layer's basis ``C_out`` (d+1, k_out) and
    ``left`` (k_left, d+1; default the identity, C_in⁺ for the edges), in ``dtype`` (default
    the step's)."""
    dt = dtype or att.W_Q.dtype
    WQ, WK, WV = (_f64(w) for w in (att.W_Q, att.W_K, att.W_V))
    WO, bO, C = _f64(att.W_O), _f64(att.b_O), _f64(C_out)
    H, d1, dh = WQ.shape
    d = d1 - 1
    L = torch.eye(d1, dtype=torch.float64, device=WQ.device) if left is None else _f64(left)
    OC = torch.einsum("hqd,dk->hqk", WO, C[:d])
    P = torch.eye(d1, dtype=torch.float64, device=WQ.device)
    P[d, :d] = bO  # the residual passes, the constant adds b_O
    return AttentionMaps(
        WQ.to(dt), WK.to(dt), WV.to(dt), OC.to(dt), (L @ P @ C).to(dt),
        torch.einsum("ld,hdq,hqk->hlk", L, WV, OC).to(dt),
        torch.einsum("ld,hdq->hlq", L, WV).to(dt),
        torch.einsum("ld,hdq->hlq", L, WK).to(dt),
        torch.einsum("ld,hdq->hlq", L, WQ).to(dt),
        att.last_pos_only)


def _attention_point(mp: AttentionMaps, z: Tensor) -> tuple[Tensor, ...]:
    """One point's (A, La, Lk, u, qpos) at input ``z`` (B, T, d+1), in the maps' dtype.

    Per sample and head, with queries q_t, keys k_s, values v_s (biases folded), pattern A,
    head outputs o_t = Σ_s A_ts v_s, ṽ_ts = v_s − o_t and W_O' = [W_O, 0]:

    * residual and constant (s = t):  P C, P passing the residual and adding b_O;
    * values:                          A_ts · W_V W_O' C;
    * keys (through the scores):       (W_K q_t / √d_head) ⊗ (A_ts ṽ_ts W_O' C);
    * queries (s = t):                 Σ_s' (W_Q k_s' / √d_head) ⊗ (A_ts' ṽ_ts' W_O' C);

    each left-multiplied by L: La = L W_K q / √d_head, Lk = L W_Q k / √d_head and
    u = A ṽ W_O' C.
    """
    H, _, dh = mp.WQ.shape
    z = z.to(mp.WQ.dtype)
    B, T, _ = z.shape
    qpos = [T - 1] if mp.last_pos_only else list(range(T))
    q = torch.einsum("bpd,hdq->bhpq", z[:, qpos], mp.WQ)
    k = torch.einsum("bpd,hdq->bhpq", z, mp.WK)
    v = torch.einsum("bpd,hdq->bhpq", z, mp.WV)
    scale = 1.0 / math.sqrt(dh)
    scores = torch.einsum("bhtq,bhsq->bhts", q, k) * scale
    keys = torch.arange(T, device=z.device)
    causal = keys[None, :] <= torch.tensor(qpos, device=z.device)[:, None]
    A = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)  # (B, H, Tq, T)
    o = torch.einsum("bhts,bhsq->bhtq", A, v)
    vt = v.unsqueeze(2) - o.unsqueeze(3)  # ṽ: (B, H, Tq, T, dh)
    u = A.unsqueeze(-1) * torch.einsum("bhtsq,hqk->bhtsk", vt, mp.OC)
    La = torch.einsum("hlq,bhtq->bhtl", mp.LWK, q) * scale
    Lk = torch.einsum("hlq,bhsq->bhsl", mp.LWQ, k) * scale
    return A, La, Lk, u, qpos


def attention_terms(mp: AttentionMaps, z: Tensor, points: list[Point]) -> AttentionTerms:
    """:class:`AttentionTerms` of Σ_α w_α J(α z) (the whole input scaled, as in eq. 11), in
    the maps' dtype. The constant coordinate is an ordinary input, as in the exact path."""
    A = None
    Las, Lks, us = [], [], []
    for pt in points:
        a, la, lk, u, qpos = _attention_point(mp, pt.alpha * z)
        if pt.weight != 1.0:
            a, u = a * pt.weight, u * pt.weight
        A = a if A is None else A + a
        Las.append(la)
        Lks.append(lk)
        us.append(u)
    assert A is not None
    LPC = mp.LPC * sum(pt.weight for pt in points)
    return AttentionTerms(LPC, A, mp.LVOC, torch.cat(Las, 1), torch.cat(Lks, 1),
                          torch.cat(us, 1), qpos)


def attention_bytes_per_sample(att: Attention, T: int, k_left: int, k_out: int) -> int:
    """Memory of the largest per-sample term: the factors and their products (heads·T rows of
    k_out, k_left or d_model per query), or their Gram (heads·T)². The edges' attributions
    (k_left by k_out per query) are formed in blocks of :data:`EDGE_BLOCK` bytes instead."""
    Tq = 1 if att.last_pos_only else T
    H, dh, itemsize = att.W_Q.shape[0], att.W_Q.shape[2], att.W_Q.element_size()
    HT = H * T
    return itemsize * Tq * max(HT * max(k_left, k_out, H * dh), HT * HT)


def _lvoc_times(mp: AttentionMaps, R: Tensor) -> Tensor:
    """Σ_h LVOC[h] R[h] (k_left, n) for R (H, k_out, n), as Σ_h LWV[h] (OC[h] R[h])."""
    return torch.einsum("hlq,hqn->ln", mp.LWV, torch.bmm(mp.OC, R))


def m_attention(mp: AttentionMaps, z: Tensor, points: list[Point]) -> Tensor:
    """Σ_{b, t, s} J Jᵀ (d_in, d_in), float64, from :func:`attention_terms`, never forming J
    at every position. With J = D δ + V + K (residual/query, value and key parts as in
    :class:`AttentionTerms`), D = LPC + Q, Q = Xᵀ Y (:meth:`AttentionTerms.factors`):

    * Σ (V + K)(V + K)ᵀ = Σ_{h,h'} (Σ A_h A_h') LVOC_h LVOC_h'ᵀ + VK + VKᵀ + Σ La U La ᵀ,
      VK = Σ_h LWV_h OC_h Σ A_h u_g ⊗ La_g,  U[g, g'] = Σ_s u_g · u_g';
    * the own position, D Dᵀ and D (V + K)ᵀ with its transpose: N LPC LPCᵀ + S + Sᵀ,
      S = Σ Q LPCᵀ + ½ Σ Q Qᵀ + Σ_h (Σ A_own,h D) LVOC_hᵀ + Σ_g (D u_own,g) ⊗ La_g.
      Every sum over queries of Q = Xᵀ Y is Xᵀ times a matrix of Y's rows, so S is one GEMM
      Xᵀ R over the stacked factors (inner dimension N·G·T) plus LPC times small sums; Q
      (k_left by k_out per query) is never formed.

    The largest products are Xᵀ R, and forming R (N·G·T rows of k_left)."""
    if mp.OC.shape[-1] == 0:  # a next layer that kept no feature
        return torch.zeros(mp.LPC.shape[0], mp.LPC.shape[0], dtype=torch.float64,
                           device=z.device)
    tm = attention_terms(mp, z, points)
    A, La, u, LPC = tm.A, tm.La, tm.u, tm.LPC
    kl = LPC.shape[0]
    M = torch.zeros(kl, kl, dtype=torch.float64, device=z.device)
    # values and keys, every position; products with LVOC[h] = LWV[h] OC[h] go through the
    # d_head-wide factors (k_left² · d_head per head, not k_left² · k_out)
    c = torch.einsum("bhts,bgts->hg", A, A)
    M += _f64(_lvoc_times(mp, torch.einsum("hg,glk->hkl", c, tm.LVOC)))  # Σ c LVOC LVOCᵀ
    Wv = torch.einsum("bhts,bgtsk->bhtgk", A, u)  # Σ_s A_h u_g
    WvO = torch.einsum("hqk,bhtgk->bhtgq", mp.OC, Wv)  # through OC_h first
    VK = _f64(torch.einsum("hlq,hqm->lm", mp.LWV, torch.einsum("bhtgq,bgtm->hqm", WvO, La)))
    M += VK + VK.T
    U = torch.einsum("bgtsk,bftsk->btgf", u, u)
    M += _f64(torch.einsum("bgtl,btgf,bftm->lm", La, U, La))
    # the own position: N LPC LPCᵀ + S + Sᵀ, S = Xᵀ R + LPC (small sums)
    X, Y = tm.factors()  # (N, G·T, k_left), (N, G·T, k_out)
    N, GT, k = X.shape[0], X.shape[1], Y.shape[2]
    A_own, u_own = tm.own()  # (B, H, Tq), (B, G, Tq, k)
    H, G, dh = A_own.shape[1], u_own.shape[1], mp.OC.shape[1]
    a = A_own.permute(0, 2, 1).reshape(N, H)  # query rows n = (b, t)
    un = u_own.permute(0, 2, 3, 1).reshape(N, k, G)
    Lan = La.permute(0, 2, 1, 3).reshape(N, G, kl)
    Yf = Y.reshape(N * GT, k)
    R = Yf @ LPC.T  # Σ Q LPCᵀ
    R.add_(torch.bmm(torch.bmm(Y, Y.transpose(1, 2)), X).view(N * GT, kl), alpha=0.5)  # ½ QQᵀ
    R += torch.bmm(torch.bmm(Y, un), Lan).view(N * GT, kl)  # Σ_g (Q u_own,g) ⊗ La_g
    # Σ_h (Σ_n a_nh Q_n) LVOC_hᵀ: Y's rows through OC_hᵀ, weighted by a_h, then LWV_hᵀ
    YO = (Yf @ mp.OC.permute(2, 0, 1).reshape(k, H * dh)).view(N, GT, H, dh)
    YO *= a[:, None, :, None]
    R.addmm_(YO.view(N * GT, H * dh), mp.LWV.permute(0, 2, 1).reshape(H * dh, kl))
    S = X.reshape(N * GT, kl).T @ R
    small = torch.einsum("h,hmk->km", a.sum(0), tm.LVOC)  # Σ_h (Σ_n a_nh) LVOC_hᵀ
    small += un.permute(1, 0, 2).reshape(k, N * G) @ Lan.reshape(N * G, kl)  # Σ u_own ⊗ La
    S += LPC @ small
    S = _f64(S)
    M += N * _f64(LPC @ LPC.T) + S + S.T
    return M


#: the bytes of one block of queries' attributions in :func:`edges_attention` (cache-sized)
EDGE_BLOCK = 2 * 2**20


def edges_attention(mp: AttentionMaps, f_hat: Tensor, C_in_pinv: Tensor,
                    points: list[Point]) -> Tensor:
    """Σ_{b,t} a[b,t,j,i]², a = Σ_s f[b,s,j] Ĵ[b,t,s,j,i]; shape (k_out, k_in), float64.
    ``f_hat``: (B, T, k_in); the Jacobian Ĵ is taken with respect to the features at
    ``f_hat @ C_in⁺``, and ``mp`` must be formed with ``left = C_in⁺``:

        a = f[b, pos t, j] LPC[j, i] + Σ_h (Σ_s f_bsj A_h) LVOC_h[j, i]
            + Σ_{g,s} (f[b, pos t, j] Lk_g,s[j] + La_g[j] f_bsj) u_g,s[i]

    the first two as one product batched over j, the last as one batched over (b, t) with
    inner dimension G·T."""
    if mp.OC.shape[-1] == 0:  # a next layer that kept no feature
        return torch.zeros(0, f_hat.shape[-1], dtype=torch.float64, device=f_hat.device)
    f = f_hat.to(mp.WQ.dtype)
    tm = attention_terms(mp, f @ C_in_pinv.to(f.dtype), points)
    B, G, Tq, T, k = tm.u.shape
    kl = f.shape[-1]
    f_own = f[:, tm.qpos]  # (B, Tq, kl)
    # keys and queries: Λ[b, t, (g, s), j] against Y[b, t, (g, s), i]
    lam = (f_own[:, :, None, None, :] * tm.Lk[:, None]
           + tm.La.permute(0, 2, 1, 3)[:, :, :, None, :] * f[:, None, None, :, :])
    _, Y = tm.factors()
    lam = lam.reshape(B * Tq, G * T, kl).transpose(1, 2)  # (B·Tq, kl, G·T)
    # values and the residual: batched over j
    F = torch.einsum("bsj,bhts->jbth", f, tm.A).reshape(kl, B * Tq, -1)
    F = torch.cat([F, f_own.permute(2, 0, 1).reshape(kl, B * Tq, 1)], dim=2)
    LV = torch.cat([tm.LVOC.permute(1, 0, 2), tm.LPC[:, None, :]], dim=1)  # (kl, H+1, k)
    # a (k_left by k_out per query) in blocks of queries that stay in cache
    E = torch.zeros(kl, k, dtype=torch.float64, device=f.device)
    step = max(1, EDGE_BLOCK // max(1, kl * k * f.element_size()))
    for r0 in range(0, B * Tq, step):
        r = slice(r0, min(B * Tq, r0 + step))
        a = torch.bmm(lam[r], Y[r])  # (rows, kl, k)
        a += torch.bmm(F[:, r], LV).permute(1, 0, 2)
        E += _f64(a.square_().sum(0))
    return E.T


# --- layer-norm halves ------------------------------------------------------------------------


class LnParts(NamedTuple):
    """A layer-norm half as per-row rank-one updates of fixed maps (row vectors, float64):

        D_r = σ P + s_r G + u_r e_vᵀ      (LnIn: s_r = 0, u_r the variance's gradient)
        D_r = σ P + s_r G + e_v w_rᵀ      (LnOut: s_r = Σ_α w_α/√(α v_r), w_r ∂y/∂v)

    ``rank_col`` tells which: True for LnIn (a column of D varies), False for LnOut (a row)."""

    P: Tensor  # (d_in, d_out)
    G: Tensor  # (d_in, d_out)
    s: Tensor  # (N,)
    vec: Tensor  # (N, d_in) for LnIn (u_r), (N, d_out) for LnOut (w_r)
    v_index: int  # e_v: the output (LnIn) or input (LnOut) variance coordinate
    rank_col: bool


def ln_parts(step, x: Tensor, points: list[Point]) -> LnParts:
    """:class:`LnParts` of a :class:`ribray.math.lm.LnIn` or ``LnOut`` step at rows ``x``
    (N, d_in); the whole input (constant, variance included) is scaled by α on the path."""
    from ribray.math.lm import LnIn, LnOut

    x = _f64(x)
    N, d_in = x.shape
    d, d_out = step.d, step.d_out
    sigma = _sigma(points)
    dev = x.device
    r = x[:, :d]
    cen = r - r.mean(-1, keepdim=True)
    P = torch.zeros(d_in, d_out, dtype=torch.float64, device=dev)
    P[-1, -1] = 1.0  # the constant
    if isinstance(step, LnIn):
        P[: d_in - 1, : d_in - 1] = torch.eye(d_in - 1, dtype=torch.float64, device=dev)
        abar = sum(pt.weight * pt.alpha for pt in points)  # ∂v(αx)/∂x = 2α(x − μ)/d
        u = torch.zeros(N, d_in, dtype=torch.float64, device=dev)
        u[:, :d] = abar * 2.0 / d * cen
        return LnParts(sigma * P, torch.zeros_like(P), torch.zeros(N, dtype=torch.float64,
                                                                   device=dev),
                       u, d_out - 2, True)
    assert isinstance(step, LnOut)
    gamma, beta = _f64(step.weight), _f64(step.bias)
    y0 = d_out - 1 - d  # first y coordinate of the output
    keep = d_in - 2  # x and carry pass through when kept
    if step.keep:
        P[:keep, :keep] = torch.eye(keep, dtype=torch.float64, device=dev)
    P[-1, y0: y0 + d] = beta
    G = torch.zeros(d_in, d_out, dtype=torch.float64, device=dev)
    cent = torch.eye(d, dtype=torch.float64, device=dev) - 1.0 / d
    G[:d, y0: y0 + d] = cent * gamma  # dy = (dx Cent) ∘ γ / √(αv)
    v = x[:, -2]
    s = sum(pt.weight / torch.sqrt(pt.alpha * v) for pt in points)
    coef = sum(pt.weight / (2.0 * math.sqrt(pt.alpha)) for pt in points) / v ** 1.5
    w = torch.zeros(N, d_out, dtype=torch.float64, device=dev)
    w[:, y0: y0 + d] = -gamma * cen * coef[:, None]
    return LnParts(sigma * P, G, s, w, d_in - 2, False)


def m_ln(lp: LnParts, C_out: Tensor) -> Tensor:
    """Σ_r D_r K D_rᵀ (d_in, d_in), float64, K = C Cᵀ: first and second moments of the
    per-row scalars and vectors against the fixed maps."""
    C = _f64(C_out)
    K = C @ C.T
    P, G, s, vec = lp.P, lp.G, lp.s, lp.vec
    N = s.shape[0]
    M = N * (P @ K @ P.T)
    PKG = P @ K @ G.T
    M += s.sum() * (PKG + PKG.T) + (s * s).sum() * (G @ K @ G.T)
    if lp.rank_col:  # D = σP + u e_vᵀ (G = 0)
        kv = P @ K[:, lp.v_index]  # P K e_v
        U = vec.sum(0)
        M += torch.outer(U, kv) + torch.outer(kv, U) + K[lp.v_index, lp.v_index] * (vec.T @ vec)
        return M
    # D = σP + s G + e_v wᵀ
    cross = P @ K @ vec.sum(0) + G @ K @ (s[:, None] * vec).sum(0)  # (d_in,)
    e = torch.zeros(P.shape[0], dtype=torch.float64, device=P.device)
    e[lp.v_index] = 1.0
    M += torch.outer(cross, e) + torch.outer(e, cross)
    M += ((vec @ K) * vec).sum() * torch.outer(e, e)
    return M


def edges_ln(lp: LnParts, f_hat: Tensor, C_in_pinv: Tensor, C_out: Tensor) -> Tensor:
    """Σ_r (f_rj Ĵ_r[j, i])², shape (k_out, k_in), float64, with Ĵ_r = C_in⁺ D_r C_out
    expanded: every term a GEMM over rows of N × k_in by N × k_out."""
    Cip, Co, f = _f64(C_in_pinv), _f64(C_out), _f64(f_hat)
    f2 = f * f  # (N, k_in)
    Q, Gh = Cip @ lp.P @ Co, Cip @ lp.G @ Co  # (k_in, k_out)
    s = lp.s
    F0, F1, F2 = f2.sum(0), (f2 * s[:, None]).sum(0), (f2 * (s * s)[:, None]).sum(0)
    E = Q * Q * F0[:, None] + 2 * Q * Gh * F1[:, None] + Gh * Gh * F2[:, None]
    if lp.rank_col:  # Ĵ_r = Q + a_r bᵀ, a_r = C_in⁺ u_r, b = C_out[v]
        a, b = lp.vec @ Cip.T, Co[lp.v_index]  # (N, k_in), (k_out,)
        E += 2 * Q * b * (f2 * a).sum(0)[:, None] + b * b * (f2 * a * a).sum(0)[:, None]
        return E.T
    # Ĵ_r = Q + s_r Ĝ + a b_rᵀ, a = C_in⁺[:, v], b_r = C_outᵀ w_r
    a, b = Cip[:, lp.v_index], lp.vec @ Co  # (k_in,), (N, k_out)
    E += 2 * a[:, None] * (Q * (f2.T @ b) + Gh * ((f2 * s[:, None]).T @ b))
    E += (a * a)[:, None] * (f2.T @ (b * b))
    return E.T
