"""The Zarr store (zarr-python 3): the one interface notebooks and the analysis job depend on.

Layout (docs/zarr-layout.md is the reference)::

    /                       attrs: ribray_version, format_version, config, config_hash,
                                   node_layers, basis, fingerprints, n_samples, timings,
                                   status [, error when failed]
    layers/{node_layer}/    mean (raw), gram (raw, raw_T), C (raw, feature),
                            C_pinv (feature, raw), lambdas (feature)
                            [lib/gib] M (pca, pca_T), pca_eigenvalues (pca)
                            attrs: width, const_raw_index, const_feature,
                                   variance_raw_index, variance_feature, n_features,
                                   n_rows, complete [, stability, stochastic_error]
    edges/{in}--{out}/      E (out_feature, in_feature); attrs: in_layer, out_layer, complete
                                   [, edges_rel_error, sources_r]

``status`` is ``running`` while a job writes, ``failed`` after an error, and ``complete`` only
once every layer and edge group is written. Every array carries ``dimension_names`` so
``xarray.open_zarr(store, group=...)`` opens each group.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ribray import __version__
from ribray.location import Location, LocationError
from ribray.math.accumulators import ActSums, Moments, Sum
from ribray.math.basis import Basis
from ribray.math.sequential import SequentialModel

FORMAT_VERSION = 1


class StoreError(ValueError):
    """A store that cannot be written or read; the message says why."""


def edge_group(a: str, b: str) -> str:
    return f"edges/{a}--{b}"


Where = str | Path | Location  # a local path or an fsspec URL (ribray.location)


def _is_store(loc: Location) -> bool:
    return loc.child("zarr.json").is_file()


def locate(where: Where) -> Location:
    """The :class:`Location` of ``where``; an unusable URL is a :class:`StoreError`."""
    try:
        return Location.of(where)
    except LocationError as exc:
        raise StoreError(str(exc)) from None


def open_group(where: Where, mode: str) -> zarr.Group:
    """``zarr.open_group`` at a local path or an fsspec URL."""
    loc = locate(where)
    return zarr.open_group(loc.zarr_store(read_only=mode == "r"), mode=mode)


RESULT_IRRELEVANT = {"out": None, "runtime_env": None, "data": ("cache_dir",),
                     "ray": ("num_workers", "autoscaling", "keep_partials_after_s")}


def result_hash(config: dict[str, Any]) -> str:
    """sha256 of the parts of a job that determine its numbers: everything but where the store
    is (``out``), how it is shipped (``runtime_env``) and how many workers compute it. Shard and
    batch sizes stay in (they fix the order of float64 sums), and so do the CPUs and GPUs per
    worker (threads and device change the last bits). A store may be resumed by a job with the
    same result hash and the same ribray version."""
    cfg = json.loads(json.dumps(config))
    for key, sub in RESULT_IRRELEVANT.items():
        if sub is None:
            cfg.pop(key, None)
        elif isinstance(cfg.get(key), dict):
            for k in sub:
                cfg[key].pop(k, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def take_lease(store: Where) -> Lease:
    """The store's lease, its folder made first (the lock file lies beside the store)."""
    locate(store).make_parent()
    return Lease(store)


