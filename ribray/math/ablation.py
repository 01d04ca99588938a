"""Ablations of a LIB graph (paper section 2.3): edges, nodes, and the bisect search.

No Ray and no I/O. Conventions (row vectors, as everywhere in ribray): a node layer's raw
activation ``x`` (…, d) has features ``f_hat = x @ C`` (…, n) and ``x ≈ f_hat @ C_pinv``.

**Edge ablation.** The edges of the section from node layer l to l+1 form a matrix
``E`` (out_feature, in_feature). A boolean ``keep`` of the same shape says which edges stay. To
compute output feature i, the section is run on the input with the ablated features of row i
zeroed, ``x_i = (f_hat * keep[i]) @ C_in_pinv``, and only output feature i of the result is kept:

    F_hat_i = (section(x_i) @ C_out)[..., i],       out = F_hat @ C_out_pinv.

Output features whose rows of ``keep`` are equal share one forward pass, so the cost is one
pass per distinct row. With every edge kept this is the model with each node layer projected
onto its kept features (identical to the model when nothing was truncated).

**Edge order.** Candidates for ablation are all edges except those of the constant features
(the constant input's column and the constant output's row), which are always kept and never
counted. Candidates are ranked by ``E`` descending (ties by position, row-major), and keeping
``n`` edges means keeping the first ``n``.

**Node ablation.** Keeping the first ``n`` features of a node layer (features are ordered by
Λ, the constant first) replaces ``x`` by ``x @ C[:, :n] @ C_pinv[:n]`` (paper figure 5).

**Search** (:class:`Search`): the smallest number of kept edges whose score is within the
tolerance of the unablated model, by a k-section search over ``0..n_candidates`` (k probes per
round; k = 1 is bisection; the first round also checks that keeping every edge passes). The
answer depends on k, never on how many workers evaluate the probes or in which order they
finish.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

Section = Callable[[Tensor], Tensor]


def edge_order(E: np.ndarray, const_in: int | None, const_out: int | None) -> np.ndarray:
    """Candidate edges as an (n_candidates, 2) array of (out, in) indices, largest E first.

    The constant input feature's column and the constant output feature's row are not
    candidates (always kept). Ties keep row-major order (a stable sort).
    """
    n_out, n_in = E.shape
    rows, cols = np.meshgrid(np.arange(n_out), np.arange(n_in), indexing="ij")
    ok = np.ones(E.shape, dtype=bool)
    if const_in is not None:
        ok[:, const_in] = False
    if const_out is not None:
        ok[const_out, :] = False
    r, c, v = rows[ok], cols[ok], E[ok]
    order = np.argsort(-v, kind="stable")
    return np.stack([r[order], c[order]], axis=1)


def edge_mask(shape: tuple[int, int], order: np.ndarray, n_keep: int) -> np.ndarray:
    """Boolean (out, in) mask: the non-candidate edges and the first ``n_keep`` candidates."""
    if not 0 <= n_keep <= len(order):
        raise ValueError(f"n_keep must be in 0..{len(order)}, got {n_keep}")
    keep = np.ones(shape, dtype=bool)
    keep[order[:, 0], order[:, 1]] = False
    top = order[:n_keep]
    keep[top[:, 0], top[:, 1]] = True
    return keep


def smallest_kept(E: np.ndarray, order: np.ndarray, n_keep: int) -> float:
    """The smallest positive candidate edge kept with ``n_keep`` kept (ε of paper eq. 3); inf
    if none (kept edges that are exactly 0 carry no interaction and cannot scale a log)."""
    kept = E[order[:n_keep, 0], order[:n_keep, 1]]
    kept = kept[kept > 0]
    return float(kept.min()) if kept.size else float("inf")


@torch.no_grad()
def ablate_edges(section: Section, x: Tensor, keep: np.ndarray, C_in: Tensor,
                 C_in_pinv: Tensor, C_out: Tensor, C_out_pinv: Tensor) -> Tensor:
    """The section's raw output with the edges not in ``keep`` (out, in) ablated.

    x: (batch, pos_in, d_in) raw input; C_in (d_in, n_in), C_in_pinv (n_in, d_in),
    C_out (d_out, n_out), C_out_pinv (n_out, d_out). Returns (batch, pos_out, d_out).
    """
    f_in = x @ C_in
    rows, inverse = np.unique(keep, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    out_hat: Tensor | None = None
    for g, row in enumerate(rows):
        outs = torch.from_numpy(np.flatnonzero(inverse == g)).to(x.device)
        mask = torch.from_numpy(row).to(device=x.device, dtype=x.dtype)
        y = section((f_in * mask) @ C_in_pinv) @ C_out[:, outs]
        if out_hat is None:
            out_hat = y.new_zeros(y.shape[:-1] + (C_out.shape[1],))
        out_hat[..., outs] = y
    assert out_hat is not None, "a section has at least one output feature"
    return out_hat @ C_out_pinv


def node_projection(C: Tensor, C_pinv: Tensor, n_keep: int) -> Tensor:
    """(d, d) map keeping a node layer's first ``n_keep`` features: ``C[:, :n] @ C_pinv[:n]``."""
    return C[:, :n_keep] @ C_pinv[:n_keep]


