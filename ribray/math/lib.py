"""Per-shard LIB statistics: what one worker computes for one range of samples (no Ray, no I/O).

Each function runs a sequential model on a batch of model inputs and returns float64 partial
sums (:mod:`ribray.math.accumulators`) to be merged across shards in shard order:

* :func:`gram_partial`: mean and centred co-moment of each node layer over samples and positions,
  and the :class:`~ribray.math.accumulators.ActSums` of the position-wise sections whose M
  needs nothing else (:func:`m_from_sums`);
* :func:`m_partial`: the Jacobian-Gram ``M_raw`` of layer l (eq. 11 with the reference's
  normalisation) from the integrated Jacobian of the target layer's features ``F = f_target @
  C_target`` with respect to layer l's raw activations. The target is the next node layer for
  LIB and the final node layer for GIB (appendix E);
* :func:`edge_partial`: the squared integrated-gradient attributions between adjacent layers'
  features (eq. 2 without the root), evaluated on inputs projected onto the kept features
  (``x = f_hat @ C_pinv``), as the reference implementation does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ribray.math.accumulators import ActSums, Moments, Sum
from ribray.math.closed_form import (
    ActMoments,
    act_moments,
    attention_bytes_per_sample,
    attention_maps,
    edges_attention,
    edges_closed,
    edges_ln,
    ln_parts,
    m_attention,
    m_from_moments,
    m_ln,
)
from ribray.math.jacobian import (
    Point,
    edges_stream,
    edges_stream_by_source,
    integrated_gradients,
    m_stream,
    m_stream_by_source,
    source_signs,
)
from ribray.math.lm import LnIn, LnOut
from ribray.math.sequential import Attention, Parts, SequentialModel


def _batches(inputs: Tensor, batch_size: int) -> list[Tensor]:
    return [inputs[i: i + batch_size] for i in range(0, inputs.shape[0], batch_size)]


def check_finite(t: Tensor, what: str) -> None:
    """Raise FloatingPointError naming ``what`` if ``t`` holds NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"non-finite values in {what}")


@torch.no_grad()
def gram_partial(model: SequentialModel, inputs: Tensor, layers: list[str],
                 batch_size: int, sections: dict[tuple[str, str], Parts] | None = None,
                 points: list[Point] | None = None) -> dict[str, Moments | ActSums]:
    """Moments of each node layer's activations, rows = (sample, position) pairs; and, keyed
    :func:`section_key`, the :class:`ActSums` of each position-wise section (layer, target) →
    Parts in ``sections``, over the same rows and batches as :func:`m_partial` would take them
    (so a shard's M from them is bit-equal to its closed form), at the integration
    ``points``."""
    acc: dict[str, Moments | ActSums] = {}
    sections = sections or {}
    wanted = sorted(set(layers) | {layer for layer, _ in sections},
                    key=model.index)
    for batch in _batches(inputs, batch_size):
        acts = model.activations(batch, wanted)
        for name in layers:
            a = acts[name]
            check_finite(a, f"activations of {name}")
            m = Moments.of(a.reshape(-1, a.shape[-1]).to(torch.float64).cpu().numpy())
            acc[name] = acc[name].merge(m) if name in acc else m
        for (layer, target), parts in sections.items():
            x = acts[layer]
            mom = act_moments(parts, x.reshape(-1, x.shape[-1]), points or [])
            a_sums = ActSums(mom.n, *(None if t is None else t.cpu().numpy()
                                      for t in (mom.g_sum, mom.gram)))
            key = section_key(layer, target)
            prev = acc.get(key)
            acc[key] = a_sums if not isinstance(prev, ActSums) else prev.merge(a_sums)
    return acc


def section_key(layer: str, target: str) -> str:
    """The key of a section's :class:`ActSums` in a Gram partial."""
    return f"{layer}--{target}"


def closed_sections(model: SequentialModel, pairs: list[tuple[str, str]], method: str
                    ) -> dict[tuple[str, str], Parts]:
    """The (layer, target) pairs among ``pairs`` whose M has the closed form of
    :func:`ribray.math.closed_form.m_from_moments` (position-wise, at most one elementwise
    activation), with their :class:`Parts`; none on the ``exact`` path."""
    out = {}
    for layer, target in pairs:
        parts = _closed_parts(model, layer, target, method)
        if parts is not None:
            out[(layer, target)] = parts
    return out