def check_path(path: Where, overwrite: bool, config: dict[str, Any] | None = None,
               own: Lease | None = None) -> str:
    """Check, without changing anything, what writing a job's store at ``path`` means:
    ``"new"`` (nothing there, or ``overwrite``), ``"resume"`` (a store of the same job that is
    not complete and that no live job is writing) or ``"complete"`` (the same job, finished).
    Raises :class:`StoreError` for a file, a non-store directory, a store of another job (unless
    ``overwrite``) and a store another live job is writing (always)."""
    path = locate(path)
    if path.is_file():
        raise StoreError(f"{path}: output path is a file, not a directory")
    holder = None if own is not None else Lease.holder(path)
    if holder is not None:
        raise StoreError(f"{path}: being written by {holder}; wait for that job or stop it")
    parent = path.blocking_parent()
    if parent is not None:
        raise StoreError(f"{path}: {parent} is a file, not a directory")
    if not path.has_entries():
        return "new"
    if not _is_store(path):
        raise StoreError(f"{path}: output directory exists and is not a Zarr store; "
                         f"refusing to write into it")
    if overwrite:
        return "new"
    try:
        attrs = dict(open_group(path, mode="r").attrs)
    except Exception:  # noqa: BLE001 - unreadable metadata
        raise StoreError(f"{path}: a store exists but cannot be read; pass --overwrite to "
                         f"replace it") from None
    if "config" not in attrs or config is None:
        raise StoreError(f"{path}: a store exists already; pass --overwrite to replace it")
    if result_hash(attrs["config"]) != result_hash(config):
        raise StoreError(f"{path}: a store written by a different job configuration exists; "
                         f"pass --overwrite to replace it")
    if attrs.get("status") != "complete" and attrs.get("ribray_version") != __version__:
        raise StoreError(f"{path}: an unfinished store of ribray {attrs.get('ribray_version')} "
                         f"cannot be resumed by {__version__}; pass --overwrite to start again")
    return "complete" if attrs.get("status") == "complete" else "resume"


class Lease:
    """Who is writing a store: ``{store}.lock`` beside it (JSON: host, pid, token, started,
    heartbeat), refreshed every ``HEARTBEAT`` seconds by a background thread.

    A lease is live while its heartbeat is younger than ``TIMEOUT`` and, on this host, while its
    process exists; a stale lease (a killed driver) is taken over. The file is created
    exclusively and replaced whole (:meth:`Location.create_exclusive`, :meth:`Location.write_text`),
    so a reader never sees half a lease; after taking it, the lease is read back, so of two jobs
    racing for a store on a file system without exclusive creation only one goes on.
    """

    HEARTBEAT = 5.0
    TIMEOUT = 60.0

    def __init__(self, store: Where):
        store = locate(store)
        self.lock = _lock(store)
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                     "token": os.urandom(8).hex()}
        self._stop = threading.Event()
        if not self.lock.create_exclusive(self._text(), self.info["token"]):
            holder = self.holder(store)  # a stale lease is taken over, a live one is not
            if holder is not None:
                raise StoreError(f"{store}: being written by {holder}; wait for that job or "
                                 f"stop it")
            self.lock.write_text(self._text(), self.info["token"])
        if not self._owned():
            raise StoreError(f"{store}: another job took the store at the same moment; "
                             f"wait for that job or stop it")
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"ribray-lease-{self.lock.name}")
        self._thread.start()

    def _text(self) -> str:
        return json.dumps({**self.info, "heartbeat": time.time()})

    def _owned(self) -> bool:
        try:
            return json.loads(self.lock.read_text()).get("token") == self.info["token"]
        except (OSError, ValueError):
            return False

    def _beat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT):
            if not self._owned():  # taken over (this process was paused past the timeout)
                return
            try:
                self.lock.write_text(self._text(), self.info["token"])
            except OSError:
                pass  # a missed beat; the next one may get through

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.HEARTBEAT + 1)
        if self._owned():
            try:
                self.lock.unlink()
            except OSError:
                pass

    @classmethod
    def holder(cls, store: Where) -> str | None:
        """A description of the live job writing ``store``, or None (no lease, or stale)."""
        try:
            info = json.loads(_lock(locate(store)).read_text())
        except (OSError, ValueError):
            return None
        age = time.time() - float(info.get("heartbeat", 0))
        if age > cls.TIMEOUT:
            return None
        if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
            return None
        return f"pid {info.get('pid')} on {info.get('host')} (heartbeat {age:.0f}s ago)"


