"""Steps of language models with layer norm (GPT-2, GPT-Neo, GPT-NeoX) in sequential form.

Node layers of block ``b`` (paper appendix A.4), every one ending in the constant 1, ``x`` the
residual stream of width d:

    ln1.b       (x, 1)               block input
    ln1_out.b   (x, v, 1)            layer norm "in": the variance v = mean((x − μ)²) + ε
                                     appended as its own feature
    attn_in.b   (x, y, 1)            layer norm "out": y = γ ∘ (x − μ) / √v + β
    ln2.b       (x', 1)              x' = x + attention(y) (serial blocks)
                (x, a, 1)            a = attention(y), carried beside x (parallel blocks, NeoX)
    ln2_out.b   (x', v, 1)  or (x, a, v, 1)
    mlp_in.b    (x', y, 1)  or (x, a, y, 1)
    mlp_out.b   (x'', h, 1)          h = act(y W_in + b_in); x'' = x' (serial) or x + a
    ln1.{b+1}   (x'' + h W_out + b_out, 1)

then ``ln_final`` (x, 1), ``ln_final_out`` (x, v, 1), ``unembed`` (y, 1) and ``output`` (the
logits). The variance feature sits at raw index width − 2 of the ``*_out`` layers
(:func:`variance_index`); the bases keep it isolated, like the constant.

Biases are folded onto the constant, as everywhere in :mod:`ribray.math.sequential`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ribray.math.models import ACTIVATIONS
from ribray.math.sequential import Parts, SequentialModel, Step

variance_index = SequentialModel.variance_index


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=False)


class LnIn(Step):
    """(x, carry, 1) -> (x, carry, v, 1) with v = mean((x − μ)²) + ε over the first d
    coordinates (x); ``carry`` (the attention output of a parallel block) passes."""

    def __init__(self, in_name: str, d_in: int, d: int, eps: float):
        super().__init__(in_name, d_in, d_in + 1)
        self.d, self.eps = d, eps

    def forward(self, x: Tensor) -> Tensor:
        r = x[..., : self.d]
        v = (r - r.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + self.eps
        return torch.cat([x[..., :-1], v, x[..., -1:]], dim=-1)


class LnOut(Step):
    """(x, carry, v, 1) -> (x, carry, y, 1) with y = γ ∘ (x − μ)/√v + β (β read from the
    constant). With ``keep=False`` (the final layer norm) only (y, 1) is returned."""

    def __init__(self, in_name: str, d_in: int, d: int, weight: Tensor, bias: Tensor,
                 keep: bool = True):
        super().__init__(in_name, d_in, (d_in + d - 1 if keep else d + 1))
        self.d, self.keep = d, keep
        self.weight, self.bias = _frozen(weight), _frozen(bias)

    def forward(self, x: Tensor) -> Tensor:
        r, v, c = x[..., : self.d], x[..., -2:-1], x[..., -1:]
        y = (r - r.mean(-1, keepdim=True)) / torch.sqrt(v) * self.weight + c * self.bias
        return torch.cat([x[..., :-2], y, c] if self.keep else [y, c], dim=-1)


def rotary_tables(n_ctx: int, dims: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin (n_ctx, dims) of rotary embeddings, the frequencies in float32 and then
    cast, as Hugging Face's GPT-NeoX computes them (so float64 models match it exactly)."""
    inv = 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims))
    freqs = torch.arange(n_ctx, dtype=torch.float32)[:, None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` dims of t (b, pos, heads, dh)."""
    n = cos.shape[-1]
    rot, rest = t[..., :n], t[..., n:]
    half = torch.cat([-rot[..., n // 2:], rot[..., : n // 2]], dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([rot * c + half * s, rest], dim=-1)


class LmAttention(Step):
    """(x, y, 1) -> (x + attention(y), 1), or (x, attention(y), 1) in a parallel block.

    Causal multi-head attention on y with folded q/k/v biases (W_*: (heads, d + 1, d_head), the
    bias in the last row), scores scaled by ``scale`` (1/√d_head for GPT-2 and NeoX, 1 for
    GPT-Neo), optionally a local window (a query at t sees keys t − window < s ≤ t) and rotary
    embeddings on the first ``rotary`` dims of queries and keys.
    """

    def __init__(self, in_name: str, d: int, W_Q: Tensor, W_K: Tensor, W_V: Tensor,
                 W_O: Tensor, b_O: Tensor, scale: float, window: int | None = None,
                 rotary: tuple[Tensor, Tensor] | None = None, parallel: bool = False):
        super().__init__(in_name, 2 * d + 1, (2 * d + 1) if parallel else d + 1)
        self.d, self.scale, self.window, self.parallel = d, scale, window, parallel
        self.W_Q, self.W_K, self.W_V = _frozen(W_Q), _frozen(W_K), _frozen(W_V)
        self.W_O, self.b_O = _frozen(W_O), _frozen(b_O)
        self.cos = _frozen(rotary[0]) if rotary is not None else None
        self.sin = _frozen(rotary[1]) if rotary is not None else None

    def mask(self, T: int, device: torch.device) -> Tensor:
        t = torch.arange(T, device=device)
        allowed = t[None, :] <= t[:, None]
        if self.window is not None:
            allowed &= t[None, :] > t[:, None] - self.window
        return allowed

    def forward(self, x: Tensor) -> Tensor:
        d, T = self.d, x.shape[1]
        resid, yc = x[..., :d], x[..., d:]  # yc: (y, 1)
        q = torch.einsum("bpd,hdk->bphk", yc, self.W_Q)
        k = torch.einsum("bpd,hdk->bphk", yc, self.W_K)
        v = torch.einsum("bpd,hdk->bphk", yc, self.W_V)
        if self.cos is not None:
            q, k = _rotate(q, self.cos[:T], self.sin[:T]), _rotate(k, self.cos[:T], self.sin[:T])
        scores = torch.einsum("bqhk,bshk->bhqs", q, k) * self.scale
        scores = scores.masked_fill(~self.mask(T, x.device), float("-inf"))
        z = torch.einsum("bhqs,bshk->bqhk", torch.softmax(scores, dim=-1), v)
        out = torch.einsum("bqhk,hkd->bqd", z, self.W_O) + x[..., -1:] * self.b_O
        if self.parallel:
            return torch.cat([resid, out, x[..., -1:]], dim=-1)
        return torch.cat([resid + out, x[..., -1:]], dim=-1)


class LmMlpIn(Step):
    """(x, [a,] y, 1) -> (x [+ a], act(y W_in + b_in), 1): the MLP's hidden layer, the residual
    (and a parallel block's attention output, added here) passed beside it."""

    def __init__(self, in_name: str, d: int, W_in: Tensor, b_in: Tensor, act: str,
                 parallel: bool = False):
        m = W_in.shape[1]
        super().__init__(in_name, (3 if parallel else 2) * d + 1, d + m + 1)
        self.d, self.act, self.parallel = d, act, parallel
        self.W = _frozen(torch.cat([W_in, b_in.unsqueeze(0)], dim=0))  # (d + 1, m)

    def forward(self, x: Tensor) -> Tensor:
        d = self.d
        resid = x[..., :d] + x[..., d: 2 * d] if self.parallel else x[..., :d]
        h = ACTIVATIONS[self.act](x[..., -d - 1:] @ self.W)
        return torch.cat([resid, h, x[..., -1:]], dim=-1)

    def parts(self) -> Parts:
        """x (P) and act(x A) (B) as in :class:`ribray.math.sequential.Parts`."""
        W = self.W.detach().double()
        d, m = self.d, W.shape[1]
        P = torch.zeros(self.d_in, self.d_out, dtype=W.dtype, device=W.device)
        eye = torch.eye(d, dtype=W.dtype, device=W.device)
        P[:d, :d] = eye
        if self.parallel:
            P[d: 2 * d, :d] = eye
        P[-1, -1] = 1.0
        A = torch.zeros(self.d_in, m, dtype=W.dtype, device=W.device)
        A[-d - 1:] = W  # y and the constant
        B = torch.zeros(m, self.d_out, dtype=W.dtype, device=W.device)
        B[:, d: d + m] = torch.eye(m, dtype=W.dtype, device=W.device)
        return Parts(P, A, B, self.act)
