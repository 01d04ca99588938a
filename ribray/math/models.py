"""The models ribray analyses, in their ordinary form (for training and as the reference).

Two families:

* ``Transformer``: a TransformerLens-style decoder without layer norm, as used for modular
  addition (paper section 3.1: 1 block, d_model 128, 4 heads of 32, MLP 512 ReLU, vocab 114,
  n_ctx 3). Parameter names and shapes follow TransformerLens' ``HookedTransformer`` state dict,
  so the reference checkpoints load unchanged.
* ``MLP``: a stack of affine layers with an elementwise activation after every layer but the
  last (paper section 3.2). Parameters ``layers.{i}.W`` of shape (in, out) and ``layers.{i}.b``,
  as in the reference MLP checkpoint.

The sequential form used by LIB lives in :mod:`ribray.math.sequential`; it is built from these
weights and tested to reproduce these models' logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

ACTIVATIONS = {"relu": torch.relu, "gelu": nn.functional.gelu, "linear": lambda x: x,
               # GPT-2's "gelu_new": 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))
               "gelu_tanh": lambda x: nn.functional.gelu(x, approximate="tanh")}


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a :class:`Transformer` (TransformerLens names)."""

    d_vocab: int = 114
    n_ctx: int = 3
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    n_layers: int = 1
    act_fn: str = "relu"

    def to_dict(self) -> dict:
        return asdict(self)


class Transformer(nn.Module):
    """Decoder-only transformer without layer norm, TransformerLens parameter layout.

    forward(tokens: (batch, pos) int64) -> logits (batch, pos, d_vocab).
    """

    def __init__(self, cfg: TransformerConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        if cfg.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn must be one of {sorted(ACTIVATIONS)}, got {cfg.act_fn!r}")
        self.cfg = cfg
        d, h, k, m, v = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab

        def p(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=dtype))

        self.W_E, self.W_pos = p(v, d), p(cfg.n_ctx, d)
        self.blocks = nn.ModuleList()
        for _ in range(cfg.n_layers):
            blk = nn.Module()
            blk.W_Q, blk.W_K, blk.W_V = p(h, d, k), p(h, d, k), p(h, d, k)
            blk.b_Q, blk.b_K, blk.b_V = p(h, k), p(h, k), p(h, k)
            blk.W_O, blk.b_O = p(h, k, d), p(d)
            blk.W_in, blk.b_in = p(d, m), p(m)
            blk.W_out, blk.b_out = p(m, d), p(d)
            self.blocks.append(blk)
        self.W_U, self.b_U = p(d, v), p(v)

    def init_weights(self, generator: torch.Generator) -> None:
        """Normal(0, 1/sqrt(fan_in)) weights, zero biases (used by ``ribray train``)."""
        for name, prm in self.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                continue
            fan_in = self.cfg.d_model if not name.endswith("W_out") else self.cfg.d_mlp
            if name.endswith("W_O"):
                fan_in = self.cfg.n_heads * self.cfg.d_head
            with torch.no_grad():
                prm.copy_(torch.randn(prm.shape, generator=generator, dtype=prm.dtype))
                prm.mul_(1.0 / math.sqrt(fan_in))

    def forward(self, tokens: Tensor, last_pos_only: bool = False) -> Tensor:
        """Logits (batch, pos, d_vocab); with ``last_pos_only`` only the last position's
        (batch, 1, d_vocab), cutting the other positions right after the last attention."""
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.W_E[tokens] + self.W_pos[pos]  # (batch, pos, d_model)
        act = ACTIVATIONS[self.cfg.act_fn]
        for i, blk in enumerate(self.blocks):
            cut = last_pos_only and i == len(self.blocks) - 1
            a = attention(x, blk.W_Q, blk.b_Q, blk.W_K, blk.b_K, blk.W_V, blk.b_V, blk.W_O,
                          blk.b_O, last_query_only=cut)
            x = (x[:, -1:] if cut else x) + a
            x = x + act(x @ blk.W_in + blk.b_in) @ blk.W_out + blk.b_out
        return x @ self.W_U + self.b_U

    # -- TransformerLens state-dict names -------------------------------------------------
    def tl_state_dict(self) -> dict[str, Tensor]:
        """This model's parameters under TransformerLens ``HookedTransformer`` names."""
        sd = {"embed.W_E": self.W_E, "pos_embed.W_pos": self.W_pos,
              "unembed.W_U": self.W_U, "unembed.b_U": self.b_U}
        for i, blk in enumerate(self.blocks):
            for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
                sd[f"blocks.{i}.attn.{n}"] = getattr(blk, n)
            for n in ("W_in", "b_in", "W_out", "b_out"):
                sd[f"blocks.{i}.mlp.{n}"] = getattr(blk, n)
        return {k: v.detach().clone() for k, v in sd.items()}

    def load_tl_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Load TransformerLens names; shapes must match exactly (ValueError otherwise)."""
        own = self.tl_state_dict()
        missing = sorted(set(own) - set(sd))
        if missing:
            raise ValueError(f"missing parameters {missing[:4]}")
        for k, ref in own.items():
            if tuple(sd[k].shape) != tuple(ref.shape):
                raise ValueError(f"parameter {k} has shape {tuple(sd[k].shape)}, "
                                 f"expected {tuple(ref.shape)}")
        with torch.no_grad():
            self.W_E.copy_(sd["embed.W_E"])
            self.W_pos.copy_(sd["pos_embed.W_pos"])
            self.W_U.copy_(sd["unembed.W_U"])
            self.b_U.copy_(sd["unembed.b_U"])
            for i, blk in enumerate(self.blocks):
                for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
                    getattr(blk, n).copy_(sd[f"blocks.{i}.attn.{n}"])
                for n in ("W_in", "b_in", "W_out", "b_out"):
                    getattr(blk, n).copy_(sd[f"blocks.{i}.mlp.{n}"])


def attention(x: Tensor, W_Q: Tensor, b_Q: Tensor, W_K: Tensor, b_K: Tensor, W_V: Tensor,
              b_V: Tensor, W_O: Tensor, b_O: Tensor, last_query_only: bool = False) -> Tensor:
    """Causal multi-head attention, TransformerLens conventions.

    x: (batch, pos, d_model); W_Q/W_K/W_V: (heads, d_model, d_head); W_O: (heads, d_head,
    d_model). Scores are scaled by 1/sqrt(d_head); key positions after the query are masked.
    Returns the attention output (batch, pos, d_model) without the residual, or only the last
    query position's (batch, 1, d_model) with ``last_query_only``.
    """
    q = torch.einsum("bpd,hdk->bphk", x[:, -1:] if last_query_only else x, W_Q) + b_Q
    k = torch.einsum("bpd,hdk->bphk", x, W_K) + b_K
    v = torch.einsum("bpd,hdk->bphk", x, W_V) + b_V
    return attend(q, k, v, W_O) + b_O


def attend(q: Tensor, k: Tensor, v: Tensor, W_O: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(d_head), causal) v W_O summed over heads.

    q: (b, n_q, h, d_head) for the last n_q positions; k, v: (b, pos, h, d_head).
    """
    n_q, n_pos, d_head = q.shape[1], k.shape[1], q.shape[-1]
    scores = torch.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(d_head)
    # query i (of the last n_q positions) sees keys up to its own position
    causal = torch.ones(n_q, n_pos, dtype=torch.bool, device=q.device).tril(n_pos - n_q)
    scores = scores.masked_fill(~causal, float("-inf"))
    pattern = torch.softmax(scores, dim=-1)
    z = torch.einsum("bhqs,bshk->bqhk", pattern, v)
    return torch.einsum("bqhk,hkd->bqd", z, W_O)


