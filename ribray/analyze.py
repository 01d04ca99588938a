"""The graph-analysis job (paper section 2.3): ablations, bisect search, modules and labels.

``ribray analyze STORE`` reads a complete store written by ``ribray submit``, evaluates ablated
models on Ray workers, and writes ``analysis/`` into the store (docs/zarr-layout.md), then draws
the plots and the HTML report (:mod:`ribray.plots`, :mod:`ribray.report`).

* :class:`AnalysisWorker` (a Ray actor) holds the model, the evaluation data and the store's
  bases and edges; each call evaluates one ablated model and returns its score. It keeps no
  state that matters across calls (only cached activations), so a restarted actor loses nothing.
* The driver runs one :class:`~ribray.math.ablation.Search` per layer pair and the node-ablation
  points at once: every probe of every search and every node point is a task handed to the
  next idle worker; a search moves to its next round when all probes of its round are in. The
  results do not depend on the number of workers or the order in which they finish.
* Modularity (Leiden, seeded) runs on the driver once the searches have fixed ε per layer pair.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from pydantic import TypeAdapter, ValidationError

from ribray.build import fingerprint_file, load_dataset, load_sequential
from ribray.checkpoints import CheckpointError
from ribray.config import AnalysisSpec, DataSpec, JobSpec, ModAddData
from ribray.data import modular_addition
from ribray.math import ablation
from ribray.math.lib import check_finite
from ribray.math.modularity import LayerEdges, build_graph, leiden
from ribray.math.sequential import SequentialModel
from ribray.orchestrate import PreflightError, WorkerError, _one_line, connect, placement
from ribray.store import AnalysisWriter, Where, check_analysis_target, edge_group

Log = Callable[[str], None]
MAX_RESTARTS = 8


@dataclass(frozen=True)
class StoreContents:
    """What the analysis reads from a store: its job, node layers, bases and edges."""

    job: JobSpec
    node_layers: list[str]
    bases: dict[str, dict[str, Any]]  # layer -> C, C_pinv, lambdas, const_feature
    edges: dict[str, np.ndarray]  # "in--out" -> E (out, in)


def read_store(root) -> StoreContents:
    attrs = dict(root.attrs)
    job = JobSpec.model_validate(attrs["config"])
    layers = list(attrs["node_layers"])
    bases = {}
    for name in layers:
        g = root[f"layers/{name}"]
        bases[name] = {"C": np.asarray(g["C"][...]), "C_pinv": np.asarray(g["C_pinv"][...]),
                       "lambdas": np.asarray(g["lambdas"][...]),
                       "const_feature": g.attrs.get("const_feature")}
    edges = {}
    for a, b in zip(layers[:-1], layers[1:]):
        key = edge_group(a, b)
        if key in root:
            edges[f"{a}--{b}"] = np.asarray(root[key]["E"][...])
    return StoreContents(job=job, node_layers=layers, bases=bases, edges=edges)


def resolve_layers(spec: AnalysisSpec, store_layers: list[str]) -> list[str]:
    """The analysis's node layers: a consecutive run of the store's (PreflightError if not)."""
    layers = spec.node_layers or store_layers
    missing = [n for n in layers if n not in store_layers]
    if missing:
        raise PreflightError("node_layers", f"{missing[0]!r} is not a node layer of the store "
                                            f"({', '.join(store_layers)})")
    start = store_layers.index(layers[0])
    if store_layers[start: start + len(layers)] != layers or len(layers) < 2:
        raise PreflightError("node_layers", "must be at least two consecutive node layers of "
                                            f"the store ({', '.join(store_layers)})")
    return layers


def resolve_data(spec: AnalysisSpec, job: JobSpec):
    """The evaluation data: the store's data spec with the analysis's fields merged over it;
    by default the held-out split (``split: test``) where the data set has one."""
    base = job.data.model_dump()
    if spec.data.get("kind", base["kind"]) != base["kind"]:
        base = {}  # another kind of data: nothing of the store's spec applies
    merged = {**base, **spec.data}
    if "split" in base and "split" not in spec.data:
        merged["split"] = "test"
    if "n_samples" not in spec.data:  # the job's sample cap limited the basis data, not this
        merged.pop("n_samples", None)
    try:
        return TypeAdapter(DataSpec).validate_python(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if p not in ("modular-addition", "digits",
                                                                "npz"))
        raise PreflightError(f"data.{loc}" if loc else "data",
                             err["msg"].removeprefix("Value error, ")) from None


def node_points(n: int, points: int | None) -> list[int]:
    """Kept-feature counts for node ablation: all of 1..n, or ``points`` log-spaced ones."""
    if points is None or points >= n:
        return list(range(1, n + 1))
    return sorted({int(round(v)) for v in np.geomspace(1, n, points)} | {n})


def score_of(stat: tuple[float, int]) -> float:
    total, count = stat
    return total / count


class AnalysisWorker:
    """Holds the model, evaluation data, bases and edges; evaluates ablated models."""

    def __init__(self, job: dict[str, Any], data: dict[str, Any], bases: dict[str, Any],
                 edges: dict[str, np.ndarray], score_kind: str, batch_size: int):
        spec = JobSpec.model_validate(job)
        n_cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        torch.set_num_threads(n_cpus)
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.core = AblationCore(load_sequential(spec).to(self.device),
                                 load_dataset(TypeAdapter(DataSpec).validate_python(data)),
                                 bases, edges, score_kind, batch_size, self.device)

    def ready(self) -> str:
        return self.device

    def base(self) -> tuple[float, int]:
        return self.core.base()

    def edge_score(self, pair: str, n_keep: int) -> tuple[float, int]:
        return self.core.edge_score(pair, n_keep)

    def node_score(self, layer: str, n_keep: int) -> tuple[float, int]:
        return self.core.node_score(layer, n_keep)

    def fourier(self, layers: list[str], p: int, top: int) -> dict[str, Any]:
        return self.core.fourier(layers, p, top)


class AblationCore:
    """The evaluations themselves, without Ray (the actor wraps one; tests call it directly).

    Activations at each node layer of the evaluation data are computed once and cached.
    """

    def __init__(self, model: SequentialModel, data, bases: dict[str, Any],
                 edges: dict[str, np.ndarray], score_kind: str, batch_size: int,
                 device: str = "cpu"):
        self.model, self.device = model, device
        self.inputs, self.labels = data.inputs.to(device), data.labels.to(device)
        dtype = next(model.parameters()).dtype
        self.bases = {n: {k: torch.tensor(np.array(b[k]), dtype=dtype, device=device)
                          for k in ("C", "C_pinv")} | {"const": b["const_feature"]}
                      for n, b in bases.items()}
        self.edges = edges
        self.orders = {pair: ablation.edge_order(E, *self._consts(pair))
                       for pair, E in edges.items()}
        self.score_fn = ablation.SCORES[score_kind]
        self.batch_size = batch_size
        self._acts: dict[str, list[torch.Tensor]] = {}

    def _consts(self, pair: str) -> tuple[int | None, int | None]:
        a, b = pair.split("--")
        return self.bases[a]["const"], self.bases[b]["const"]

    def _batches(self) -> list[slice]:
        n = self.inputs.shape[0]
        return [slice(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]

    def _activations(self, layer: str) -> list[torch.Tensor]:
        if layer not in self._acts:
            with torch.no_grad():
                self._acts[layer] = [self.model.activations(self.inputs[s], [layer])[layer]
                                     for s in self._batches()]
        return self._acts[layer]

    def _finish(self, x: torch.Tensor, start: str, s: slice) -> tuple[float, int]:
        logits = self.model.run(x, start, "output")[:, -1, :]
        check_finite(logits, f"the logits of samples {s.start}..{s.stop - 1} (from {start})")
        return self.score_fn(logits, self.labels[s])

    @staticmethod
    def _add(stats: list[tuple[float, int]]) -> tuple[float, int]:
        return sum(t for t, _ in stats), sum(c for _, c in stats)

    @torch.no_grad()
    def base(self) -> tuple[float, int]:
        first = self.model.names[0]
        return self._add([self._finish(self.model.embed(self.inputs[s]), first, s)
                          for s in self._batches()])

    @torch.no_grad()
    def edge_score(self, pair: str, n_keep: int) -> tuple[float, int]:
        a, b = pair.split("--")
        E, order = self.edges[pair], self.orders[pair]
        keep = ablation.edge_mask(E.shape, order, n_keep)
        ba, bb = self.bases[a], self.bases[b]
        stats = []
        for s, x in zip(self._batches(), self._activations(a)):
            y = ablation.ablate_edges(lambda z, a=a, b=b: self.model.run(z, a, b), x, keep,
                                      ba["C"], ba["C_pinv"], bb["C"], bb["C_pinv"])
            stats.append(self._finish(y, b, s))
        return self._add(stats)

    @torch.no_grad()
    def node_score(self, layer: str, n_keep: int) -> tuple[float, int]:
        b = self.bases[layer]
        P = ablation.node_projection(b["C"], b["C_pinv"], n_keep)
        return self._add([self._finish(x @ P, layer, s)
                          for s, x in zip(self._batches(), self._activations(layer))])

    @torch.no_grad()
    def fourier(self, layers: list[str], p: int, top: int) -> dict[str, Any]:
        """Fourier labels (appendix F) of each layer's features on the full p×p grid."""
        from ribray.math.fourier import fourier_labels

        grid = modular_addition(p, 0.5, 0, "all").inputs.to(self.device)  # row-major (x, y)
        acts = self.model.activations(grid, layers)
        out = {}
        for name in layers:
            f_hat = (acts[name] @ self.bases[name]["C"]).double().cpu().numpy()
            # a feature that is constant over the grid at one position (all of them at the
            # '=' token of the first layer) varies only by round-off: label it "constant"
            var = f_hat.var(axis=0)  # (position, feature)
            f_hat[:, var <= 1e-20 * var.max()] = 0.0
            per_pos = [fourier_labels(f_hat[:, t, :], p, top=top) for t in range(f_hat.shape[1])]
            out[name] = {"group_power": np.stack([r.group_power for r in per_pos]),
                         "explained": np.stack([r.explained for r in per_pos]),
                         "labels": [list(r.labels) for r in per_pos]}
        return out


