"""The backward basis recursion (paper algorithm 1), independent of where the sums come from.

A :class:`Backend` computes per-shard partial sums (serially, or on Ray workers: see
:mod:`ribray.orchestrate`); this module reduces them in shard order, builds each node layer's
basis from the last node layer backwards, computes the edges between adjacent layers, and hands
every finished piece to a :class:`Sink` (the Zarr store) as soon as it exists.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from ribray.math import basis as bases
from ribray.math.accumulators import ActSums, Moments, Sum, reduce_in_order
from ribray.math.lib import section_key
from ribray.math.sequential import SequentialModel
from ribray.math.stability import edges_error_attrs, jackknife, source_error_attrs


class Backend(Protocol):
    """Per-shard partial sums, keyed by shard id."""

    def gram(self, layers: list[str], sections: list[tuple[str, str]] | None = None
             ) -> dict[int, dict[str, Moments | ActSums]]:
        """Node layers' moments, and :class:`ActSums` keyed ``section_key`` for ``sections``."""

    def m(self, layer: str, target: str, C_target: np.ndarray) -> dict[int, Sum]: ...

    def edges(self, layer: str, next_layer: str, C_in: np.ndarray, C_in_pinv: np.ndarray,
              C_out: np.ndarray) -> dict[int, Sum]: ...

    # optional: m_with_edges(layer, target, C_target, edges) -> (M partials, [edge partials]),
    # where edges is a list of (layer, next_layer, C_in, C_in_pinv, C_out): all in one map


class Sink(Protocol):
    """Receives each result as soon as it exists."""

    def gram(self, layer: str, mean: np.ndarray, gram: np.ndarray, count: int) -> None: ...

    def basis(self, layer: str, b: bases.Basis) -> None: ...

    def edges(self, layer: str, next_layer: str, E: np.ndarray, attrs: dict) -> None:
        """``attrs``: the edge group's extra attrs (the sources' error, else empty)."""


class ResumableSink(Sink, Protocol):
    """A sink that also returns what an earlier, interrupted run of the same job already wrote
    (None/False: nothing), so a resumed run recomputes only the rest (the Zarr store's writer).
    A plain :class:`Sink` is never resumed."""

    def stored_stats(self, layer: str) -> tuple[np.ndarray, np.ndarray, int] | None: ...

    def stored_basis(self, layer: str) -> bases.Basis | None: ...

    def stored_edges(self, layer: str, next_layer: str) -> bool: ...


@dataclass(frozen=True)
class BasisSettings:
    kind: str  # lib | gib | pca | neuron
    threshold: float
    threshold_mode: str  # absolute | relative
    rotate_final: bool
    compute_edges: bool


#: M of a position-wise section from its rows' sums: (ActSums, C_target) -> M_raw (d, d)
ClosedM = Callable[[ActSums, np.ndarray], np.ndarray]


def m_pairs(layers: list[str], kind: str) -> list[tuple[str, str]]:
    """The (layer, target) sections whose Jacobian-Grams the recursion takes: each layer to
    the next for LIB, to the final layer for GIB (appendix E); none for PCA or neurons."""
    if kind not in ("lib", "gib"):
        return []
    return [(layers[i], layers[i + 1] if kind == "lib" else layers[-1])
            for i in range(len(layers) - 1)]


