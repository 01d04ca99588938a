"""Modules of a LIB graph: Leiden with the modularity objective on log-scaled edges (paper eq. 3).

No Ray and no I/O. The graph's nodes are the features of a chain of node layers; node ids run
layer by layer (layer order, then feature index). An undirected edge joins feature j of layer l
and feature i of layer l+1 with weight

    w = log(E[i, j] / ε_l)      for E[i, j] > ε_l      (dropped otherwise),

where ε_l is the smallest positive edge kept by the bisect search of that layer pair: the edges
the search ablates are not in the graph, and neither is the ε edge itself (its weight would be
log 1 = 0, which adds nothing to modularity); every weight in the graph is positive and finite.
As in the reference implementation, the constant features' edges are left out: constant nodes
are singletons. Partitions are found by ``leidenalg`` (RBConfigurationVertexPartition: modularity
with resolution γ; the paper used γ = 1 and 0.5), seeded, so a run is reproducible. Module ids
are renumbered by size (0 = largest, ties by smallest node id); nodes without any edge get -1.
Modularity is invariant to scaling all weights, so the base of the logarithm does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LayerEdges:
    """The edges from layer ``in_layer`` to ``out_layer``: E (out, in), its ε and the constant
    features (None where a layer has none)."""

    in_layer: str
    out_layer: str
    E: np.ndarray
    epsilon: float
    const_in: int | None
    const_out: int | None


@dataclass(frozen=True)
class Graph:
    """Nodes (layer, feature) and weighted undirected edges (node a, node b, weight)."""

    layers: list[str]
    sizes: list[int]
    edges: np.ndarray  # (n_edges, 2) int64 node ids
    weights: np.ndarray  # (n_edges,) float64, >= 0

    @property
    def offsets(self) -> list[int]:
        return [int(v) for v in np.concatenate([[0], np.cumsum(self.sizes)])]

    @property
    def n_nodes(self) -> int:
        return int(sum(self.sizes))

    def node(self, layer: str, feature: int) -> int:
        return self.offsets[self.layers.index(layer)] + feature


def build_graph(chain: list[LayerEdges]) -> Graph:
    """The graph of a chain of adjacent layer pairs (``chain[k].out_layer ==
    chain[k+1].in_layer``), with log(E/ε) weights; see the module docstring."""
    if not chain:
        raise ValueError("a graph needs at least one layer pair")
    for a, b in zip(chain[:-1], chain[1:]):
        if a.out_layer != b.in_layer:
            raise ValueError(f"layer pairs are not a chain: {a.out_layer} != {b.in_layer}")
    layers = [chain[0].in_layer] + [le.out_layer for le in chain]
    sizes = [chain[0].E.shape[1]] + [le.E.shape[0] for le in chain]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    all_edges, all_w = [], []
    for k, le in enumerate(chain):
        E = np.asarray(le.E, dtype=np.float64)
        if not le.epsilon > 0:
            raise ValueError(f"ε of {le.in_layer}--{le.out_layer} must be positive, got "
                             f"{le.epsilon}")
        ok = E > le.epsilon
        if le.const_in is not None:
            ok[:, le.const_in] = False
        if le.const_out is not None:
            ok[le.const_out, :] = False
        i, j = np.nonzero(ok)
        all_edges.append(np.stack([offsets[k] + j, offsets[k + 1] + i], axis=1))
        all_w.append(np.log(E[i, j] / le.epsilon))
    return Graph(layers=layers, sizes=[int(s) for s in sizes],
                 edges=np.concatenate(all_edges).astype(np.int64),
                 weights=np.concatenate(all_w))


@dataclass(frozen=True)
class Partition:
    """Module id per node (-1: no edges), the modularity Q at resolution γ and module count."""

    module: np.ndarray  # (n_nodes,) int64
    modularity: float
    resolution: float
    n_modules: int

    def layer_modules(self, graph: Graph) -> dict[str, np.ndarray]:
        off = graph.offsets
        return {name: self.module[off[k]: off[k + 1]] for k, name in enumerate(graph.layers)}


def leiden(graph: Graph, resolution: float = 1.0, seed: int = 0,
           n_iterations: int = -1) -> Partition:
    """Leiden partition maximising modularity with resolution γ (leidenalg, seeded).

    ``n_iterations=-1`` iterates until the partition is stable. Q is computed on the weighted
    graph with the same γ: Q = 1/(2m) Σ_ij (A_ij − γ k_i k_j / (2m)) δ(c_i, c_j).
    """
    import igraph as ig
    import leidenalg

    g = ig.Graph(n=graph.n_nodes, edges=graph.edges.tolist(), directed=False)
    g.es["weight"] = graph.weights.tolist()
    try:
        part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition,
                                        weights="weight", resolution_parameter=resolution,
                                        seed=seed, n_iterations=n_iterations)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - leidenalg raises BaseException on bad input
        raise RuntimeError(f"Leiden failed: {exc}") from None
    raw = np.asarray(part.membership, dtype=np.int64)
    module = renumber(raw, degree=np.asarray(g.degree()))
    q = g.modularity(raw.tolist(), weights="weight", resolution=resolution) if g.ecount() else 0.0
    return Partition(module=module, modularity=float(q), resolution=float(resolution),
                     n_modules=int(module.max() + 1) if (module >= 0).any() else 0)


def renumber(membership: np.ndarray, degree: np.ndarray) -> np.ndarray:
    """Module ids by size (0 = largest; ties by smallest member); isolated nodes -> -1."""
    out = np.full(membership.shape, -1, dtype=np.int64)
    live = degree > 0
    ids, first, counts = np.unique(membership[live], return_index=True, return_counts=True)
    first_node = np.flatnonzero(live)[first]
    order = sorted(range(len(ids)), key=lambda t: (-counts[t], first_node[t]))
    new = {int(ids[t]): rank for rank, t in enumerate(order)}
    out[live] = [new[int(m)] for m in membership[live]]
    return out
