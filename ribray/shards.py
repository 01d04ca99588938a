"""What a worker holds and computes: a model in sequential form, its data, and per-shard sums.

:class:`ShardComputer` is plain Python (no Ray): the Ray worker actor wraps one, and
:class:`SerialBackend` runs one in this process (tests, notebooks, debugging).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ribray.math.accumulators import ActSums, Moments, Sum
from ribray.math.examples import Examples, merge, shard_examples
from ribray.math.jacobian import Point
from ribray.math.lib import Sources, closed_sections, edge_partial, gram_partial, m_partial
from ribray.math.sequential import SequentialModel

DEFAULT_CPU_BUDGET = 4 * 2**30


@dataclass(frozen=True)
class ComputeSettings:
    batch_size: int
    basis_points: list[Point]
    edge_points: list[Point]
    jacobians: str = "auto"  # "auto": closed forms where they apply; "exact": per feature
    sources: Sources | None = None  # stochastic sources over output positions (R, seed)
    memory_budget: int | None = None  # bytes for one batch of the exact path; None: auto


class ShardComputer:
    """Holds a sequential model and its model inputs; computes partial sums for index ranges."""

    def __init__(self, model: SequentialModel, inputs: torch.Tensor, settings: ComputeSettings):
        self.model, self.inputs, self.settings = model, inputs, settings
        self._sections: dict[tuple, dict] = {}  # closed-form sections' Parts, by request

    @property
    def budget(self) -> int:
        """The exact path's memory budget (bytes): the job's, else 80% of a GPU's memory or
        4 GiB on a CPU."""
        if self.settings.memory_budget is not None:
            return self.settings.memory_budget
        dev = next(self.model.parameters()).device
        if dev.type == "cuda":
            return int(0.8 * torch.cuda.get_device_properties(dev).total_memory)
        return DEFAULT_CPU_BUDGET

    def _x(self, shard: tuple[int, int]) -> torch.Tensor:
        return self.inputs[shard[0]: shard[1]]

    def gram(self, shard: tuple[int, int], layers: list[str],
             sections: list[tuple[str, str]] | None = None) -> dict[str, Moments | ActSums]:
        """Node layers' moments, and the :class:`ActSums` of the closed-form ``sections``
        (layer, target) whose M then needs no pass of its own (:func:`closed_sections`)."""
        key = tuple(sections or [])
        if key not in self._sections:
            self._sections[key] = closed_sections(self.model, list(key), self.settings.jacobians)
        parts = self._sections[key]
        return gram_partial(self.model, self._x(shard), layers, self.settings.batch_size,
                            parts, self.settings.basis_points)

    def m(self, shard: tuple[int, int], layer: str, target: str, C_target: np.ndarray) -> Sum:
        s = self.settings
        return m_partial(self.model, self._x(shard), layer, target, C_target, s.basis_points,
                         s.batch_size, method=s.jacobians, sources=s.sources, offset=shard[0],
                         budget=self.budget)

    def edges(self, shard: tuple[int, int], layer: str, next_layer: str, C_in: np.ndarray,
              C_in_pinv: np.ndarray, C_out: np.ndarray) -> Sum:
        s = self.settings
        return edge_partial(self.model, self._x(shard), layer, next_layer, C_in, C_in_pinv,
                            C_out, s.edge_points, s.batch_size, method=s.jacobians,
                            sources=s.sources, offset=shard[0], budget=self.budget)


    def features(self, shard: tuple[int, int], layer: str, C: np.ndarray, k: int,
                 pool_every: int) -> Examples:
        """Feature-example candidates of one shard (:mod:`ribray.math.examples`)."""
        x = self._x(shard)
        Ct = torch.tensor(np.asarray(C), dtype=next(self.model.parameters()).dtype,
                          device=x.device)
        parts = []
        for b0 in range(0, len(x), self.settings.batch_size):
            batch = x[b0: b0 + self.settings.batch_size]
            with torch.no_grad():
                f = self.model.activations(batch, [layer])[layer] @ Ct
            parts.append(shard_examples(f, shard[0] + b0, k, pool_every))
        return merge(parts, k)


class SerialBackend:
    """The pipeline's Backend, computed shard by shard in this process."""

    def __init__(self, computer: ShardComputer, shards: list[tuple[int, int]]):
        self.c, self.shards = computer, shards

    def gram(self, layers: list[str], sections: list[tuple[str, str]] | None = None
             ) -> dict[int, dict[str, Moments | ActSums]]:
        return {i: self.c.gram(s, layers, sections) for i, s in enumerate(self.shards)}

    def m(self, layer: str, target: str, C_target: np.ndarray) -> dict[int, Sum]:
        return {i: self.c.m(s, layer, target, C_target) for i, s in enumerate(self.shards)}

    def edges(self, layer: str, next_layer: str, C_in: np.ndarray, C_in_pinv: np.ndarray,
              C_out: np.ndarray) -> dict[int, Sum]:
        return {i: self.c.edges(s, layer, next_layer, C_in, C_in_pinv, C_out)
                for i, s in enumerate(self.shards)}