def _lock(store: Location) -> Location:
    return store.sibling(store.name + ".lock")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class StoreWriter:
    """Writes one job's results, each piece as soon as it is computed, and resumes a store of
    the same job that a killed driver left behind.

    While it writes, it holds the store's :class:`Lease`. Per-shard partial sums of the long
    phases are kept under ``partials/`` until the job completes, so a resumed job recomputes only
    the shards, layers and phases that are not complete (:meth:`load_partials`,
    :meth:`stored_stats`, :meth:`stored_basis`, :meth:`stored_edges`).
    """

    def __init__(self, path: Where, attrs: dict[str, Any], overwrite: bool = False,
                 lease: Lease | None = None):
        self.path = locate(path)
        if lease is None:  # else the caller took it before starting Ray
            state = check_path(self.path, overwrite, attrs.get("config"))
            if state == "complete":
                raise StoreError(f"{self.path}: complete already")
            lease = take_lease(self.path)
        else:
            state = check_path(self.path, overwrite, attrs.get("config"), own=lease)
        self.lease = lease
        try:
            self.resumed = state == "resume"
            if self.resumed:
                self.root = open_group(self.path, mode="r+")
                self.root.attrs.update({**attrs, "status": "running", "timings": {},
                                        "resumes": int(self.root.attrs.get("resumes", 0)) + 1})
                if "error" in self.root.attrs:
                    del self.root.attrs["error"]
            else:
                if self.path.has_entries():  # an old ribray store, and overwrite was asked for
                    self.path.remove_tree()
                self.root = open_group(self.path, mode="w")
                self.root.attrs.update({"ribray_version": __version__,
                                        "format_version": FORMAT_VERSION, "status": "running",
                                        "timings": {}, **attrs})
            self.root.require_group("layers")
            self.root.require_group("edges")
        except BaseException:
            self.lease.release()
            raise

    def _array(self, group: zarr.Group, name: str, data: np.ndarray, dims: list[str]) -> None:
        data = np.ascontiguousarray(data, dtype=np.float64)
        arr = group.create_array(name, shape=data.shape, dtype="float64",
                                 chunks=tuple(min(s, 1024) for s in data.shape) or None,
                                 dimension_names=dims, overwrite=True)
        arr[...] = data

    def gram(self, layer: str, mean: np.ndarray, gram: np.ndarray, count: int) -> None:
        g = self.root.require_group(f"layers/{layer}")
        self._array(g, "mean", mean, ["raw"])
        self._array(g, "gram", gram, ["raw", "raw_T"])
        g.attrs.update({"width": int(mean.shape[0]), "n_rows": int(count),
                        "const_raw_index": SequentialModel.const_index(layer, mean.shape[0]),
                        "variance_raw_index": SequentialModel.variance_index(layer,
                                                                            mean.shape[0]),
                        "complete": False})

    def basis(self, layer: str, b: Basis) -> None:
        g = self.root.require_group(f"layers/{layer}")
        self._array(g, "C", b.C, ["raw", "feature"])
        self._array(g, "C_pinv", b.C_pinv, ["feature", "raw"])
        self._array(g, "lambdas", b.lambdas, ["feature"])
        if "M" in b.extra:
            self._array(g, "M", b.extra["M"], ["pca", "pca_T"])
            self._array(g, "pca_eigenvalues", b.extra["pca_eigenvalues"], ["pca"])
        extra = {k: v for k, v in (("stability", b.stability),
                                   ("stochastic_error", b.stochastic_error)) if v is not None}
        g.attrs.update({**extra, "n_features": b.n_features, "const_feature": b.const_feature,
                        "variance_feature": b.variance_feature, "complete": True})  # one write

    def edges(self, layer: str, next_layer: str, E: np.ndarray,
              attrs: dict[str, Any] | None = None) -> None:
        """The edge group; ``attrs``: extra attrs (the sources' error, ``edges_rel_error``)."""
        g = self.root.require_group(edge_group(layer, next_layer))
        self._array(g, "E", E, ["out_feature", "in_feature"])
        g.attrs.update({**(attrs or {}), "in_layer": layer, "out_layer": next_layer,
                        "complete": True})

    def features(self, layer: str, ex: Any, iv: Any, ctx: dict[str, np.ndarray] | None,
                 attrs: dict[str, Any]) -> None:
        """``features/{layer}``: feature examples (:mod:`ribray.math.examples`)."""
        g = self.root.require_group(f"features/{layer}")
        for kind in ("top", "bottom"):
            self._any(g, f"{kind}_value", getattr(ex, f"{kind}_value"), ["feature", "rank"])
            self._any(g, f"{kind}_sample", getattr(ex, f"{kind}_sample"), ["feature", "rank"])
            self._any(g, f"{kind}_position", getattr(ex, f"{kind}_position"),
                      ["feature", "rank"])
        self._any(g, "interval_edges", iv.edges, ["feature", "edge"])
        dims = ["feature", "interval", "example"]
        self._any(g, "interval_value", iv.value, dims)
        self._any(g, "interval_sample", iv.sample, dims)
        self._any(g, "interval_position", iv.position, dims)
        for name, arr in (ctx or {}).items():
            base = ["feature", "rank"] if name != "interval" else dims
            self._any(g, f"{name}_context", arr, [*base, "token"])
        g.attrs.update({"layer": layer, **attrs, "complete": True})

    def _any(self, group: zarr.Group, name: str, data: np.ndarray, dims: list[str]) -> None:
        data = np.ascontiguousarray(data)
        arr = group.create_array(name, shape=data.shape, dtype=data.dtype,
                                 chunks=tuple(max(1, min(s, 1024)) for s in data.shape) or None,
                                 dimension_names=dims, overwrite=True)
        arr[...] = data

    def stored_features(self, layer: str) -> bool:
        key = f"features/{layer}"
        return key in self.root and bool(self.root[key].attrs.get("complete"))

    def finish(self, timings: dict[str, float]) -> None:
        try:
            if "partials" in self.root:
                del self.root["partials"]
            if "progress" in self.root.attrs:
                del self.root.attrs["progress"]
            self.root.attrs.update({"timings": timings, "status": "complete"})
        finally:
            self.lease.release()

    def fail(self, reason: str) -> None:
        try:
            self.root.attrs.update({"status": "failed", "error": reason})
        finally:
            self.lease.release()

    def progress(self, info: dict[str, Any]) -> None:
        """The current phase for ``ribray status`` and notebooks (root attribute ``progress``)."""
        self.root.attrs["progress"] = info

    # --- per-shard partials and what a resumed job reuses ----------------------------------

    def save_partial(self, phase: str, shard: int, partial: Any) -> None:
        """Keep one shard's partial sum; it counts only once all its arrays are written."""
        g = self.root.require_group(f"partials/{phase}/{shard:06d}")
        arrays, counts = encode_partial(partial)
        for name, data in arrays.items():
            self._array(g, name, data, [f"d{i}" for i in range(np.ndim(data))])
        kind = "layers" if isinstance(partial, dict) else type(partial).__name__
        sections = ([name for name, m in partial.items() if isinstance(m, ActSums)]
                    if isinstance(partial, dict) else [])
        g.attrs.update({"counts": counts, "kind": kind, "sha256": _digest(arrays),
                        **({"sections": sections} if sections else {}), "complete": True})

    def load_partials(self, phase: str) -> dict[int, Any]:
        """Complete per-shard partials of ``phase`` kept by an earlier run, by shard id."""
        key = f"partials/{phase}"
        if key not in self.root:
            return {}
        out = {}
        for name, g in self.root[key].groups():
            if not g.attrs.get("complete"):
                continue
            partial = decode_partial(g)
            if _digest(encode_partial(partial)[0]) == g.attrs.get("sha256"):
                out[int(name)] = partial  # else damaged (a lost chunk reads as zeros): redo
        return out

    def stored_stats(self, layer: str) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(mean, covariance, n_rows) of a layer whose statistics are written, else None."""
        key = f"layers/{layer}"
        if key not in self.root or "n_rows" not in self.root[key].attrs:
            return None  # attributes are written after the arrays: absent means unfinished
        g = self.root[key]
        mean, cov = np.asarray(g["mean"][...]), np.array(g["gram"][...])
        const = g.attrs.get("const_raw_index")
        if const is not None:  # the centred Gram's 1 for the constant; its variance is 0
            cov[const, const] = 0.0
        return mean, cov, int(g.attrs["n_rows"])

    def stored_basis(self, layer: str) -> Basis | None:
        key = f"layers/{layer}"
        if key not in self.root or not self.root[key].attrs.get("complete"):
            return None
        g = self.root[key]
        extra = ({"M": np.asarray(g["M"][...]),
                  "pca_eigenvalues": np.asarray(g["pca_eigenvalues"][...])} if "M" in g else {})
        return Basis(C=np.asarray(g["C"][...]), C_pinv=np.asarray(g["C_pinv"][...]),
                     lambdas=np.asarray(g["lambdas"][...]),
                     const_feature=g.attrs.get("const_feature"), extra=extra,
                     variance_feature=g.attrs.get("variance_feature"),
                     stability=g.attrs.get("stability"),
                     stochastic_error=g.attrs.get("stochastic_error"))

    def stored_edges(self, layer: str, next_layer: str) -> bool:
        key = edge_group(layer, next_layer)
        return key in self.root and bool(self.root[key].attrs.get("complete"))


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over a partial's arrays (names, shapes and float64 bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name], dtype=np.float64)
        h.update(f"{name}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def encode_partial(partial: Any) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Arrays and counts of a partial (a Moments, a Sum, or a Gram pass's dict of Moments by
    layer and ActSums by section): float64 arrays round-trip exactly, so a resumed reduction is
    bit-equal to an undisturbed one."""
    if isinstance(partial, Moments):
        return {"mean": partial.mean, "comoment": partial.comoment}, {"": partial.count}
    if isinstance(partial, Sum):
        per = {} if partial.per_source is None else {"per_source": partial.per_source}
        return {"total": partial.total, **per}, {"": partial.count}
    if isinstance(partial, dict):
        arrays = {}
        for name, m in partial.items():
            if isinstance(m, ActSums):
                if m.g_sum is not None and m.gram is not None:
                    arrays[f"{name}/g_sum"], arrays[f"{name}/g_gram"] = m.g_sum, m.gram
            else:
                arrays[f"{name}/mean"], arrays[f"{name}/comoment"] = m.mean, m.comoment
        return arrays, {name: m.count for name, m in partial.items()}
    raise TypeError(f"cannot keep a partial of type {type(partial).__name__}")


