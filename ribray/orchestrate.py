"""Ray orchestration: worker actors that hold the model, shard dispatch, the driver of a job.

* :class:`LibWorker` (a Ray actor) builds the job's sequential model and data once and returns
  float64 partial sums for the shards it is given (it keeps no running totals, so a restarted
  actor loses nothing).
* :class:`RayBackend` hands shards to idle workers and collects partials keyed by shard id;
  :mod:`ribray.pipeline` reduces them in shard order, so the result does not depend on the number
  of workers or on which finishes first.
* :func:`run_job` checks the job, connects to Ray (a local instance when no address is given,
  dashboard on 127.0.0.1, Ray's token authentication left as configured), runs the recursion and
  writes the store.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from threadpoolctl import threadpool_limits

from ribray import pipeline
from ribray.build import (
    basis_settings,
    closed_m,
    compute_settings,
    fingerprint_file,
    fingerprint_tensor,
    jacobian_samples,
    load_data,
    load_sequential,
)
from ribray.checkpoints import CheckpointError
from ribray.config import JobSpec, ModAddData, RaySpec
from ribray.data import shard_ranges
from ribray.math.accumulators import ActSums, Moments
from ribray.math.examples import Examples, contexts, intervals, merge
from ribray.math.lib import exact_bytes_per_sample
from ribray.math.lm import LnIn, LnOut
from ribray.math.sequential import TokenEmbed
from ribray.progress import Event, Reporter
from ribray.shards import DEFAULT_CPU_BUDGET, ShardComputer
from ribray.store import (
    Lease,
    StoreError,
    StoreWriter,
    Where,
    check_path,
    locate,
    open_group,
    take_lease,
)

Log = Callable[[str], None]
MAX_RESTARTS = 8


def _one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the last line of its message (Ray appends the
    remote traceback above the cause)."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


class WorkerError(RuntimeError):
    """A shard's computation failed on a worker; the message names the phase and shard."""


class PreflightError(ValueError):
    """Bad input found before anything runs: ``field`` of the job file and the reason."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"field {field}: {reason}")
        self.field, self.reason = field, reason


class LibWorker:
    """Holds one copy of the model and data; computes per-shard partial sums."""

    def __init__(self, job: dict[str, Any]):
        import torch

        spec = JobSpec.model_validate(job)
        n_cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        torch.set_num_threads(n_cpus)
        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs assigned to this actor
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.device = device
        self.computer = ShardComputer(load_sequential(spec).to(device),
                                      load_data(spec).inputs.to(device), compute_settings(spec))

    def gram(self, shard: tuple[int, int], layers: list[str],
             sections: list[tuple[str, str]] | None = None):
        return self.computer.gram(shard, layers, sections)

    def m(self, shard: tuple[int, int], layer: str, target: str, C: np.ndarray):
        return self.computer.m(shard, layer, target, C)

    def edges(self, shard: tuple[int, int], layer: str, nxt: str, C_in: np.ndarray,
              C_in_pinv: np.ndarray, C_out: np.ndarray):
        return self.computer.edges(shard, layer, nxt, C_in, C_in_pinv, C_out)

    def features(self, shard: tuple[int, int], layer: str, C: np.ndarray, k: int,
                 pool_every: int):
        return self.computer.features(shard, layer, C, k, pool_every)

    def ready(self) -> dict[str, Any]:
        """Where this worker runs: device, process id and Ray node id (logged by the driver)."""
        return {"device": self.device, "pid": os.getpid(), "gpus": ray.get_gpu_ids(),
                "node": ray.get_runtime_context().get_node_id()}


#: shards in flight per worker actor
DEPTH = 2


@dataclass
class _Phase:
    """One phase in :class:`RayBackend`'s pool: its shards, cache and progress."""

    phase: str
    method: str
    shards: list[tuple[int, int]]
    cache: StoreWriter | None
    refs: list[Any]
    done: dict[int, Any] = field(default_factory=dict)
    unkept: list[int] = field(default_factory=list)  # computed, not yet kept in the store
    samples: int = 0
    computed: int = 0
    started: float = 0.0  # perf_counter when queued
    on_done: Callable[[dict[int, Any]], None] | None = None  # run once, when all are in

    @property
    def complete(self) -> bool:
        return len(self.done) == len(self.shards)

    def keep(self) -> None:
        """Keep the computed partials in the store (once the phase has run long enough)."""
        if self.cache is not None:
            for s in self.unkept:
                self.cache.save_partial(self.phase, s, self.done[s])
        self.unkept.clear()


