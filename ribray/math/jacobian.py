"""Integrated Jacobians, the Jacobian-Gram M and the interaction edges (paper eqs. 2, 11, 23-25).

Notation for one section between node layers l and l+1: input ``x`` of shape (batch, T_in, d_in),
output features ``F(x)`` of shape (batch, T_out, k_out) (the next layer's basis already applied).

Integrated Jacobian (integrated gradients along the straight path from 0 to x, the whole input
scaled, the constant coordinate included):

    J[t, i, b, s, j] = Σ_α w_α ∂F_{b,t,i}/∂x_{b,s,j} evaluated at α x_b

with the rule's points (α, w): ``gradient`` one point α = 1 (exact for ReLU-style sections, the
paper's default); ``trapezoidal`` n intervals over [ε, 1-ε], ε = 1e-3/(n+1), end points half
weight; ``gauss-legendre`` n+1 nodes mapped to [0, 1].

Jacobian-Gram (summed here, normalised by N·T_in when reduced):

    M_raw[j, j'] += Σ_{b, t, i, s} J[t, i, b, s, j] J[t, i, b, s, j']

Edges, squared form without the root (paper eq. 2 with the reference's normalisation), with
``f_hat`` this layer's features and J taken with respect to them:

    E[i, j] += Σ_{b, t} ( Σ_s f_hat[b, s, j] J[t, i, b, s, j] )²

Row ``i`` of E is an output feature of layer l+1, column ``j`` an input feature of layer l.

With R stochastic sources the directions are (r, i) instead of (t, i); the ``*_by_source``
streams also return each source's own sum (R, ...), whose spread over r estimates the error
of the sources' mean (paper appendix C; :func:`ribray.math.stability.source_error`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class Point(NamedTuple):
    alpha: float
    weight: float


def integration_points(rule: str, n: int) -> list[Point]:
    """Integration points and weights on [0, 1] (see module docstring)."""
    if rule == "gradient":
        if n != 0:
            raise ValueError("rule 'gradient' takes n = 0 (one point at alpha = 1)")
        return [Point(1.0, 1.0)]
    if rule == "trapezoidal":
        if n == 0:
            return [Point(0.5, 1.0)]
        eps = 1e-3 / (n + 1)
        alphas = np.linspace(eps, 1 - eps, n + 1)
        weights = np.full(n + 1, 1.0 / n)
        weights[[0, -1]] /= 2
        return [Point(float(a), float(w)) for a, w in zip(alphas, weights)]
    if rule == "gauss-legendre":
        x, w = np.polynomial.legendre.leggauss(n + 1)
        return [Point(float((a + 1) / 2), float(b / 2)) for a, b in zip(x, w)]
    raise ValueError(f"unknown integration rule {rule!r}")


def source_signs(seed: int, indices: Tensor, r: int, t_out: int) -> Tensor:
    """Stochastic sources (paper appendix C): ±1 of shape (len(indices), r, t_out), each
    sample's drawn from its own generator seeded by (``seed``, the sample's index in the whole
    data set), so they do not depend on how samples are sharded or batched."""
    out = torch.empty(len(indices), r, t_out)
    for n, i in enumerate(indices.tolist()):
        g = torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + int(i)) % (1 << 63))
        out[n] = torch.randint(0, 2, (r, t_out), generator=g) * 2.0 - 1.0
    return out


def integrated_gradients(fn: Callable[[Tensor], Tensor], x: Tensor, points: list[Point],
                         signs: Tensor | None = None) -> Iterator[Tensor]:
    """The integrated Jacobian one output direction at a time: for each output position t and
    feature i (t outer), the gradient ``J[t, i]`` (batch, T_in, d_in), summed over the
    integration points. Only one gradient lives at a time (plus one forward graph per point),
    so the memory does not grow with T_out · k_out.

    With stochastic ``signs`` (batch, R, T_out) the output positions are summed against
    them instead of kept apart (paper eqs. 23-25): the directions are (r, i),
    ``J[r, i] = Σ_t φ[b, r, t] ∂F[b, t, i]/∂x``, R·k_out backward passes instead of
    T_out·k_out. Since E[φ_t φ_t'] = δ_tt', sums of products of J over r, divided by R, are
    unbiased for the exact sums over t.

    ``fn`` must treat samples independently (no mixing across the batch axis); then one
    backward pass of ``Σ_b F[b, t, i]`` gives J[t, i] for the whole batch at once. On the CPU
    this loop was 1.4-4x faster than ``vmap`` over one-hot cotangents on the modular-addition
    sections (512 samples, float64, one thread).
    """
    graphs = []
    for pt in points:
        xa = (pt.alpha * x.detach()).requires_grad_(True)
        with torch.enable_grad():
            out = fn(xa)
            if signs is not None:
                out = torch.einsum("bti,brt->bri", out,
                                   signs.to(device=out.device, dtype=out.dtype))
        graphs.append((pt.weight, xa, out))
    _, lead, k_out = graphs[0][2].shape
    for t in range(lead):
        for i in range(k_out):
            g = None
            for w, xa, out in graphs:
                (gi,) = torch.autograd.grad(out[:, t, i].sum(), xa, retain_graph=True)
                g = gi * w if g is None else g.add_(gi, alpha=w)
            assert g is not None
            yield g


class _Gram:
    """Σ XᵀX (float64) over blocks of rows added one at a time, in GEMMs of about
    ``chunk_rows`` rows (the buffered blocks are concatenated, then multiplied)."""

    def __init__(self, chunk_rows: int) -> None:
        self.chunk_rows = chunk_rows
        self.M: Tensor | None = None
        self.buf: list[Tensor] = []
        self.rows = 0

    def add(self, rows: Tensor) -> None:
        self.buf.append(rows)
        self.rows += rows.shape[0]
        if self.rows >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            X = torch.cat(self.buf)
            part = X.T @ X
            self.M = part if self.M is None else self.M + part
            self.buf, self.rows = [], 0

    def result(self) -> np.ndarray | None:
        self.flush()
        return None if self.M is None else self.M.cpu().numpy()


def _rows(g: Tensor) -> Tensor:
    return g.reshape(-1, g.shape[-1]).to(torch.float64)


def m_stream(grads: Iterable[Tensor], chunk_rows: int = 1 << 18) -> np.ndarray | None:
    """Σ over directions, samples and input positions of g gᵀ over the input features
    (float64; None for no directions), in GEMMs of about ``chunk_rows`` rows."""
    acc = _Gram(chunk_rows)
    for g in grads:
        acc.add(_rows(g))
    return acc.result()


def m_stream_by_source(grads: Iterable[Tensor], r: int, k_out: int,
                       chunk_rows: int = 1 << 18) -> tuple[np.ndarray | None, np.ndarray | None]:
    """:func:`m_stream` of ``r`` · ``k_out`` directions that come in ``r`` consecutive groups
    of ``k_out``, one group per stochastic source (r outer, output feature i inner, as
    :func:`integrated_gradients` yields them with signs), and the same sum per group:
    (r, d, d), each source's own sum (not divided by r). The total is the sum of the groups'
    (in r order: one GEMM per row, equal to :func:`m_stream`'s up to round-off). (None, None)
    for no directions."""
    group, per, n = _Gram(chunk_rows), [], 0
    for g in grads:
        group.add(_rows(g))
        n += 1
        if n % k_out == 0:
            per.append(group.result())
            group = _Gram(chunk_rows)
    if n != r * k_out:
        raise ValueError(f"{n} directions, expected {r} sources x {k_out} features")
    if not per or per[0] is None:
        return None, None
    stack = np.stack(per)
    return stack.sum(axis=0), stack


def edges_stream(grads: Iterable[Tensor], f_hat: Tensor, k_out: int) -> np.ndarray:
    """Σ_{b, t} (Σ_s f_hat J)² (k_out, k_in) in float64 from the directions of
    :func:`integrated_gradients` (t or r outer, output feature i inner), taken with respect to
    the input features ``f_hat`` (batch, T_in, k_in)."""
    f = f_hat.to(torch.float64)
    E = torch.zeros(k_out, f.shape[-1], dtype=torch.float64, device=f.device)
    for n, g in enumerate(grads):
        E[n % k_out] += _edge_terms(f, g)
    return E.cpu().numpy()


def edges_stream_by_source(grads: Iterable[Tensor], f_hat: Tensor, r: int, k_out: int
                           ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`edges_stream` (bit for bit) of ``r`` · ``k_out`` directions, and the same sum
    per stochastic source (the directions' outer index): (r, k_out, k_in), each source's own
    sum (not divided by r)."""
    f = f_hat.to(torch.float64)
    E = torch.zeros(k_out, f.shape[-1], dtype=torch.float64, device=f.device)
    per = torch.zeros((r, *E.shape), dtype=torch.float64, device=f.device)
    n = 0
    for n, g in enumerate(grads, start=1):
        sq = _edge_terms(f, g)
        E[(n - 1) % k_out] += sq
        per[(n - 1) // k_out, (n - 1) % k_out] += sq
    if n != r * k_out:
        raise ValueError(f"{n} directions, expected {r} sources x {k_out} features")
    return E.cpu().numpy(), per.cpu().numpy()


def _edge_terms(f: Tensor, g: Tensor) -> Tensor:
    """Σ_b (Σ_s f g)², (k_in,) in float64, of one direction's gradient ``g``."""
    a = (f * g.to(torch.float64)).sum(dim=1)  # (batch, k_in)
    return (a * a).sum(dim=0)