def decode_partial(g: zarr.Group) -> Any:
    counts, kind = dict(g.attrs["counts"]), g.attrs["kind"]
    if kind == "Sum":
        per = np.asarray(g["per_source"][...]) if "per_source" in g else None
        return Sum(int(counts[""]), np.asarray(g["total"][...]), per)
    if kind == "Moments":
        return Moments(int(counts[""]), np.asarray(g["mean"][...]),
                       np.asarray(g["comoment"][...]))
    sections = set(g.attrs.get("sections", []))
    out: dict[str, Moments | ActSums] = {}
    for name in counts:
        if name in sections:
            has = f"{name}/g_sum" in g
            out[name] = ActSums(int(counts[name]),
                                np.asarray(g[f"{name}/g_sum"][...]) if has else None,
                                np.asarray(g[f"{name}/g_gram"][...]) if has else None)
        else:
            out[name] = Moments(int(counts[name]), np.asarray(g[f"{name}/mean"][...]),
                                np.asarray(g[f"{name}/comoment"][...]))
    return out


def open_store(path: Where, mode: str = "r") -> zarr.Group:
    """A ribray store at a local path or an fsspec URL, opened with ``mode`` (``r`` or ``r+``);
    anything else is a :class:`StoreError`."""
    path = locate(path)
    if not _is_store(path):
        raise StoreError(f"{path}: not a Zarr store (no zarr.json)")
    try:
        root = open_group(path, mode=mode)
    except Exception as exc:  # noqa: BLE001 - corrupt metadata, or an array at the root
        raise StoreError(f"{path}: not a readable Zarr group ({type(exc).__name__})") from None
    if "ribray_version" not in root.attrs:
        raise StoreError(f"{path}: a Zarr store, but not one written by ribray")
    return root