class RayBackend:
    """The pipeline's Backend on a pool of :class:`LibWorker` actors.

    With a ``cache`` (the :class:`~ribray.store.StoreWriter`), shards' partial sums are kept
    as they arrive once a phase has run ``keep_after`` seconds (a shorter phase is cheaper to
    compute again than to keep), and the shards an earlier run kept are not computed again.
    Each finished shard is reported to ``report`` (:class:`ribray.progress.Reporter`);
    without one, a log line every two seconds.
    """

    def __init__(self, workers: list, shards: list[tuple[int, int]], log: Log,
                 cache: StoreWriter | None = None, report: Reporter | None = None,
                 job_name: str = "", tokens_per_sample: int = 1, keep_after: float = 0.0,
                 jacobian_shards: list[tuple[int, int]] | None = None):
        self.workers, self.shards, self.log, self.cache = workers, shards, log, cache
        self.jacobian_shards = jacobian_shards if jacobian_shards is not None else shards
        self.report = report or Reporter(log)
        self.job_name, self.tokens_per_sample = job_name, tokens_per_sample
        self.keep_after = keep_after
        # the pool, shared by every phase in flight: shards queued in phase order (a deque
        # popped from the left), shards in flight, and free slots (each worker holds up to
        # DEPTH shards, so the next is queued while the driver keeps the last one's partial)
        self._phases: list[_Phase] = []
        self._todo: collections.deque[tuple[_Phase, int]] = collections.deque()
        self._in_flight: dict[Any, tuple[int, _Phase, int]] = {}
        self._idle = list(range(len(workers))) * DEPTH
        self._later: list[Callable[[], None]] = []

    def later(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (the driver's own work: writes, error estimates) once the workers have
        shards to compute, so it does not hold them up; in order, all before :meth:`drain`
        returns, and before a failure is raised."""
        self._later.append(fn)

    def run_later(self) -> None:
        """Run the :meth:`later` work queued so far (also the pipeline's last step when it fails:
        results already computed are written before the error is raised)."""
        while self._later:
            self._later.pop(0)()

    def _map(self, phase: str, method: str, *args: Any) -> dict[int, Any]:
        return self._map_many([(phase, method, args)])[0]

    def _map_many(self, calls: list[tuple[str, str, tuple]]) -> list[dict[int, Any]]:
        """Each call's (phase, worker method, arguments) over its shards, all in one pool
        (:meth:`_start`), waited for together. Returns each call's partials by shard id."""
        jobs = self._start(calls)
        self._finish(jobs)
        return [j.done for j in jobs]

    def _start(self, calls: list[tuple[str, str, tuple]],
               on_done: list[Callable[[dict[int, Any]], None] | None] | None = None
               ) -> list[_Phase]:
        """Queue each call's (phase, worker method, arguments) over its shards behind those
        already queued, so a worker that finishes one phase's last shard goes on with the
        next phase's instead of waiting at a barrier. ``on_done[i]`` receives call i's
        partials by shard id once all are in (the driver, between other phases' shards)."""
        jobs = [_Phase(phase, method, self._shards(method), self._cache(method),
                       [ray.put(a) if isinstance(a, np.ndarray) else a for a in args],
                       started=time.perf_counter(), on_done=on_done[i] if on_done else None)
                for i, (phase, method, args) in enumerate(calls)]
        for j in jobs:
            j.done = j.cache.load_partials(j.phase) if j.cache else {}
            if j.done:
                self.log(f"  {j.phase}: {len(j.done)}/{len(j.shards)} shards kept by an "
                         f"earlier run")
            self._todo.extend((j, s) for s in range(len(j.shards)) if s not in j.done)
        self._phases.extend(jobs)
        self._dispatch()
        return jobs

    def _dispatch(self) -> None:
        while self._todo and self._idle:
            w, (j, s) = self._idle.pop(), self._todo.popleft()
            ref = getattr(self.workers[w], j.method).remote(j.shards[s], *j.refs)
            self._in_flight[ref] = (w, j, s)

    def _finish(self, jobs: list[_Phase]) -> None:
        """Run the pool until every phase in ``jobs`` is complete (others go on meanwhile);
        the driver's :meth:`later` work runs while the workers compute."""
        try:
            self._settle()
            while not all(j.complete for j in jobs):
                self._dispatch()
                self.run_later()
                if not self._in_flight:  # only after a failure dropped the queue
                    raise RuntimeError("phases left incomplete by an earlier failure")
                ready, _ = ray.wait(list(self._in_flight), num_returns=1)
                for ref in ready:
                    w, j, s = self._in_flight.pop(ref)
                    self._idle.append(w)
                    j.done[s] = self._result(ref, j.phase, s, j.shards[s])
                    j.unkept.append(s)
                    j.samples += j.shards[s][1] - j.shards[s][0]
                    j.computed += 1
                    self._report(j, time.perf_counter() - j.started)
                self._dispatch()
                now = time.perf_counter()
                for j in self._phases:
                    if not j.complete and now - j.started >= self.keep_after:
                        j.keep()
                self._settle()
        except BaseException:
            for ref in self._in_flight:  # queued shards would otherwise be retried on dying actors
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
            self._in_flight.clear()
            self._todo.clear()
            self._phases.clear()
            with contextlib.suppress(Exception):  # results already in are written first
                self.run_later()
            raise

    def _settle(self) -> None:
        """Hand each newly complete phase's partials to its ``on_done``; forget it."""
        for j in [j for j in self._phases if j.complete]:
            self._phases.remove(j)
            if j.on_done is not None:
                j.on_done(j.done)

    def drain(self) -> None:
        """Wait for every phase still in the pool and run the driver's :meth:`later` work."""
        self._finish(list(self._phases))
        self.run_later()

    def _shards(self, method: str) -> list[tuple[int, int]]:
        return self.shards if method in ("gram", "features") else self.jacobian_shards

    def _cache(self, method: str) -> StoreWriter | None:
        return self.cache if method != "features" else None  # candidates are not kept

    def _report(self, j: _Phase, elapsed: float) -> None:
        rate = j.samples / elapsed if elapsed > 0 else 0.0
        self.report(Event(self.job_name, j.phase, len(j.done), len(j.shards), elapsed, rate,
                          rate * self.tokens_per_sample, j.computed))

    @staticmethod
    def _result(ref: Any, phase: str, s: int, shard: tuple[int, int]) -> Any:
        """A shard's partial, checked finite; a worker's failure as one :class:`WorkerError`."""
        try:
            partial = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if exc.cause is not None else exc
            raise WorkerError(f"{phase}, shard {s} {shard}: {type(cause).__name__}: "
                              f"{cause}") from None
        except ray.exceptions.RayActorError as exc:
            raise WorkerError(f"{phase}, shard {s} {shard}: worker died and could not be "
                              f"restarted ({type(exc).__name__})") from None
        check_partial(partial, f"{phase}, shard {s} {shard}")
        return partial

    def gram(self, layers: list[str], sections: list[tuple[str, str]] | None = None):
        return self._map("gram", "gram", layers, sections or [])

    def m(self, layer: str, target: str, C_target: np.ndarray):
        return self._map(f"M/{layer}", "m", layer, target, C_target)

    def features(self, layer: str, C: np.ndarray, k: int, pool_every: int):
        return self._map(f"features/{layer}", "features", layer, C, k, pool_every)

    def edges(self, layer: str, next_layer: str, C_in: np.ndarray, C_in_pinv: np.ndarray,
              C_out: np.ndarray):
        return self._map_many([self._edge_call(layer, next_layer, C_in, C_in_pinv, C_out)])[0]

    def m_with_edges(self, layer: str, target: str, C_target: np.ndarray,
                     edges: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]],
                     on_edges: Callable[[int, dict[int, Any]], None]) -> dict[int, Any]:
        """:meth:`m` of ``layer``, with :meth:`edges` of each (layer, next_layer, C_in,
        C_in_pinv, C_out) in ``edges`` queued behind its shards (all need only bases already
        known). Returns once M's shards are in; the edges go on meanwhile, and each edge set's
        partials go to ``on_edges(i, partials)`` once complete (at the latest in
        :meth:`drain`)."""
        jobs = self._start([(f"M/{layer}", "m", (layer, target, C_target))]
                           + [self._edge_call(*e) for e in edges],
                           [None] + [functools.partial(on_edges, i) for i in range(len(edges))])
        self._finish(jobs[:1])
        return jobs[0].done

    def edges_many(self, edges: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]],
                   on_edges: Callable[[int, dict[int, Any]], None]) -> None:
        """:meth:`edges` of several layer pairs, queued behind what is in the pool; each
        set's partials go to ``on_edges(i, partials)`` once complete (see :meth:`drain`)."""
        self._start([self._edge_call(*e) for e in edges],
                    [functools.partial(on_edges, i) for i in range(len(edges))])

    @staticmethod
    def _edge_call(layer: str, nxt: str, C_in: np.ndarray, C_in_pinv: np.ndarray,
                   C_out: np.ndarray) -> tuple[str, str, tuple]:
        return f"edges/{layer}--{nxt}", "edges", (layer, nxt, C_in, C_in_pinv, C_out)