def m_from_sums(parts: Parts, sums: ActSums, C_target: np.ndarray, points: list[Point]
                ) -> np.ndarray:
    """The raw Jacobian-Gram (d_in, d_in) of a position-wise section from its rows'
    :class:`ActSums`, in float64: equal to :func:`m_partial`'s total for the same rows."""
    dev = parts.P.device
    mom = ActMoments(sums.count, *(None if a is None else torch.tensor(a, device=dev)
                                   for a in (sums.g_sum, sums.gram)))
    C = torch.tensor(np.asarray(C_target), dtype=torch.float64, device=dev)
    return m_from_moments(parts, mom, C, points).cpu().numpy()


def _as_tensor(a: np.ndarray, model: SequentialModel) -> Tensor:
    """A (read-only, possibly Ray-shared) float64 matrix as a tensor in the model's dtype."""
    p = next(model.parameters())
    return torch.tensor(np.asarray(a), dtype=p.dtype, device=p.device)


METHODS = ("auto", "exact")


class Sources(NamedTuple):
    """Stochastic sources over output positions (paper appendix C): R draws, seed."""

    r: int
    seed: int


def exact_bytes_per_sample(model: SequentialModel, layer: str, target: str, T: int,
                           n_points: int) -> int:
    """About how much memory one sample takes on the exact path of a section: each
    integration point's forward graph (every step's input and output, with what autograd
    keeps of them; an attention step's scores and pattern, heads × T²) and the gradient."""
    size = next(model.parameters()).element_size()
    graph = 0
    for step in model.steps[model.index(layer): model.index(target)]:
        graph += 3 * T * (step.d_in + step.d_out)
        heads = getattr(step, "W_Q", None)
        if heads is not None:
            graph += 4 * heads.shape[0] * T * T
    return size * (n_points * graph + 2 * T * model.width(layer))