def accuracy(logits: Tensor, labels: Tensor) -> tuple[float, int]:
    """(number correct, count) of argmax predictions; logits (batch, classes)."""
    return float((logits.argmax(dim=-1) == labels).sum()), int(labels.shape[0])


def cross_entropy(logits: Tensor, labels: Tensor) -> tuple[float, int]:
    """(summed cross-entropy in nats, count), computed in float64."""
    loss = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="sum")
    return float(loss), int(labels.shape[0])


SCORES = {"accuracy": accuracy, "ce_loss": cross_entropy}


def passes(score: float, base: float, kind: str, tolerance: float) -> bool:
    """Whether an ablated score is within ``tolerance`` of the unablated ``base``: accuracy
    may drop by at most ``tolerance`` (a fraction: 0.001 = 0.1 percentage point), cross-entropy
    may rise by at most ``tolerance`` nats."""
    if kind == "accuracy":
        return score >= base - tolerance
    if kind == "ce_loss":
        return score <= base + tolerance
    raise ValueError(f"score kind must be accuracy or ce_loss, got {kind!r}")


@dataclass
class Search:
    """k-section search for the smallest passing number of kept edges in ``0..n``.

    ``good`` is the smallest count known to pass, ``bad`` the largest count below it known to
    fail (-1: none yet). The first round evaluates ``n`` itself (every candidate kept: the model
    projected onto the kept features of both layers, which differs from the unablated model
    where a layer was truncated) besides up to ``k`` counts spread evenly strictly between
    ``bad`` and ``good``; each later round the same between the narrowed bounds. The search ends
    when ``good - bad == 1`` and ``good`` is the answer, or at once when ``n`` fails
    (``all_kept_passes`` False: even keeping every edge is outside the tolerance, and ``good``
    stays ``n``). On a score that is monotone in the number of kept edges the answer is the
    true threshold; otherwise it is a count that passes with its predecessor failing, found the
    way bisection finds it.
    """

    n: int
    k: int = 1
    good: int = field(init=False)
    bad: int = -1
    all_kept_passes: bool | None = None  # None until n is evaluated
    evaluated: dict[int, tuple[float, bool]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n < 0 or self.k < 1:
            raise ValueError("n must be >= 0 and k >= 1")
        self.good = self.n

    @property
    def done(self) -> bool:
        if self.all_kept_passes is None:
            return False
        return not self.all_kept_passes or self.good - self.bad <= 1

    def probes(self) -> list[int]:
        """The counts to evaluate this round (empty when done)."""
        if self.done:
            return []
        span = self.good - self.bad
        pts = {self.bad + (span * i) // (self.k + 1) for i in range(1, self.k + 1)}
        pts = {p for p in pts if self.bad < p < self.good}
        if self.all_kept_passes is None:
            pts.add(self.n)
        return sorted(pts)

    def update(self, results: dict[int, tuple[float, bool]]) -> None:
        """Record (score, passed) for this round's probes and narrow the interval."""
        self.evaluated.update(results)
        if self.n in results:
            self.all_kept_passes = results[self.n][1]
        if self.all_kept_passes is False:  # nothing can pass as promised: report all of them
            self.good = self.n
            return
        passing = [p for p, (_, ok) in results.items() if ok and p < self.good]
        if passing:
            self.good = min(passing)
        failing = [p for p, (_, ok) in results.items() if not ok and self.bad < p < self.good]
        if failing:
            self.bad = max(failing)
