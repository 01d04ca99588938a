"""Per-shard LIB statistics: what one worker computes for one range of samples (no Ray, no I/O).

Each function runs a sequential model on a batch of model inputs and returns float64 partial
sums (:mod:`ribray.math.accumulators`) to be merged across shards in shard order:

* :func:`gram_partial`: mean and centred co-moment of each node layer over samples and positions;
* :func:`m_partial`: the Jacobian-Gram ``M_raw`` of layer l (eq. 11 with the reference's
  normalisation) from the integrated Jacobian of the target layer's features ``F = f_target @
  C_target`` with respect to layer l's raw activations. The target is the next node layer for
  LIB and the final node layer for GIB (appendix E);
* :func:`edge_partial`: the squared integrated-gradient attributions between adjacent layers'
  features (eq. 2 without the root), evaluated on inputs projected onto the kept features
  (``x = f_hat @ C_pinv``), as the reference implementation does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ribray.math.accumulators import Moments, Sum
from ribray.math.jacobian import Point, edge_sum, integrated_jacobian, m_sum
from ribray.math.sequential import SequentialModel


def _batches(inputs: Tensor, batch_size: int) -> list[Tensor]:
    return [inputs[i: i + batch_size] for i in range(0, inputs.shape[0], batch_size)]


def check_finite(t: Tensor, what: str) -> None:
    """Raise FloatingPointError naming ``what`` if ``t`` holds NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(f"non-finite values in {what}")


@torch.no_grad()
def gram_partial(model: SequentialModel, inputs: Tensor, layers: list[str],
                 batch_size: int) -> dict[str, Moments]:
    """Moments of each node layer's activations, rows = (sample, position) pairs."""
    acc: dict[str, Moments] = {}
    for batch in _batches(inputs, batch_size):
        acts = model.activations(batch, layers)
        for name, a in acts.items():
            check_finite(a, f"activations of {name}")
            m = Moments.of(a.reshape(-1, a.shape[-1]).to(torch.float64).cpu().numpy())
            acc[name] = acc[name].merge(m) if name in acc else m
    return acc


def _as_tensor(a: np.ndarray, model: SequentialModel) -> Tensor:
    """A (read-only, possibly Ray-shared) float64 matrix as a tensor in the model's dtype."""
    p = next(model.parameters())
    return torch.tensor(np.asarray(a), dtype=p.dtype, device=p.device)


def m_partial(model: SequentialModel, inputs: Tensor, layer: str, target: str,
              C_target: np.ndarray, points: list[Point], batch_size: int) -> Sum:
    """Σ over the batch of the raw Jacobian-Gram of ``layer`` with respect to ``target``'s
    features; count = samples × input positions."""
    total, count = None, 0
    C = _as_tensor(C_target, model)

    def fn(z: Tensor) -> Tensor:
        return model.run(z, layer, target) @ C

    for batch in _batches(inputs, batch_size):
        with torch.no_grad():
            x = model.activations(batch, [layer])[layer]
        jac = integrated_jacobian(fn, x, points)
        check_finite(jac, f"gradients into {layer}")
        part = m_sum(jac)
        total = part if total is None else total + part
        count += x.shape[0] * x.shape[1]
    assert total is not None
    return Sum(count, total)


def edge_partial(model: SequentialModel, inputs: Tensor, layer: str, next_layer: str,
                 C_in: np.ndarray, C_in_pinv: np.ndarray, C_out: np.ndarray,
                 points: list[Point], batch_size: int) -> Sum:
    """Σ over the batch of squared integrated-gradient edges from ``layer`` to ``next_layer``;
    count = samples × input positions."""
    total, count = None, 0
    Ci, Cip, Co = (_as_tensor(a, model) for a in (C_in, C_in_pinv, C_out))

    def fn_hat(z: Tensor) -> Tensor:
        return model.run(z @ Cip, layer, next_layer) @ Co

    for batch in _batches(inputs, batch_size):
        with torch.no_grad():
            x = model.activations(batch, [layer])[layer]
        f_hat = x @ Ci
        jac = integrated_jacobian(fn_hat, f_hat, points)
        check_finite(jac, f"gradients from {next_layer} into {layer}")
        part = edge_sum(jac, f_hat)
        total = part if total is None else total + part
        count += x.shape[0] * x.shape[1]
    assert total is not None
    return Sum(count, total)