def _sub_batch(model: SequentialModel, layer: str, target: str, inputs: Tensor,
               batch_size: int, n_points: int, budget: int | None) -> int:
    """The batch size of the exact path: ``batch_size``, smaller if ``budget`` bytes ask."""
    if budget is None:
        return batch_size
    T = int(inputs.shape[1]) if inputs.ndim == 2 and not inputs.is_floating_point() else 1
    per = exact_bytes_per_sample(model, layer, target, T, n_points)
    return max(1, min(batch_size, budget // max(1, per)))


def _signs(sources: Sources | None, start: int, x: Tensor, model: SequentialModel, layer: str,
           target: str) -> Tensor | None:
    """The ±1 sources of the samples start, start+1, ... of the batch ``x`` (activations at
    ``layer``), or None (exact) without sources or with a single output position (where they
    change nothing: φ² = 1). The section runs on one sample to learn its output positions,
    only when there are sources."""
    if sources is None:
        return None
    with torch.no_grad():
        t_out = model.run(x[:1], layer, target).shape[1]
    if t_out == 1:
        return None
    return source_signs(sources.seed, torch.arange(start, start + len(x)), sources.r, t_out)


#: the most memory one sample's attention terms may take for the by-parts path (bytes)
ATTENTION_BUDGET = 256 * 2**20
#: the target size of one chunk's largest attention term (bytes): chunks of about a batch
#: for the modular-addition model, one sample at a time for large ones
ATTENTION_CHUNK = 32 * 2**20


def _closed_parts(model: SequentialModel, layer: str, target: str, method: str) -> Parts | None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "exact":
        return None
    return model.section_parts(layer, target, device=next(model.parameters()).device)


def _ln_step(model: SequentialModel, layer: str, target: str, method: str
             ) -> LnIn | LnOut | None:
    """The section's layer-norm half when the section is exactly one (closed form), else None."""
    if method != "auto":
        return None
    step = model.section_step(layer, target)
    return step if isinstance(step, (LnIn, LnOut)) else None


def _attention(model: SequentialModel, layer: str, target: str, method: str, T: int,
               k_left: int, k_out: int) -> tuple[Attention, int] | None:
    """The section's attention step and how many samples fit one chunk, when the
    by-parts path applies (``auto``, one attention step, one sample within the budget)."""
    if method != "auto":
        return None
    att = model.section_attention(layer, target)
    if att is None:
        return None
    per_sample = attention_bytes_per_sample(att, T, k_left, k_out)
    if per_sample > ATTENTION_BUDGET:
        return None
    return att, max(1, ATTENTION_CHUNK // max(1, per_sample))


def _sum_batches(model: SequentialModel, inputs: Tensor, layer: str, batch_size: int,
                 part: Callable[[Tensor], Tensor], what: str) -> Sum:
    """Σ over batches of ``part(x)`` (a float64 tensor) for the batches' activations ``x``
    at ``layer``; count = samples × positions. Non-finite sums stop with ``what`` named."""
    total, count = None, 0
    for batch in _batches(inputs, batch_size):
        with torch.no_grad():
            x = model.activations(batch, [layer])[layer]
        p = part(x)
        check_finite(p, what)
        total = p if total is None else total + p
        count += x.shape[0] * x.shape[1]
    assert total is not None
    return Sum(count, total.cpu().numpy())


def _m_closed(model: SequentialModel, inputs: Tensor, layer: str, parts: Parts,
              C_target: np.ndarray, points: list[Point], batch_size: int) -> Sum:
    C = torch.tensor(np.asarray(C_target), dtype=torch.float64,
                     device=next(model.parameters()).device)
    mom: ActMoments | None = None
    for batch in _batches(inputs, batch_size):
        with torch.no_grad():
            x = model.activations(batch, [layer])[layer]
        part = act_moments(parts, x.reshape(-1, x.shape[-1]), points)
        mom = part if mom is None else mom + part
    assert mom is not None
    total = m_from_moments(parts, mom, C, points)
    check_finite(total, f"gradients into {layer}")
    return Sum(mom.n, total.cpu().numpy())


def m_partial(model: SequentialModel, inputs: Tensor, layer: str, target: str,
              C_target: np.ndarray, points: list[Point], batch_size: int,
              method: str = "auto", sources: Sources | None = None, offset: int = 0,
              budget: int | None = None) -> Sum:
    """Σ over the batch of the raw Jacobian-Gram of ``layer`` with respect to ``target``'s
    features; count = samples × input positions. ``method``: ``auto`` uses the closed form
    of :mod:`ribray.math.closed_form` where the section allows it, ``exact`` always the
    per-feature autograd path (the reference every fast path is tested against).

    ``sources`` (R, seed): stochastic ±1 sources over output positions (paper eq. 25) where
    the Jacobian mixes positions; ``offset`` is the data-set index of ``inputs[0]``, so each
    sample's sources are its own. A position-wise section (the closed forms) needs none and
    stays exact; an attention section takes the per-feature path with them. Where the
    sources are in effect the sum also carries each source's own sum, ``per_source``
    (R, d, d), for the error estimate (:func:`ribray.math.stability.source_error`)."""
    parts = _closed_parts(model, layer, target, method)
    if parts is not None:
        return _m_closed(model, inputs, layer, parts, C_target, points, batch_size)
    ln = _ln_step(model, layer, target, method)
    if ln is not None:
        C64 = torch.tensor(np.asarray(C_target), dtype=torch.float64,
                           device=next(model.parameters()).device)
        return _sum_batches(model, inputs, layer, batch_size, lambda x: m_ln(
            ln_parts(ln, x.reshape(-1, x.shape[-1]), points), C64), f"gradients into {layer}")
    C = _as_tensor(C_target, model)
    T = int(inputs.shape[1])  # token positions (used only for a transformer's attention)
    fast = _attention(model, layer, target, method, T, C.shape[0], C.shape[1])
    if fast is not None and sources is None:
        att, chunk = fast
        maps = attention_maps(att, C)
        return _sum_batches(model, inputs, layer, min(batch_size, chunk),
                            lambda x: m_attention(maps, x, points), f"gradients into {layer}")

    def fn(z: Tensor) -> Tensor:
        return model.run(z, layer, target) @ C

    total, per, r, count, start = None, None, None, 0, offset
    sub = _sub_batch(model, layer, target, inputs, batch_size, len(points), budget)
    for batch in _batches(inputs, sub):
        with torch.no_grad():
            x = model.activations(batch, [layer])[layer]
        signs = _signs(sources, start, x, model, layer, target)
        r = None if signs is None else int(signs.shape[1])
        start += len(batch)
        part, part_per = _m_directions(integrated_gradients(fn, x, points, signs), signs,
                                       x.shape[-1], C.shape[1])
        check_finite(torch.from_numpy(part), f"gradients into {layer}")
        total = part if total is None else total + part
        if part_per is not None:
            per = part_per if per is None else per + part_per
        count += x.shape[0] * x.shape[1]
    assert total is not None
    return Sum(count, total, _per_source(per, total, r))


def _m_directions(grads: Iterator[Tensor], signs: Tensor | None, d: int, k_out: int
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """One batch's Σ g gᵀ (d, d) over the directions, divided by R with sources, and with
    R ≥ 2 sources each source's own sum (R, d, d); zeros for no directions. (With R = 1 the
    one source's sum is the total itself: no second GEMM.)"""
    r = 1 if signs is None else int(signs.shape[1])
    if r == 1:
        M = m_stream(grads)
        return (np.zeros((d, d)) if M is None else M) / r, None
    M, per = m_stream_by_source(grads, r, k_out)
    if M is None or per is None:
        return np.zeros((d, d)), np.zeros((r, d, d))
    return M / r, per


def _per_source(per: np.ndarray | None, total: np.ndarray, r: int | None) -> np.ndarray | None:
    """The per-source sums of a partial: ``per`` (R ≥ 2); with R = 1 an empty (1, 0) marker
    (the one source's sum is ``total`` itself, and one source has no spread to estimate an
    error from, so it is not carried twice); None without sources in effect."""
    if per is not None:
        return per
    return np.zeros((1, 0)) if r == 1 else None


def edge_partial(model: SequentialModel, inputs: Tensor, layer: str, next_layer: str,
                 C_in: np.ndarray, C_in_pinv: np.ndarray, C_out: np.ndarray,
                 points: list[Point], batch_size: int, method: str = "auto",
                 sources: Sources | None = None, offset: int = 0,
                 budget: int | None = None) -> Sum:
    """Σ over the batch of squared integrated-gradient edges from ``layer`` to ``next_layer``;
    count = samples × input positions. ``method``, ``sources`` (eq. 23) and ``offset`` as for
    :func:`m_partial`; with sources the closed forms stay exact (their expectation), and
    where they are in effect the sum carries ``per_source`` (R, k_out, k_in)."""
    Ci, Cip, Co = (_as_tensor(a, model) for a in (C_in, C_in_pinv, C_out))
    what = f"edges from {next_layer} into {layer}"
    parts = _closed_parts(model, layer, next_layer, method)
    if parts is not None:  # all rows at once: the closed form's blocks are formed once
        with torch.no_grad():
            f_hat = torch.cat([(model.activations(batch, [layer])[layer] @ Ci)
                               for batch in _batches(inputs, batch_size)])
        part = edges_closed(parts, f_hat.reshape(-1, Ci.shape[1]), Cip, Co, points)
        check_finite(part, what)
        return Sum(f_hat.shape[0] * f_hat.shape[1], part.cpu().numpy())
    ln = _ln_step(model, layer, next_layer, method)
    if ln is not None:
        def ln_part(x: Tensor) -> Tensor:
            rows = (x @ Ci).reshape(-1, Ci.shape[1])
            return edges_ln(ln_parts(ln, rows @ Cip, points), rows, Cip, Co)  # at x̂ = f̂ C⁺

        return _sum_batches(model, inputs, layer, batch_size, ln_part, what)
    T = int(inputs.shape[1])  # token positions (used only for a transformer's attention)
    fast = _attention(model, layer, next_layer, method, T, Ci.shape[1], Co.shape[1])
    if fast is not None and sources is None:
        att, chunk = fast
        maps = attention_maps(att, Co, left=Cip)
        return _sum_batches(model, inputs, layer, min(batch_size, chunk),
                            lambda x: edges_attention(maps, x @ Ci, Cip, points), what)

    def fn_hat(z: Tensor) -> Tensor:
        return model.run(z @ Cip, layer, next_layer) @ Co

    total, per, r, count, start = None, None, None, 0, offset
    sub = _sub_batch(model, layer, next_layer, inputs, batch_size, len(points), budget)
    for batch in _batches(inputs, sub):
        with torch.no_grad():
            x = model.activations(batch, [layer])[layer]
        f_hat = x @ Ci
        signs = _signs(sources, start, x, model, layer, next_layer)
        r = None if signs is None else int(signs.shape[1])
        start += len(batch)
        grads = integrated_gradients(fn_hat, f_hat, points, signs)
        if r is None or r == 1:
            part, part_per = edges_stream(grads, f_hat, Co.shape[1]) / (r or 1), None
        else:
            part, part_per = edges_stream_by_source(grads, f_hat, r, Co.shape[1])
            part = part / r
        check_finite(torch.from_numpy(part), f"gradients from {next_layer} into {layer}")
        total = part if total is None else total + part
        if part_per is not None:
            per = part_per if per is None else per + part_per
        count += x.shape[0] * x.shape[1]
    assert total is not None
    return Sum(count, total, _per_source(per, total, r))