class Pool:
    """Tasks for a list of actors: each task goes to the next idle actor."""

    def __init__(self, workers: list):
        self.workers = workers
        self.idle = list(range(len(workers)))[::-1]
        self.in_flight: dict[Any, tuple[int, Any, str]] = {}

    def submit(self, key: Any, method: str, *args: Any, what: str = "") -> None:
        w = self.idle.pop()
        ref = getattr(self.workers[w], method).remote(*args)
        self.in_flight[ref] = (w, key, what or method)

    def has_idle(self) -> bool:
        return bool(self.idle)

    def wait_one(self) -> tuple[Any, Any]:
        ready, _ = ray.wait(list(self.in_flight), num_returns=1)
        w, key, what = self.in_flight.pop(ready[0])
        self.idle.append(w)
        try:
            return key, ray.get(ready[0])
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if exc.cause is not None else exc
            raise WorkerError(f"{what}: {type(cause).__name__}: {cause}") from None
        except ray.exceptions.RayActorError as exc:
            raise WorkerError(f"{what}: worker died and could not be restarted "
                              f"({type(exc).__name__})") from None


@dataclass
class Plan:
    """Everything resolved before Ray starts."""

    spec: AnalysisSpec
    contents: StoreContents
    layers: list[str]
    pairs: list[tuple[str, str]]
    data: Any
    n_samples: int
    fourier_p: int | None


