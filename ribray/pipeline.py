"""The backward basis recursion (paper algorithm 1), independent of where the sums come from.

A :class:`Backend` computes per-shard partial sums (serially, or on Ray workers: see
:mod:`ribray.orchestrate`); this module reduces them in shard order, builds each node layer's
basis from the last node layer backwards, computes the edges between adjacent layers, and hands
every finished piece to a :class:`Sink` (the Zarr store) as soon as it exists.
"""

from __future__ import annotations

import contextlib
import functools
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

    # optional (phases side by side, as RayBackend): later(fn) and run_later() for the
    # driver's deferred work; m_with_edges(layer, target, C_target, edges, on_edges) -> M
    # partials, with the edges of each (layer, next_layer, C_in, C_in_pinv, C_out) in
    # ``edges`` queued behind and handed to on_edges(i, partials) when in;
    # edges_many(edges, on_edges) likewise; drain() to wait for all of it


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
    too, so these layers' bases need no pass of their own.

    With a backend that runs phases side by side (:class:`ribray.orchestrate.RayBackend`:
    ``later``, ``m_with_edges``, ``edges_many``, ``drain``), the driver's own work that the
    next pass does not wait on (writes, the jackknife and the sources' error) runs while the
    workers compute, and the edges of each layer pair whose bases are known are queued behind
    the next M pass's shards and written when they are in; their time is counted in
    ``basis_M``, and ``edges`` is what remains after the last basis."""
    try:
        return _recursion(backend, layers, widths, settings, sink, log, closed)
    except BaseException:
        flush = getattr(backend, "run_later", None)  # results already in are written first
        if flush is not None:
            with contextlib.suppress(Exception):
                flush()
        raise


def _recursion(backend: Backend, layers: list[str], widths: dict[str, int],
               settings: BasisSettings, sink: Sink, log: Callable[[str], None],
               closed: dict[tuple[str, str], ClosedM] | None) -> dict[str, float]:
    """:func:`run`'s body."""
    timings: dict[str, float] = {"gram": 0.0, "basis_M": 0.0, "edges": 0.0}
    t0 = time.perf_counter()
    later: Callable[[Callable[[], None]], None] = getattr(backend, "later", lambda fn: fn())
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sums: dict[tuple[str, str], tuple[ClosedM, dict[int, ActSums]]] = {}
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
            later(functools.partial(sink.gram, n, m.mean, gram, m.count))
        for pair, fn in (closed or {}).items():
            key = section_key(*pair)
            if all(isinstance(p.get(key), ActSums) for p in partials.values()):
                sums[pair] = fn, {s: p[key] for s, p in partials.items()}
        timings["gram"] = time.perf_counter() - t0
        log(f"gram: {len(layers)} node layers, {timings['gram']:.1f}s")

    final = layers[-1]
    results: dict[str, bases.Basis] = {}
    kept = _stored(sink, "stored_basis", final)
    results[final] = kept if kept is not None else _final_basis(final, widths, stats, settings)
    if kept is None:
        later(functools.partial(sink.basis, final, results[final]))
    # The edges of a layer pair need only the two bases, so (with a backend that can) they
    # are queued behind the next M pass: no barrier between the phases.
    pending: list[tuple[str, str]] = []

    def edge_args(layer: str, nxt: str) -> tuple:
        b_in, b_out = results[layer], results[nxt]
        return layer, nxt, b_in.C, b_in.C_pinv, b_out.C

    def write_edges(layer: str, nxt: str, partials: dict[int, Sum]) -> None:
        s = reduce_in_order(partials)
        sink.edges(layer, nxt, s.mean(), edges_error_attrs(s))

    def writer(pairs: list[tuple[str, str]], how: str) -> Callable[[int, dict[int, Sum]], None]:
        def done(i: int, partials: dict[int, Sum]) -> None:
            write_edges(*pairs[i], partials)
            log(f"edges {pairs[i][0]} -> {pairs[i][1]}: {how}")
        return done

    def m_map(layer: str, target: str, C_target: np.ndarray) -> MParts:
        if (layer, target) in sums:  # from the Gram pass's sums
            fn, by_shard = sums[(layer, target)]
            total = reduce_in_order(by_shard)
            return (Sum(total.count, fn(total, C_target)),  # per shard only for the errors
                    lambda: {s: Sum(a.count, fn(a, C_target)) for s, a in by_shard.items()})
        fused = getattr(backend, "m_with_edges", None)
        if not pending or fused is None:
            parts = backend.m(layer, target, C_target)
        else:
            pairs = list(pending)
            pending.clear()
            parts = fused(layer, target, C_target, [edge_args(*e) for e in pairs],
                          writer(pairs, f"queued behind M/{layer}"))
        return reduce_in_order(parts), lambda: parts

    for i in range(len(layers) - 2, -1, -1):
        layer, nxt = layers[i], layers[i + 1]
        t1 = time.perf_counter()
        kept = _stored(sink, "stored_basis", layer)
        if kept is not None:
            results[layer] = kept
            log(f"basis {layer}: written by an earlier run")
        else:
            results[layer], finish = _layer_basis(m_map, layer, nxt, final, widths, stats,
                                                  settings, results)
            later(functools.partial(_finish_basis, sink, layer, finish))
            timings["basis_M"] += time.perf_counter() - t1
            log(f"basis {layer}: {results[layer].n_features} features, "
                f"{time.perf_counter() - t1:.1f}s")
        if settings.compute_edges and not _stored(sink, "stored_edges", layer, nxt):
            pending.append((layer, nxt))
    t2 = time.perf_counter()
    many = getattr(backend, "edges_many", None)
    if many is not None and pending:  # the rest behind what is still running
        many([edge_args(*e) for e in pending], writer(list(pending), "after the last basis"))
    else:
        for a, b in pending:
            write_edges(a, b, backend.edges(*edge_args(a, b)))
    drain = getattr(backend, "drain", None)
    if drain is not None:
        drain()  # what is still running, and the driver's deferred work
    timings["edges"] = time.perf_counter() - t2
    return timings


def _finish_basis(sink: Sink, layer: str, finish: Callable[[], bases.Basis]) -> None:
    sink.basis(layer, finish())


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


#: M of a layer: the reduced sum, and a function giving the per-shard partials (the jackknife's)
MParts = tuple[Sum, Callable[[], dict[int, Sum]]]


def _layer_basis(m_map: Callable[[str, str, np.ndarray], MParts], layer: str,
                 nxt: str, final: str, widths: dict[str, int], stats: dict,
                 settings: BasisSettings, done: dict[str, bases.Basis]
                 ) -> tuple[bases.Basis, Callable[[], bases.Basis]]:
    """The basis of ``layer`` (M from ``m_map(layer, target, C_target)``), and a
    function that returns it with its error estimates (the jackknife over shards and the
    sources' error), which the next pass need not wait for."""
    mean, cov = stats[layer]
    const = SequentialModel.const_index(layer, widths[layer])
    if settings.kind == "neuron":
        b = bases.unrotated_basis(cov, const)
        return b, lambda: b
    assert const is not None, "only the final node layer may be `output`"
    p = bases.pca(cov, mean, const, settings.threshold, settings.threshold_mode,
                  var=SequentialModel.variance_index(layer, widths[layer]))
    if settings.kind == "pca":
        b = bases.pca_basis(p)
        return b, lambda: b
    target = nxt if settings.kind == "lib" else final
    full, partials = m_map(layer, target, done[target].C)
    b = bases.lib_basis(p, full.mean(), settings.threshold, settings.threshold_mode)
    fixed = sum(i is not None for i in (b.const_feature, b.variance_feature))

    def with_errors() -> bases.Basis:
        stab = jackknife(p, partials(), b.n_features - fixed)
        return replace(b, stability=stab.as_attrs() if stab is not None else None,
                       stochastic_error=source_error_attrs(p, full, b.n_features - fixed))

    return b, with_errors


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
