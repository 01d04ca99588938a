"""Models in sequential form (paper appendix A.4-A.5).

A model is an input map followed by an ordered list of *steps*. Each step reads one flat
activation tensor ``x`` of shape (batch, pos, d_in) and returns the next one. The input of a step
is a candidate *node layer*, named after the step (``ln1.0``, ``attn_in.0``, ..., ``unembed``);
the model's final output is the node layer ``output``. A *section* between two chosen node layers
is the composition of the steps between them.

Conventions (match the reference implementation, see docs/algorithm.md):

* Every node layer except ``output`` ends in a constant coordinate equal to 1: biases are folded
  in as weights on that coordinate (``x_aug @ [[W], [b]] == x @ W + b``), and each step passes it
  through unchanged. Gradients with respect to it are gradients with respect to the biases.
* The residual stream is carried inside each node layer: a transformer step's input is
  ``(residual, ..., 1)`` and its output is the next ``(residual, ..., 1)``.
* Transformer node layers (block ``b``): ``ln1.b`` block input; ``ln1_out.b`` the output of
  layer norm's "in" half; ``attn_in.b`` the attention's input; ``ln2.b`` the residual after
  attention; ``ln2_out.b``; ``mlp_in.b`` the MLP's input; ``mlp_out.b`` the residual together with
  the MLP's hidden activations (input to its output projection); then ``unembed`` and ``output``.
  For models without layer norm, ``ln1.b``, ``ln1_out.b`` and ``attn_in.b`` hold the same
  ``(residual, 1)``, and likewise ``ln2.b``, ``ln2_out.b``, ``mlp_in.b``.
* MLP node layers: ``layers.{i}`` is the input to affine layer ``i`` (with the constant), then
  ``output``.
* Shapes are always (batch, pos, features); an MLP has one position.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ribray.math.models import ACTIVATIONS, MLP, Transformer, attend


def fold_bias(W: Tensor, b: Tensor) -> Tensor:
    """Affine (W: (in, out), b: (out,)) -> W_aug (in + 1, out) with x_aug @ W_aug = x @ W + b."""
    return torch.cat([W, b.unsqueeze(0)], dim=0)


def append_const(x: Tensor) -> Tensor:
    """(…, d) -> (…, d + 1) with a constant-1 last coordinate."""
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)


#: node layers holding a layer norm's variance as a feature (see ribray.math.lm)
LN_OUT_LAYERS = ("ln1_out", "ln2_out", "ln_final_out")


class Parts(NamedTuple):
    """A per-position map ``y = x P + act(x A) B`` with ``act`` elementwise (row vectors,
    constants folded): P (d_in, d_out); A (d_in, m) and B (m, d_out), both None when the map is
    affine (``act`` None). Composable while at most one activation is involved
    (:func:`compose`); the closed-form Jacobian-Grams of :mod:`ribray.math.closed_form` use it."""

    P: Tensor
    A: Tensor | None = None
    B: Tensor | None = None
    act: str | None = None


def compose(first: Parts, then: Parts) -> Parts | None:
    """``then ∘ first`` as Parts, or None when both carry an activation."""
    if then.act is None:  # y2 = x P1 P2 + act1(x A1) B1 P2
        B = first.B @ then.P if first.B is not None else None
        return Parts(first.P @ then.P, first.A, B, first.act)
    if first.act is None:  # y2 = x P1 P2 + act2(x P1 A2) B2
        return Parts(first.P @ then.P, first.P @ then.A, then.B, then.act)
    return None


def _eye(n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def _zeros(r: int, c: int, like: Tensor) -> Tensor:
    return torch.zeros(r, c, dtype=like.dtype, device=like.device)


class Step(nn.Module):
    """One step of a sequential model; ``in_name`` is the node layer it reads."""

    in_name: str
    d_in: int  # width of the input node layer, constant included
    d_out: int

    def __init__(self, in_name: str, d_in: int, d_out: int):
        super().__init__()
        self.in_name, self.d_in, self.d_out = in_name, d_in, d_out

    def parts(self) -> Parts | None:
        """This step as ``x -> x P + act(x A) B`` (per position), or None when it mixes
        positions or is not of that form (attention)."""
        return None


class Identity(Step):
    """A layer-norm half of a model without layer norm: the node layer is passed on as is."""

    def __init__(self, in_name: str, d: int):
        super().__init__(in_name, d, d)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def parts(self) -> Parts:
        return Parts(torch.eye(self.d_in, dtype=torch.float64))


class Attention(Step):
    """(residual, 1) -> (residual + attention(residual), 1), biases folded.

    With ``last_pos_only`` the other positions are dropped right after the residual add (the
    modular-addition convention: only the last position reaches the output).
    """

    def __init__(self, in_name: str, W_Q: Tensor, b_Q: Tensor, W_K: Tensor, b_K: Tensor,
                 W_V: Tensor, b_V: Tensor, W_O: Tensor, b_O: Tensor, last_pos_only: bool):
        d = W_Q.shape[1]
        super().__init__(in_name, d + 1, d + 1)
        # (heads, d_model + 1, d_head): the bias is the row read by the constant coordinate
        self.W_Q = nn.Parameter(torch.cat([W_Q, b_Q.unsqueeze(1)], dim=1), requires_grad=False)
        self.W_K = nn.Parameter(torch.cat([W_K, b_K.unsqueeze(1)], dim=1), requires_grad=False)
        self.W_V = nn.Parameter(torch.cat([W_V, b_V.unsqueeze(1)], dim=1), requires_grad=False)
        self.W_O = nn.Parameter(W_O.clone(), requires_grad=False)  # (heads, d_head, d_model)
        self.b_O = nn.Parameter(b_O.clone(), requires_grad=False)
        self.last_pos_only = last_pos_only

    def forward(self, x: Tensor) -> Tensor:
        # with last_pos_only, queries (and the residual) are needed at the last position only
        xq = x[:, -1:] if self.last_pos_only else x
        resid, const = xq[..., :-1], xq[..., -1:]
        q = torch.einsum("bpd,hdk->bphk", xq, self.W_Q)
        k = torch.einsum("bpd,hdk->bphk", x, self.W_K)
        v = torch.einsum("bpd,hdk->bphk", x, self.W_V)
        resid = resid + attend(q, k, v, self.W_O) + const * self.b_O
        return torch.cat([resid, const], dim=-1)


class MlpIn(Step):
    """(residual, 1) -> (residual, act(residual @ W_in + b_in), 1)."""

    def __init__(self, in_name: str, W_in: Tensor, b_in: Tensor, act_fn: str):
        d, m = W_in.shape
        super().__init__(in_name, d + 1, d + m + 1)
        self.W = nn.Parameter(fold_bias(W_in, b_in), requires_grad=False)
        self.act_fn = act_fn

    def forward(self, x: Tensor) -> Tensor:
        h = ACTIVATIONS[self.act_fn](x @ self.W)
        return torch.cat([x[..., :-1], h, x[..., -1:]], dim=-1)

    def parts(self) -> Parts:
        W = self.W.detach().double()
        (d1, m), d = W.shape, W.shape[0] - 1
        P = _zeros(d1, self.d_out, W)
        P[:d, :d] = _eye(d, W)  # the residual passes
        P[d, d + m] = 1.0  # and the constant
        B = _zeros(m, self.d_out, W)
        B[:, d: d + m] = _eye(m, W)
        return Parts(P, W, B, self.act_fn)


class MlpOut(Step):
    """(residual, hidden, 1) -> (residual + hidden @ W_out + b_out, 1)."""

    def __init__(self, in_name: str, W_out: Tensor, b_out: Tensor):
        m, d = W_out.shape
        super().__init__(in_name, d + m + 1, d + 1)
        self.d_model = d
        self.W = nn.Parameter(fold_bias(W_out, b_out), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        resid, hc = x[..., : self.d_model], x[..., self.d_model:]
        return torch.cat([resid + hc @ self.W, x[..., -1:]], dim=-1)

    def parts(self) -> Parts:
        W, d = self.W.detach().double(), self.d_model
        P = _zeros(self.d_in, self.d_out, W)
        P[:d, :d] = _eye(d, W)
        P[d:, :d] = W  # hidden and constant rows: W_out and b_out
        P[-1, -1] = 1.0
        return Parts(P)


class Affine(Step):
    """(x, 1) -> (act(x @ W + b), 1), or the logits x @ W + b for the last layer of a model."""

    def __init__(self, in_name: str, W: Tensor, b: Tensor, act_fn: str | None):
        n_in, n_out = W.shape
        super().__init__(in_name, n_in + 1, n_out + (act_fn is not None))
        self.W = nn.Parameter(fold_bias(W, b), requires_grad=False)
        self.act_fn = act_fn

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.W
        if self.act_fn is None:
            return y
        return torch.cat([ACTIVATIONS[self.act_fn](y), x[..., -1:]], dim=-1)

    def parts(self) -> Parts:
        W = self.W.detach().double()
        if self.act_fn is None:
            return Parts(W)
        n = W.shape[1]
        P = _zeros(self.d_in, self.d_out, W)
        P[-1, -1] = 1.0
        B = _zeros(n, self.d_out, W)
        B[:, :n] = _eye(n, W)
        return Parts(P, W, B, self.act_fn)


class TokenEmbed(nn.Module):
    """tokens (batch, pos) -> (W_E[tokens] + W_pos, 1): the model input, before any node layer."""

    def __init__(self, W_E: Tensor, W_pos: Tensor):
        super().__init__()
        self.W_E = nn.Parameter(W_E.clone(), requires_grad=False)
        self.W_pos = nn.Parameter(W_pos.clone(), requires_grad=False)

    def forward(self, tokens: Tensor) -> Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        return append_const(self.W_E[tokens] + self.W_pos[pos])


class VectorInput(nn.Module):
    """features (batch, d) -> (batch, 1, d + 1), cast to the dtype of ``like`` (the first
    layer's weight, so ``model.to(dtype)`` carries the cast along)."""

    def __init__(self, like: Tensor):
        super().__init__()
        self.like = like

    def forward(self, x: Tensor) -> Tensor:
        return append_const(x.to(self.like.dtype)).unsqueeze(1)


class SequentialModel(nn.Module):
    """An input map and a list of steps; see the module docstring for names and conventions."""

    def __init__(self, embed: nn.Module, steps: list[Step]):
        super().__init__()
        self.embed = embed
        self.steps = nn.ModuleList(steps)
        self.names: list[str] = [s.in_name for s in steps] + ["output"]

    def width(self, name: str) -> int:
        """Raw width of a node layer (its constant coordinate included, if it has one)."""
        i = self.index(name)
        return self.steps[i].d_in if i < len(self.steps) else self.steps[-1].d_out

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"node layer {name!r} does not exist; this model has "
                           f"{', '.join(self.names)}") from None

    @staticmethod
    def variance_index(name: str, width: int) -> int | None:
        """Raw index of a layer norm's variance feature (the ``*_out`` layers of
        :mod:`ribray.math.lm`: second to last), or None."""
        return width - 2 if name.split(".")[0] in LN_OUT_LAYERS else None

    @staticmethod
    def const_index(name: str, width: int) -> int | None:
        """Raw index of a node layer's constant coordinate (the last); None for ``output``."""
        return None if name == "output" else width - 1

    def check_order(self, names: list[str]) -> None:
        """Node layers must exist, be distinct and appear in model order (KeyError/ValueError)."""
        idx = [self.index(n) for n in names]
        if len(set(idx)) != len(idx) or idx != sorted(idx):
            raise ValueError(f"node layers must be distinct and in model order "
                             f"({', '.join(self.names)})")

    def input_problem(self, inputs: Tensor) -> str | None:
        """Why the model cannot take these inputs (vocabulary, context, width), or None."""
        if isinstance(self.embed, TokenEmbed):
            vocab, n_ctx = self.embed.W_E.shape[0], self.embed.W_pos.shape[0]
            if inputs.ndim != 2 or inputs.dtype not in (torch.int64, torch.int32):
                return "a transformer needs integer token sequences"
            if int(inputs.max()) >= vocab or int(inputs.min()) < 0:
                return (f"token ids span {int(inputs.min())}..{int(inputs.max())} but the "
                        f"model's vocabulary has {vocab} tokens")
            if inputs.shape[1] > n_ctx:
                return f"sequences of {inputs.shape[1]} tokens exceed the model's n_ctx {n_ctx}"
            return None
        want = self.steps[0].d_in - 1
        if inputs.ndim != 2 or inputs.shape[1] != want:
            return f"inputs have shape {tuple(inputs.shape)}, the model takes (n, {want})"
        return None

    def section_parts(self, start: str, stop: str,
                      device: torch.device | str = "cpu") -> Parts | None:
        """The section from ``start`` to ``stop`` as one :class:`Parts` (float64, on
        ``device``), or None when a step mixes positions or more than one activation lies
        between them."""
        out: Parts | None = None
        for step in self.steps[self.index(start): self.index(stop)]:
            p = step.parts()
            if p is None:
                return None
            p = Parts(*(None if t is None else t.to(device) for t in p[:3]), p.act)
            out = p if out is None else compose(out, p)
            if out is None:
                return None
        return out

    def section_step(self, start: str, stop: str) -> Step | None:
        """The section's one step, when it is a single step (else None)."""
        steps = self.steps[self.index(start): self.index(stop)]
        return steps[0] if len(steps) == 1 else None

    def section_attention(self, start: str, stop: str) -> Attention | None:
        """The one attention step of a section that is otherwise identities, else None."""
        steps = self.steps[self.index(start): self.index(stop)]
        att = [s for s in steps if isinstance(s, Attention)]
        rest = [s for s in steps if not isinstance(s, (Attention, Identity))]
        return att[0] if len(att) == 1 and not rest else None

    def run(self, x: Tensor, start: str, stop: str) -> Tensor:
        """Apply the steps from node layer ``start`` up to node layer ``stop``."""
        for step in self.steps[self.index(start): self.index(stop)]:
            x = step(x)
        return x

    def forward(self, inputs: Tensor) -> Tensor:
        return self.run(self.embed(inputs), self.names[0], "output")

    def activations(self, inputs: Tensor, names: list[str]) -> dict[str, Tensor]:
        """Activations at the given node layers, running the model once up to the last of them."""
        wanted, out = set(names), {}
        x = self.embed(inputs)
        last = max(self.index(n) for n in names)
        for i in range(last + 1):
            if self.names[i] in wanted:
                out[self.names[i]] = x
            if i < last:
                x = self.steps[i](x)
        return out