def plan(store: Where, spec: AnalysisSpec, overwrite: bool) -> Plan:
    """Check the store, the analysis settings and the model against each other; changes
    nothing. Raises StoreError or PreflightError with one line."""
    root = check_analysis_target(store, overwrite)
    contents = read_store(root)
    if getattr(contents.job.data, "kind", None) == "text":
        raise PreflightError("data", "the analysis of language-model stores (scores over every "
                                     "position) is not supported yet; the store's features/ "
                                     "and stability are there to read")
    layers = resolve_layers(spec, contents.node_layers)
    pairs = list(zip(layers[:-1], layers[1:]))
    if spec.edge_ablation.enabled or spec.modularity.enabled:
        missing = [f"{a}--{b}" for a, b in pairs if f"{a}--{b}" not in contents.edges]
        if missing:
            raise PreflightError("edge_ablation", f"the store has no edges {missing[0]} (it was "
                                                  f"written with edges.enabled: false); set "
                                                  f"edge_ablation.enabled and "
                                                  f"modularity.enabled to false")
    if spec.modularity.enabled and not spec.edge_ablation.enabled:
        raise PreflightError("modularity", "ε of eq. 3 comes from the edge-ablation search; "
                                           "enable edge_ablation too")
    data = resolve_data(spec, contents.job)
    if spec.labels.fourier == "on" and not isinstance(data, ModAddData):
        raise PreflightError("labels.fourier", "Fourier labels need modular-addition data")
    try:
        model = load_sequential(contents.job)
    except CheckpointError as exc:
        raise PreflightError("model", f"the store's checkpoint: {exc}") from None
    recorded = dict(root.attrs).get("fingerprints", {}).get("model")
    if recorded and fingerprint_file(contents.job.model.path) != recorded:
        raise PreflightError("model", f"{contents.job.model.path} has changed since the store "
                                      f"was written (sha256 differs); its bases belong to the "
                                      f"old checkpoint")
    try:
        ds = load_dataset(data)
    except (OSError, ValueError) as exc:
        raise PreflightError("data.path", str(exc)) from None
    if len(ds) == 0:
        raise PreflightError("data", "the evaluation data selection is empty")
    problem = model.input_problem(ds.inputs)
    if problem:
        raise PreflightError("data", problem)
    n_classes = model.width("output")
    if int(ds.labels.min()) < 0 or int(ds.labels.max()) >= n_classes:
        raise PreflightError("data", f"labels span {int(ds.labels.min())}..{int(ds.labels.max())}"
                                     f" but the model has {n_classes} outputs")
    fourier_p = None
    if spec.labels.fourier != "off" and isinstance(data, ModAddData):
        fourier_p = data.modulus
    return Plan(spec, contents, layers, pairs, data, len(ds), fourier_p)