def _feature_examples(job: JobSpec, backend: RayBackend, writer: StoreWriter, inputs: Any,
                      log: Log) -> None:
    """Top, bottom and interval examples of each LIB feature of ``features.layers``
    (:mod:`ribray.math.examples`), with their token contexts, into ``features/``."""
    spec = job.features
    assert spec is not None
    tokens = inputs.cpu().numpy() if inputs.ndim == 2 and not inputs.is_floating_point() \
        else None
    for layer in spec.layers:
        if writer.stored_features(layer):
            log(f"features {layer}: written by an earlier run")
            continue
        basis = writer.stored_basis(layer)
        assert basis is not None, f"the basis of {layer} is written before its examples"
        parts = backend.features(layer, basis.C, spec.top_k, spec.pool_every)
        ex = merge([parts[s] for s in sorted(parts)], spec.top_k)
        iv = intervals(ex, spec.intervals, spec.per_interval)
        ctx = None
        if tokens is not None:
            ctx = {name: contexts(tokens, smp, pos, spec.context) for name, smp, pos in (
                ("top", ex.top_sample, ex.top_position),
                ("bottom", ex.bottom_sample, ex.bottom_position),
                ("interval", iv.sample, iv.position))}
        writer.features(layer, ex, iv, ctx, spec.model_dump())
        log(f"features {layer}: top/bottom {spec.top_k} and {spec.intervals} intervals of "
            f"{basis.n_features} features ({ex.pool_sample.size} pooled rows)")