def summary(root: zarr.Group) -> dict[str, Any]:
    """Machine-readable summary: per node layer, dims kept and top Λ; per edge group, ΣE."""
    attrs = dict(root.attrs)
    layers = []
    for name in attrs.get("node_layers", []):
        key = f"layers/{name}"
        if key not in root:
            layers.append({"layer": name, "complete": False})
            continue
        g = root[key]
        lam = np.asarray(g["lambdas"][...]) if "lambdas" in g else np.array([])
        const, var = g.attrs.get("const_feature"), g.attrs.get("variance_feature")
        fixed = [i for i in (const, var) if i is not None and i < lam.size]
        rest = np.sort(np.delete(lam, fixed))[::-1]
        layers.append({"layer": name, "width": g.attrs.get("width"),
                       "features": g.attrs.get("n_features"),
                       "const_lambda": float(lam[const]) if const in fixed else None,
                       "variance_lambda": float(lam[var]) if var in fixed else None,
                       "top_lambdas": [float(v) for v in rest[:4]],
                       "stability": g.attrs.get("stability"),
                       "stochastic_error": g.attrs.get("stochastic_error"),
                       "complete": bool(g.attrs.get("complete", False))})
    edges = []
    names = attrs.get("node_layers", [])
    for a, b in zip(names[:-1], names[1:]):
        key = edge_group(a, b)
        if key in root:
            E = np.asarray(root[key]["E"][...])
            ga = root[key].attrs
            edges.append({"edge": f"{a}--{b}", "shape": list(E.shape), "sum": float(E.sum()),
                          "max": float(E.max()) if E.size else 0.0,
                          "edges_rel_error": ga.get("edges_rel_error"),
                          "sources_r": ga.get("sources_r")})
    feats = sorted(name for name, g in root["features"].groups()
                   if g.attrs.get("complete")) if "features" in root else []
    return {"status": attrs.get("status"), "basis": attrs.get("basis"), "features": feats,
            "name": attrs.get("config", {}).get("name"), "timings": attrs.get("timings", {}),
            "layers": layers, "edges": edges, "analysis": analysis_summary(root)}