def transformer_to_sequential(model: Transformer, last_pos_only: bool) -> SequentialModel:
    """Sequential form of a :class:`Transformer` (no layer norm), in the model's dtype."""
    cfg = model.cfg
    d = cfg.d_model
    steps: list[Step] = []
    with torch.no_grad():
        for b, blk in enumerate(model.blocks):
            last = b == len(model.blocks) - 1
            steps += [Identity(f"ln1.{b}", d + 1), Identity(f"ln1_out.{b}", d + 1),
                      Attention(f"attn_in.{b}", blk.W_Q, blk.b_Q, blk.W_K, blk.b_K, blk.W_V,
                                blk.b_V, blk.W_O, blk.b_O, last_pos_only and last),
                      Identity(f"ln2.{b}", d + 1), Identity(f"ln2_out.{b}", d + 1),
                      MlpIn(f"mlp_in.{b}", blk.W_in, blk.b_in, cfg.act_fn),
                      MlpOut(f"mlp_out.{b}", blk.W_out, blk.b_out)]
        steps.append(Affine("unembed", model.W_U, model.b_U, act_fn=None))
        embed = TokenEmbed(model.W_E, model.W_pos)
    return SequentialModel(embed, steps)


def mlp_to_sequential(model: MLP) -> SequentialModel:
    """Sequential form of an :class:`MLP`: node layers ``layers.{i}`` and ``output``."""
    n = len(model.layers)
    with torch.no_grad():
        steps: list[Step] = [
            Affine(f"layers.{i}", layer.W, layer.b, model.act_fn if i < n - 1 else None)
            for i, layer in enumerate(model.layers)]
    return SequentialModel(VectorInput(steps[0].W), steps)


def to_sequential(model: Transformer | MLP, last_pos_only: bool = True) -> SequentialModel:
    if isinstance(model, Transformer):
        return transformer_to_sequential(model, last_pos_only)
    return mlp_to_sequential(model)