def check_partial(partial: Any, what: str) -> None:
    """Raise FloatingPointError naming the phase and shard if a partial sum is not finite."""
    parts = partial.values() if isinstance(partial, dict) else [partial]
    for p in parts:
        if isinstance(p, Moments):
            arrays = [p.mean, p.comoment]
        elif isinstance(p, Examples):
            arrays = [p.top_value, p.bottom_value, p.pool_value]
        elif isinstance(p, ActSums):
            arrays = [a for a in (p.g_sum, p.gram) if a is not None]
        else:
            arrays = [p.total] + ([] if p.per_source is None else [p.per_source])
        if not all(np.isfinite(a).all() for a in arrays):
            raise FloatingPointError(f"non-finite values in the partial sums of {what}")


def driver_threads(where: list[dict[str, Any]], cpus_per_worker: float,
                   cpu_count: int | None = None) -> int:
    """BLAS and OpenMP threads for the driver's own math (reductions, eigendecompositions)
    while the workers run: the CPUs of the driver's node that no worker on it holds, at least
    one. Idle BLAS threads wait spinning for a while after each call; on a node whose cores
    the workers hold, they would take those cores from the workers."""
    here = ray.get_runtime_context().get_node_id()
    held = sum(cpus_per_worker for w in where if w["node"] == here)
    return max(1, int((cpu_count or os.cpu_count() or 1) - held))