# --- the analysis group (``ribray analyze``) ----------------------------------------------

ANALYSIS = "analysis"


def resolution_group(gamma: float) -> str:
    return f"{ANALYSIS}/modularity/resolution-{gamma:g}"


class AnalysisWriter:
    """Writes ``analysis/`` into a complete LIB store, leaving everything else untouched.

    ``analysis.attrs.status`` is ``running`` while it writes, then ``complete`` or ``failed``.
    An existing analysis is replaced only when ``overwrite`` is given (it is derived data, but
    a researcher may have annotated it).
    """

    def __init__(self, path: Where, attrs: dict[str, Any], overwrite: bool = False):
        self.path = locate(path)
        check_analysis_target(self.path, overwrite)
        self.lease = Lease(self.path)  # one writer at a time, analysis or job
        try:
            self.root = open_group(self.path, mode="r+")
            if ANALYSIS in self.root:
                del self.root[ANALYSIS]
            self.group = self.root.create_group(ANALYSIS)
            self.group.attrs.update({"ribray_version": __version__, "status": "running",
                                     "timings": {}, **attrs})
        except BaseException:
            self.lease.release()
            raise

    def _array(self, group: zarr.Group, name: str, data: np.ndarray, dims: list[str]) -> None:
        data = np.ascontiguousarray(data)
        arr = group.create_array(name, shape=data.shape, dtype=data.dtype,
                                 chunks=tuple(min(s, 1024) for s in data.shape) or None,
                                 dimension_names=dims, overwrite=True)
        arr[...] = data

    def base(self, score: float, n_samples: int) -> None:
        self.group.attrs.update({"base_score": float(score), "n_samples": int(n_samples)})

    def edge_ablation(self, in_layer: str, out_layer: str, n_kept: np.ndarray,
                      score: np.ndarray, passed: np.ndarray, keep: np.ndarray,
                      attrs: dict[str, Any]) -> None:
        g = self.group.require_group(f"edge_ablation/{in_layer}--{out_layer}")
        self._array(g, "n_kept", n_kept.astype(np.int64), ["probe"])
        self._array(g, "score", score.astype(np.float64), ["probe"])
        self._array(g, "passed", passed.astype(bool), ["probe"])
        self._array(g, "keep", keep.astype(bool), ["out_feature", "in_feature"])
        g.attrs.update({"in_layer": in_layer, "out_layer": out_layer, **attrs})

    def node_ablation(self, layer: str, n_kept: np.ndarray, score: np.ndarray) -> None:
        g = self.group.require_group(f"node_ablation/{layer}")
        self._array(g, "n_kept", n_kept.astype(np.int64), ["point"])
        self._array(g, "score", score.astype(np.float64), ["point"])
        g.attrs.update({"layer": layer})

    def modularity(self, gamma: float, modules: dict[str, np.ndarray],
                   attrs: dict[str, Any]) -> None:
        g = self.root.require_group(resolution_group(gamma))
        for layer, module in modules.items():
            self._array(g.require_group(layer), "module", module.astype(np.int64), ["feature"])
        g.attrs.update({"resolution": float(gamma), **attrs})

    def labels(self, layer: str, group_power: np.ndarray, labels: list[list[str]],
               explained: np.ndarray, p: int) -> None:
        g = self.group.require_group(f"labels/{layer}")
        self._array(g, "group_power", group_power.astype(np.float64),
                    ["position", "feature", "k_x", "k_y"])
        self._array(g, "explained", explained.astype(np.float64), ["position", "feature"])
        g.attrs.update({"layer": layer, "modulus": int(p), "labels": labels})

    def finish(self, attrs: dict[str, Any]) -> None:
        self.group.attrs.update({**attrs, "status": "complete"})
        self.lease.release()

    def fail(self, reason: str) -> None:
        self.group.attrs.update({"status": "failed", "error": reason})
        self.lease.release()