class MLP(nn.Module):
    """Affine layers with an activation after all but the last: forward(x: (batch, in))."""

    def __init__(self, sizes: list[int], act_fn: str = "relu", dtype: torch.dtype = torch.float32):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError("an MLP needs at least an input and an output size")
        if act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn must be one of {sorted(ACTIVATIONS)}, got {act_fn!r}")
        self.sizes, self.act_fn = list(sizes), act_fn
        self.layers = nn.ModuleList()
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layer = nn.Module()
            layer.W = nn.Parameter(torch.zeros(n_in, n_out, dtype=dtype))
            layer.b = nn.Parameter(torch.zeros(n_out, dtype=dtype))
            self.layers.append(layer)

    def init_weights(self, generator: torch.Generator) -> None:
        """Kaiming-uniform-like weights, zero biases."""
        for layer in self.layers:
            bound = 1.0 / math.sqrt(layer.W.shape[0])
            with torch.no_grad():
                u = torch.rand(layer.W.shape, generator=generator, dtype=layer.W.dtype)
                layer.W.copy_((2 * u - 1) * bound * math.sqrt(3.0))
                layer.b.zero_()

    def forward(self, x: Tensor) -> Tensor:
        act = ACTIVATIONS[self.act_fn]
        for i, layer in enumerate(self.layers):
            x = x @ layer.W + layer.b
            if i < len(self.layers) - 1:
                x = act(x)
        return x
