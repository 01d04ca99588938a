"""Integrated Jacobians, the Jacobian-Gram M and the interaction edges (paper eqs. 2, 11, 23-25).

Notation for one section between node layers l and l+1: input ``x`` of shape (batch, T_in, d_in),
output features ``F(x)`` of shape (batch, T_out, k_out) (the next layer's basis already applied).

Integrated Jacobian (integrated gradients along the straight path from 0 to x, the whole input
scaled, the constant coordinate included):

    J[(t, i), b, s, j] = Σ_α w_α ∂F_{b,t,i}/∂x_{b,s,j} evaluated at α x_b

with the rule's points (α, w): ``gradient`` one point α = 1 (exact for ReLU-style sections, the
paper's default); ``trapezoidal`` n intervals over [ε, 1-ε], ε = 1e-3/(n+1), end points half
weight; ``gauss-legendre`` n+1 nodes mapped to [0, 1].

Jacobian-Gram (summed here, normalised by N·T_in when reduced):

    M_raw[j, j'] += Σ_{b, t, i, s} J[(t,i), b, s, j] J[(t,i), b, s, j']

Edges, squared form without the root (paper eq. 2 with the reference's normalisation), with
``f_hat`` this layer's features and J taken with respect to them:

    E[i, j] += Σ_{b, t} ( Σ_s f_hat[b, s, j] J[(t, i), b, s, j] )²

Row ``i`` of E is an output feature of layer l+1, column ``j`` an input feature of layer l.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.func import vjp, vmap


class Point(NamedTuple):
    alpha: float
    weight: float


def integration_points(rule: str, n: int) -> list[Point]:
    """Integration points and weights on [0, 1] (see module docstring)."""
    if rule == "gradient":
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


def integrated_jacobian(fn: Callable[[Tensor], Tensor], x: Tensor, points: list[Point],
                        chunk: int = 256) -> Tensor:
    """J of shape (T_out * k_out, batch, T_in, d_in), rows ordered (t, i) with i fastest.

    ``fn`` must treat samples independently (no mixing across the batch axis); then one
    vector-Jacobian product with a one-hot cotangent on output (t, i) for every sample gives that
    row for the whole batch. Rows are computed ``chunk`` at a time with ``vmap``.
    """
    x = x.detach()
    jac: Tensor | None = None
    for pt in points:
        out, pullback = vjp(fn, pt.alpha * x)
        B, T_out, k_out = out.shape
        n_rows = T_out * k_out
        rows = []
        for r0 in range(0, n_rows, chunk):
            r1 = min(r0 + chunk, n_rows)
            cot = torch.zeros(r1 - r0, n_rows, dtype=out.dtype, device=out.device)
            cot[torch.arange(r1 - r0), torch.arange(r0, r1)] = 1.0
            cot = cot.view(r1 - r0, 1, T_out, k_out).expand(r1 - r0, B, T_out, k_out)
            rows.append(vmap(pullback)(cot)[0])
        g = torch.cat(rows, dim=0) * pt.weight
        jac = g if jac is None else jac + g
    assert jac is not None
    return jac


def m_sum(jac: Tensor) -> np.ndarray:
    """Σ_{rows, batch, T_in} J Jᵀ over the input features, in float64: (d_in, d_in)."""
    g = jac.reshape(-1, jac.shape[-1]).to(torch.float64)
    return (g.T @ g).cpu().numpy()


def edge_sum(jac_hat: Tensor, f_hat: Tensor, t_out: int) -> np.ndarray:
    """Σ_{b, t} (Σ_s f_hat J_hat)² in float64: (k_out, k_in).

    ``jac_hat``: (T_out * k_out, batch, T_in, k_in), the integrated Jacobian with respect to the
    input features; ``f_hat``: (batch, T_in, k_in), the input features themselves.
    """
    a = torch.einsum("rbsj,bsj->rbj", jac_hat.to(torch.float64), f_hat.to(torch.float64))
    a2 = (a * a).sum(dim=1)  # (T_out * k_out, k_in)
    return a2.reshape(t_out, -1, a2.shape[-1]).sum(dim=0).cpu().numpy()