def check_analysis_target(path: Where, overwrite: bool) -> zarr.Group:
    """The store at ``path`` must be a complete ribray store; an analysis already in it is
    refused unless ``overwrite``. Changes nothing; raises :class:`StoreError`."""
    root = open_store(path)
    holder = Lease.holder(path)
    if holder is not None:
        raise StoreError(f"{path}: being written by {holder}; wait for that job or stop it")
    status = root.attrs.get("status")
    if status != "complete":
        raise StoreError(f"{path}: the store's status is {status!r}; only a complete store can "
                         f"be analysed")
    if ANALYSIS in root and not overwrite:
        raise StoreError(f"{path}: the store has an analysis already; pass --overwrite to "
                         f"replace it")
    return root


def analysis_summary(root: zarr.Group) -> dict[str, Any] | None:
    """Machine-readable summary of ``analysis/`` (None when the store has none)."""
    if ANALYSIS not in root:
        return None
    g = root[ANALYSIS]
    attrs = dict(g.attrs)
    out: dict[str, Any] = {k: attrs.get(k) for k in (
        "status", "score_kind", "tolerance", "base_score", "n_samples", "node_layers", "data",
        "timings", "error") if k in attrs}
    edges = []
    if "edge_ablation" in g:
        for name, sub in sorted(g["edge_ablation"].groups()):
            a = dict(sub.attrs)
            edges.append({"edge": name, "edges_required": a.get("edges_required"),
                          "n_candidates": a.get("n_candidates"), "epsilon": a.get("epsilon"),
                          "evaluations": int(sub["n_kept"].shape[0])})
    out["edge_ablation"] = edges
    nodes = []
    if "node_ablation" in g:
        for name, sub in sorted(g["node_ablation"].groups()):
            n_kept, score = np.asarray(sub["n_kept"][...]), np.asarray(sub["score"][...])
            nodes.append({"layer": name, "points": int(n_kept.size),
                          "n_features": int(n_kept.max()) if n_kept.size else 0,
                          "score_all_kept": float(score[np.argmax(n_kept)]) if n_kept.size
                          else None})
    out["node_ablation"] = nodes
    mods = []
    if "modularity" in g:
        for _, sub in sorted(g["modularity"].groups()):
            a = dict(sub.attrs)
            mods.append({"resolution": a.get("resolution"), "modularity": a.get("modularity"),
                         "n_modules": a.get("n_modules"), "seed": a.get("seed")})
    out["modularity"] = sorted(mods, key=lambda m: -(m["resolution"] or 0))
    out["labels"] = sorted(name for name, _ in g["labels"].groups()) if "labels" in g else []
    return out