def run(backend: Backend, layers: list[str], widths: dict[str, int], settings: BasisSettings,
        sink: Sink, log: Callable[[str], None] = lambda s: None,
        closed: dict[tuple[str, str], ClosedM] | None = None) -> dict[str, float]:
    """Run the whole recursion; returns seconds per phase.

    ``closed``: the sections (layer, target) whose M follows from their rows'
    :class:`ActSums` (:func:`ribray.math.lib.m_from_sums`). The Gram pass takes those sums
    too, so these layers' bases need no pass of their own. With a backend that has
    ``m_with_edges`` (:class:`ribray.orchestrate.RayBackend`) the edges of the layer pairs
    whose bases are known are computed in the next map of an M, and their time is counted in
    ``basis_M``; the rest in one map at the end."""
    timings: dict[str, float] = {"gram": 0.0, "basis_M": 0.0, "edges": 0.0}
    t0 = time.perf_counter()
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sums: dict[tuple[str, str], dict[int, ActSums]] = {}
    stored = {n: _stored(sink, "stored_stats", n) for n in layers}
    if all(v is not None for v in stored.values()):
        stats = {n: (v[0], v[1]) for n, v in stored.items() if v is not None}
        log("gram: written by an earlier run")
    else:
        # one pass over the data for every node layer and every closed-form section
        partials = backend.gram(layers, list(closed or {}))
        moments = {n: reduce_in_order({s: p[n] for s, p in partials.items()}) for n in layers}
        for n in layers:
            m = moments[n]
            cov = m.covariance()
            stats[n] = (m.mean, cov)
            gram = bases.centred_gram(cov, SequentialModel.const_index(n, widths[n]))
            sink.gram(n, m.mean, gram, m.count)
        for pair in closed or {}:
            key = section_key(*pair)
            if all(isinstance(p.get(key), ActSums) for p in partials.values()):
                sums[pair] = {s: p[key] for s, p in partials.items()}
        timings["gram"] = time.perf_counter() - t0
        log(f"gram: {len(layers)} node layers, {timings['gram']:.1f}s")

    final = layers[-1]
    results: dict[str, bases.Basis] = {}
    kept = _stored(sink, "stored_basis", final)
    results[final] = kept if kept is not None else _final_basis(final, widths, stats, settings)
    if kept is None:
        sink.basis(final, results[final])
    # The edges of a layer pair need only the two bases, so (with a backend that can) they
    # are computed in the next map of an M: no barrier between the phases.
    pending: list[tuple[str, str]] = []

    def edge_args(layer: str, nxt: str) -> tuple:
        b_in, b_out = results[layer], results[nxt]
        return layer, nxt, b_in.C, b_in.C_pinv, b_out.C

    def write_edges(layer: str, nxt: str, partials: dict[int, Sum]) -> None:
        s = reduce_in_order(partials)
        sink.edges(layer, nxt, s.mean(), edges_error_attrs(s))

    def m_map(layer: str, target: str, C_target: np.ndarray) -> dict[int, Sum]:
        if (layer, target) in sums and closed is not None:  # from the Gram pass's sums
            fn = closed[(layer, target)]
            return {s: Sum(a.count, fn(a, C_target)) for s, a in sums[(layer, target)].items()}
        fused = getattr(backend, "m_with_edges", None)
        if not pending or fused is None:
            return backend.m(layer, target, C_target)
        m_parts, e_parts = fused(layer, target, C_target, [edge_args(*e) for e in pending])
        for (a, b), parts in zip(pending, e_parts, strict=True):
            write_edges(a, b, parts)
            log(f"edges {a} -> {b}: with M/{layer}")
        pending.clear()
        return m_parts

    for i in range(len(layers) - 2, -1, -1):
        layer, nxt = layers[i], layers[i + 1]
        t1 = time.perf_counter()
        kept = _stored(sink, "stored_basis", layer)
        if kept is not None:
            results[layer] = kept
            log(f"basis {layer}: written by an earlier run")
        else:
            results[layer] = _layer_basis(m_map, layer, nxt, final, widths, stats, settings,
                                          results)
            timings["basis_M"] += time.perf_counter() - t1
            sink.basis(layer, results[layer])
            log(f"basis {layer}: {results[layer].n_features} features, "
                f"{time.perf_counter() - t1:.1f}s")
        if settings.compute_edges and not _stored(sink, "stored_edges", layer, nxt):
            pending.append((layer, nxt))
    t2 = time.perf_counter()
    many = getattr(backend, "edges_many", None)
    if many is not None and pending:  # the rest in one map
        for (a, b), parts in zip(pending, many([edge_args(*e) for e in pending]), strict=True):
            write_edges(a, b, parts)
    else:
        for a, b in pending:
            write_edges(a, b, backend.edges(*edge_args(a, b)))
    if pending:
        timings["edges"] = time.perf_counter() - t2
        log(f"edges {', '.join(f'{a} -> {b}' for a, b in pending)}: {timings['edges']:.1f}s")
    return timings


def _stored(sink: Sink, method: str, *args: str):
    """What a :class:`ResumableSink` kept (None for a plain sink)."""
    fn = getattr(sink, method, None)
    return fn(*args) if fn is not None else None


def _final_basis(final: str, widths: dict[str, int], stats: dict, settings: BasisSettings
                 ) -> bases.Basis:
    mean, cov = stats[final]
    const = SequentialModel.const_index(final, widths[final])
    if not settings.rotate_final:
        return bases.unrotated_basis(cov, const)
    if const is None:
        return bases.rotated_output_basis(cov)
    return bases.pca_basis(bases.pca(cov, mean, const, settings.threshold,
                                     settings.threshold_mode,
                                     var=SequentialModel.variance_index(final, widths[final])))


def _layer_basis(m_map: Callable[[str, str, np.ndarray], dict[int, Sum]], layer: str,
                 nxt: str, final: str, widths: dict[str, int], stats: dict,
                 settings: BasisSettings, done: dict[str, bases.Basis]) -> bases.Basis:
    """The basis of ``layer`` (M partials from ``m_map(layer, target, C_target)``)."""
    mean, cov = stats[layer]
    const = SequentialModel.const_index(layer, widths[layer])
    if settings.kind == "neuron":
        return bases.unrotated_basis(cov, const)
    assert const is not None, "only the final node layer may be `output`"
    p = bases.pca(cov, mean, const, settings.threshold, settings.threshold_mode,
                  var=SequentialModel.variance_index(layer, widths[layer]))
    if settings.kind == "pca":
        return bases.pca_basis(p)
    target = nxt if settings.kind == "lib" else final
    partials = m_map(layer, target, done[target].C)
    full = reduce_in_order(partials)
    b = bases.lib_basis(p, full.mean(), settings.threshold, settings.threshold_mode)
    fixed = sum(i is not None for i in (b.const_feature, b.variance_feature))
    stab = jackknife(p, partials, b.n_features - fixed)
    return replace(b, stability=stab.as_attrs() if stab is not None else None,
                   stochastic_error=source_error_attrs(p, full, b.n_features - fixed))


class MemorySink:
    """Keeps every result in memory (tests, notebooks): ``grams``, ``bases``,
    ``edge_sets`` and ``edge_attrs``."""

    def __init__(self) -> None:
        self.grams: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
        self.bases: dict[str, bases.Basis] = {}
        self.edge_sets: dict[tuple[str, str], np.ndarray] = {}
        self.edge_attrs: dict[tuple[str, str], dict] = {}

    def gram(self, layer: str, mean: np.ndarray, gram: np.ndarray, count: int) -> None:
        self.grams[layer] = (mean, gram, count)

    def basis(self, layer: str, b: bases.Basis) -> None:
        self.bases[layer] = b

    def edges(self, layer: str, next_layer: str, E: np.ndarray, attrs: dict) -> None:
        self.edge_sets[(layer, next_layer)] = E
        self.edge_attrs[(layer, next_layer)] = attrs