def run_analysis(store: Where, spec: AnalysisSpec, address: str | None = None,
                 overwrite: bool = False, dashboard: bool = True,
                 log: Log = print) -> dict[str, Any]:
    """Run the analysis of ``store`` on Ray and write ``analysis/`` into it; then plots and the
    report. Returns a summary (see :func:`ribray.store.analysis_summary`)."""
    t0 = time.perf_counter()
    p = plan(store, spec, overwrite)
    connect(address, dashboard)
    n_workers, gpus = placement(spec.ray)
    opts: dict[str, Any] = {"num_cpus": spec.ray.cpus_per_worker, "max_restarts": MAX_RESTARTS,
                            "max_task_retries": -1}
    if gpus:
        opts["num_gpus"] = gpus
    actor = ray.remote(**opts)(AnalysisWorker)
    bases_ref = ray.put(p.contents.bases)
    edges_ref = ray.put({f"{a}--{b}": p.contents.edges[f"{a}--{b}"] for a, b in p.pairs
                         if f"{a}--{b}" in p.contents.edges})
    workers = [actor.remote(p.contents.job.model_dump(), p.data.model_dump(), bases_ref,
                            edges_ref, spec.score.kind, spec.ray.batch_size)
               for _ in range(n_workers)]
    writer: AnalysisWriter | None = None
    timings: dict[str, float] = {}
    try:
        try:
            devices = ray.get([w.ready.remote() for w in workers])
        except ray.exceptions.RayError as exc:
            raise WorkerError(f"a worker failed to start: {_one_line(exc)}") from None
        log(f"analysis of {store}: {p.n_samples} evaluation samples "
            f"({p.data.model_dump().get('split', p.data.kind)}), layers {', '.join(p.layers)}, "
            f"{n_workers} workers ({', '.join(sorted(set(devices)))})")
        writer = AnalysisWriter(store, {
            "config": spec.model_dump(), "data": p.data.model_dump(),
            "node_layers": p.layers, "score_kind": spec.score.kind,
            "tolerance": spec.score.resolved_tolerance}, overwrite=overwrite)
        results = _evaluate(Pool(workers), p, writer, log, timings)
        t = time.perf_counter()
        if spec.modularity.enabled:
            _modularity(p, results["epsilons"], writer, log)
        timings["modularity"] = time.perf_counter() - t
        t = time.perf_counter()
        if p.fourier_p is not None:
            pool = Pool(workers)
            pool.submit("labels", "fourier", p.layers, p.fourier_p, spec.labels.top,
                        what="Fourier labels")
            _, labels = pool.wait_one()
            for name, lab in labels.items():
                writer.labels(name, lab["group_power"], lab["labels"], lab["explained"],
                              p.fourier_p)
        timings["labels"] = time.perf_counter() - t
    except BaseException as exc:
        if writer is not None:
            writer.fail(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        for w in workers:
            with contextlib.suppress(Exception):
                ray.kill(w)
    timings["total_compute"] = time.perf_counter() - t0
    writer.finish({"timings": timings})
    log(f"analysis complete in {timings['total_compute']:.1f}s")
    return timings


def _evaluate(pool: Pool, p: Plan, writer: AnalysisWriter, log: Log,
              timings: dict[str, float]) -> dict[str, Any]:
    """Base score, then every search probe and node point as tasks on the pool."""
    spec, kind, tol = p.spec, p.spec.score.kind, p.spec.score.resolved_tolerance
    t = time.perf_counter()
    pool.submit("base", "base", what="unablated model")
    _, stat = pool.wait_one()
    base = score_of(stat)
    writer.base(base, stat[1])
    log(f"  unablated {kind}: {base:.6g}")
    timings["base"] = time.perf_counter() - t
    t = time.perf_counter()

    searches: dict[str, ablation.Search] = {}
    orders: dict[str, np.ndarray] = {}  # candidate edges per pair, largest first
    if spec.edge_ablation.enabled:
        for a, b in p.pairs:
            pair = f"{a}--{b}"
            orders[pair] = ablation.edge_order(p.contents.edges[pair],
                                               p.contents.bases[a]["const_feature"],
                                               p.contents.bases[b]["const_feature"])
            searches[pair] = ablation.Search(n=len(orders[pair]),
                                             k=spec.edge_ablation.probes_per_round)
    node_layers = [n for n in p.layers if n != "output"] if spec.node_ablation.enabled else []
    node_todo = deque((layer, k) for layer in node_layers
                      for k in node_points(p.contents.bases[layer]["C"].shape[1],
                                           spec.node_ablation.points))
    node_results: dict[str, dict[int, float]] = {n: {} for n in node_layers}
    probe_todo: deque[tuple[str, int]] = deque()
    round_pending: dict[str, set[int]] = {}
    round_results: dict[str, dict[int, tuple[float, bool]]] = {}

    def next_round(pair: str) -> None:
        probes = searches[pair].probes()
        round_pending[pair] = set(probes)
        round_results[pair] = {}
        probe_todo.extend((pair, k) for k in probes)

    for pair in searches:
        next_round(pair)
    n_tasks, last = 0, 0.0
    while probe_todo or node_todo or pool.in_flight:
        while pool.has_idle() and (probe_todo or node_todo):
            if probe_todo:  # searches first: they are sequential, node points are not
                pair, k = probe_todo.popleft()
                pool.submit(("edge", pair, k), "edge_score", pair, k,
                            what=f"edge ablation {pair}, {k} edges kept")
            else:
                layer, k = node_todo.popleft()
                pool.submit(("node", layer, k), "node_score", layer, k,
                            what=f"node ablation {layer}, {k} features kept")
        (what, name, k), stat = pool.wait_one()
        n_tasks += 1
        score = score_of(stat)
        if what == "node":
            node_results[name][k] = score
        else:
            round_results[name][k] = (score, ablation.passes(score, base, kind, tol))
            round_pending[name].discard(k)
            if not round_pending[name]:
                searches[name].update(round_results[name])
                next_round(name)
        now = time.perf_counter()
        if now - last > 2.0:
            last = now
            state = ", ".join(f"{pair} in ({s.bad}, {s.good}]" for pair, s in searches.items())
            log(f"  {n_tasks} evaluations, {len(node_todo)} node points queued; {state}")
    timings["ablations"] = time.perf_counter() - t

    epsilons: dict[str, float] = {}
    for pair, s in searches.items():
        a, b = pair.split("--")
        E, order = p.contents.edges[pair], orders[pair]
        epsilons[pair] = ablation.smallest_kept(E, order, s.good)
        ks = np.array(sorted(s.evaluated))
        writer.edge_ablation(
            a, b, ks, np.array([s.evaluated[k][0] for k in ks]),
            np.array([s.evaluated[k][1] for k in ks]),
            ablation.edge_mask(E.shape, order, s.good),
            {"n_candidates": s.n, "edges_required": s.good,
             "all_kept_passes": bool(s.all_kept_passes),
             "epsilon": _finite(epsilons[pair]),
             "probes_per_round": s.k, "base_score": base,
             "target": base - tol if kind == "accuracy" else base + tol})
        log(f"  {pair}: {s.good} of {s.n} edges required ({len(ks)} evaluations)")
        if not s.all_kept_passes:
            log(f"  warning: {pair}: even with every edge kept the score is outside the "
                f"tolerance (the layers' truncation costs more than it allows); "
                f"edges_required is all {s.n}")
    for layer, res in node_results.items():
        ks = np.array(sorted(res))
        writer.node_ablation(layer, ks, np.array([res[k] for k in ks]))
    return {"epsilons": epsilons, "base": base}


def _finite(v: float) -> float | None:
    """JSON has no infinity: ε is None when no candidate edge is kept."""
    return v if np.isfinite(v) else None


def _modularity(p: Plan, epsilons: dict[str, float], writer: AnalysisWriter,
                log: Log) -> None:
    """Leiden at each resolution on the graph whose ε per pair the searches fixed."""
    chain = [LayerEdges(a, b, p.contents.edges[f"{a}--{b}"], epsilons[f"{a}--{b}"],
                        p.contents.bases[a]["const_feature"],
                        p.contents.bases[b]["const_feature"]) for a, b in p.pairs]
    graph = build_graph(chain)
    for gamma in p.spec.modularity.resolutions:
        part = leiden(graph, resolution=gamma, seed=p.spec.modularity.seed)
        writer.modularity(gamma, part.layer_modules(graph),
                          {"modularity": part.modularity, "n_modules": part.n_modules,
                           "seed": p.spec.modularity.seed, "n_graph_edges": len(graph.weights)})
        log(f"  modularity γ={gamma:g}: Q = {part.modularity:.4f}, {part.n_modules} modules")


__all__ = ["AblationCore", "AnalysisWorker", "node_points", "plan", "read_store",
           "run_analysis"]