def connect(address: str | None, dashboard: bool = True) -> None:
    """Connect to Ray: the given cluster, or a new local instance (dashboard on 127.0.0.1)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=True)


def placement(spec: RaySpec | Any) -> tuple[int, float]:
    """(number of workers, GPUs per worker) for a job's ``ray`` settings (any object with
    ``num_workers``, ``cpus_per_worker`` and ``gpus_per_worker``): one worker per GPU when the
    cluster has GPUs and the settings do not say otherwise, else one per ``cpus_per_worker``
    CPUs. Raises :class:`PreflightError` when the cluster cannot hold them, except with
    ``autoscaling``, where the settings are taken as given and the actors wait for nodes."""
    if getattr(spec, "autoscaling", False):  # validated: both are given
        return spec.num_workers, spec.gpus_per_worker
    res = ray.cluster_resources()
    gpus = spec.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if res.get("GPU", 0) >= 1 else 0.0
    if gpus > res.get("GPU", 0):
        raise PreflightError("ray.gpus_per_worker", f"{gpus:g} GPUs per worker asked for, the "
                                                    f"cluster has {res.get('GPU', 0):g}")
    if spec.num_workers:
        n = spec.num_workers
        if n * spec.cpus_per_worker > res.get("CPU", 0) or n * gpus > res.get("GPU", 0):
            raise PreflightError("ray.num_workers", f"{n} workers × ({spec.cpus_per_worker:g} "
                                                    f"CPU, {gpus:g} GPU) exceed the cluster's "
                                                    f"{res.get('CPU', 0):g} CPUs and "
                                                    f"{res.get('GPU', 0):g} GPUs")
        return n, gpus
    if gpus > 0:
        return max(1, int(res.get("GPU", 0) // gpus)), gpus
    return max(1, int(res.get("CPU", 1) // spec.cpus_per_worker)), gpus


def check_job(job: JobSpec) -> dict[str, Any]:
    """Checkpoint, node layers and data of a job; raises :class:`PreflightError`."""
    try:
        model = load_sequential(job)
    except CheckpointError as exc:
        raise PreflightError("model.path", str(exc)) from None
    layers = job.basis.node_layers
    try:
        model.check_order(layers)
    except (KeyError, ValueError) as exc:
        raise PreflightError("basis.node_layers", exc.args[0]) from None
    vocab = model.embed.W_E.shape[0] if isinstance(model.embed, TokenEmbed) else None
    try:
        data = load_data(job, vocab)
    except (OSError, ValueError) as exc:  # a missing or malformed file, text that does not fit
        raise PreflightError("data.path", str(exc)) from None
    if len(data) == 0:
        raise PreflightError("data", "the data set selection is empty")
    if isinstance(job.data, ModAddData) and isinstance(model.embed, TokenEmbed):
        p, vocab = job.data.modulus, model.embed.W_E.shape[0]
        if p + 1 != vocab:
            raise PreflightError("data.modulus", f"modulus {p} needs a vocabulary of {p + 1} "
                                                 f"tokens (0..{p - 1} and '='), the model has "
                                                 f"{vocab}")
    problem = model.input_problem(data.inputs)
    if problem:
        raise PreflightError("data", problem)
    _check_memory(job, model, data.inputs)
    return {"model": model, "n_samples": len(data), "data": data}


def _check_memory(job: JobSpec, model: Any, inputs: Any) -> None:
    """Refuse, before anything runs, a job whose exact-path sections cannot take one sample
    within the memory budget (the job's, else 4 GiB on CPU workers; GPU workers learn their
    device's size when they start, so without a budget in the job they are not checked)."""
    if job.ray.memory_budget_gb is not None:
        budget = int(job.ray.memory_budget_gb * 2**30)
    elif not job.ray.gpus_per_worker:
        budget = DEFAULT_CPU_BUDGET
    else:
        return
    T = int(inputs.shape[1]) if inputs.ndim == 2 and not inputs.is_floating_point() else 1
    layers = job.basis.node_layers
    targets = zip(layers[:-1], layers[1:]) if job.basis.kind != "gib" else \
        ((a, layers[-1]) for a in layers[:-1])
    n_points = max(job.basis.integration.n, job.edges.integration.n) + 1
    for a, b in targets:
        if model.section_parts(a, b) is not None or isinstance(model.section_step(a, b),
                                                                (LnIn, LnOut)):
            continue  # closed forms: per-row moments, no autograd graph
        need = exact_bytes_per_sample(model, a, b, T, n_points)
        if need > budget:
            raise PreflightError("ray.memory_budget_gb", f"one sample of the section {a} -> {b}"
                                 f" needs about {need / 2**30:.2f} GiB on the exact path "
                                 f"({T} positions), more than the {budget / 2**30:.2f} GiB a "
                                 f"worker may use; raise the budget or shorten data.n_ctx")


def preflight(job: JobSpec, out: Where, overwrite: bool) -> dict[str, Any]:
    """Everything that can be checked before Ray starts: checkpoint, node layers, data, output.
    Changes nothing on disk; raises :class:`PreflightError`."""
    checked = check_job(job)
    model, layers, data = checked["model"], job.basis.node_layers, checked["data"]
    prints = {"model": fingerprint_file(job.model.path), "data": fingerprint_tensor(data.inputs)}
    try:
        config = job.model_copy(update={"out": str(locate(out))}).model_dump()
        state = check_path(out, overwrite, config)
    except StoreError as exc:
        raise PreflightError("out", str(exc)) from None
    if state != "new":
        old = dict(open_group(out, mode="r").attrs).get("fingerprints", {})
        for what in ("model", "data"):
            if old.get(what) != prints[what]:
                raise PreflightError("out", f"{out}: the store was started with another "
                                            f"{'checkpoint' if what == 'model' else 'data set'}"
                                            f" (sha256 differs); pass --overwrite to replace it")
    tokens = int(data.inputs.shape[1]) if isinstance(model.embed, TokenEmbed) else 1
    n_shards = len(shard_ranges(len(data), job.ray.shard_size))
    return {"widths": {n: model.width(n) for n in layers}, "n_samples": len(data), "data": data,
            "fingerprints": prints, "state": state, "tokens_per_sample": tokens,
            "closed": closed_m(job, model, len(data), n_shards)}


def run_job(job: JobSpec, out: Where, address: str | None = None, overwrite: bool = False,
            dashboard: bool = True, log: Log = print, bars: bool = False,
            on_progress: Callable[[Event], None] | None = None) -> dict[str, float]:
    """Run a LIB job end to end and write the store at ``out``; returns seconds per phase.
    ``bars``: rich progress bars on stderr instead of progress log lines; ``on_progress``
    receives every :class:`ribray.progress.Event` (one per finished shard)."""
    t_start = time.perf_counter()
    info = preflight(job, out, overwrite)
    if info["state"] == "complete":
        log(f"{job.name}: {out} is complete already (same job); nothing to do")
        return dict(open_group(out, mode="r").attrs.get("timings", {}))
    if info["state"] == "resume":
        log(f"{job.name}: resuming {out}: only what is not complete is computed")
    try:  # taken before Ray starts: a second writer is refused as a pre-flight error
        lease = take_lease(out)
    except StoreError as exc:
        raise PreflightError("out", str(exc)) from None
    try:
        return _run(job, out, address, overwrite, dashboard, log, bars, on_progress, info,
                    lease, t_start)
    finally:
        lease.release()  # a no-op once the writer released it; never another job's lease


def _run(job: JobSpec, out: Where, address: str | None, overwrite: bool, dashboard: bool,
         log: Log, bars: bool, on_progress: Callable[[Event], None] | None,
         info: dict[str, Any], lease: Lease, t_start: float) -> dict[str, float]:
    t_pre = time.perf_counter()
    connect(address, dashboard)
    t_ray = time.perf_counter()
    n_workers, gpus = placement(job.ray)
    # restarts are bounded, so a worker that always dies (out of memory, say) ends the job;
    # task retries then last as long as the actor can come back
    opts: dict[str, Any] = {"num_cpus": job.ray.cpus_per_worker,
                            "max_restarts": MAX_RESTARTS, "max_task_retries": -1}
    if gpus:
        opts["num_gpus"] = gpus
    actor = ray.remote(**opts)(LibWorker)
    job = job.model_copy(update={"out": str(locate(out))})  # where it was written
    job_dict = job.model_dump()
    workers = [actor.remote(job_dict) for _ in range(n_workers)]
    if job.ray.autoscaling:
        log(f"{job.name}: waiting for {n_workers} workers ({job.ray.cpus_per_worker:g} CPU, "
            f"{gpus:g} GPU each); the autoscaler adds nodes as needed")
    writer: StoreWriter | None = None
    try:
        try:
            where = ray.get([w.ready.remote() for w in workers])  # models loaded first
        except ray.exceptions.RayError as exc:
            raise WorkerError(f"a worker failed to start: {_one_line(exc)}") from None
        t_workers = time.perf_counter()
        shards = shard_ranges(info["n_samples"], job.ray.shard_size)
        n_jac = jacobian_samples(job, info["n_samples"])
        jac_shards = shard_ranges(n_jac, job.ray.shard_size)
        log(f"{job.name}: {info['n_samples']} samples in {len(shards)} shards on {n_workers} "
            f"workers ({', '.join(sorted({w['device'] for w in where}))}); node layers "
            f"{', '.join(job.basis.node_layers)}")
        if n_jac != info["n_samples"]:
            log(f"  M and edges on the first {n_jac} samples ({len(jac_shards)} shards)")
        for i, w in enumerate(where):
            log(f"  worker {i}: pid {w['pid']} on node {w['node']} ({w['device']}, GPU ids "
                f"{w['gpus'] or 'none'})")
        writer = StoreWriter(out, {
            "config": job_dict, "config_hash": job.fingerprint(),
            "node_layers": list(job.basis.node_layers), "basis": job.basis.kind,
            "fingerprints": info["fingerprints"], "n_samples": info["n_samples"],
            "n_jacobian_samples": n_jac},
            overwrite=overwrite, lease=lease)
        report = Reporter(log, store_progress=writer.progress, bars=bars,
                          listener=on_progress)
        tokens = info["tokens_per_sample"]
        try:
            backend = RayBackend(workers, shards, log, cache=writer, report=report,
                                 keep_after=job.ray.keep_partials_after_s,
                                 jacobian_shards=jac_shards, job_name=job.name,
                                 tokens_per_sample=tokens)
            with threadpool_limits(driver_threads(where, job.ray.cpus_per_worker)):
                timings = pipeline.run(backend, list(job.basis.node_layers), info["widths"],
                                       basis_settings(job), writer, log, info["closed"])
                if job.features is not None:
                    t_f = time.perf_counter()
                    _feature_examples(job, backend, writer, info["data"].inputs, log)
                    timings["features"] = time.perf_counter() - t_f
        finally:
            report.close()
        timings["preflight"] = t_pre - t_start
        timings["ray_start"] = t_ray - t_pre
        timings["workers_start"] = t_workers - t_ray
        timings["total"] = time.perf_counter() - t_start
        writer.finish(timings)
    except BaseException as exc:
        if writer is not None and writer.root.attrs.get("status") != "complete":
            writer.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        for w in workers:
            with contextlib.suppress(Exception):  # the results are in; never fail on cleanup
                ray.kill(w)
    log(f"{job.name}: complete in {timings['total']:.1f}s -> {out}")
    return timings
