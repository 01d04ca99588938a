"""The Zarr store (zarr-python 3): the one interface notebooks and the analysis job depend on.

Layout (docs/zarr-layout.md is the reference)::

    /                       attrs: ribray_version, format_version, config, config_hash,
                                   node_layers, basis, fingerprints, n_samples, timings,
                                   status [, error when failed]
    layers/{node_layer}/    mean (raw), gram (raw, raw_T), C (raw, feature),
                            C_pinv (feature, raw), lambdas (feature)
                            [lib/gib] M (pca, pca_T), pca_eigenvalues (pca)
                            attrs: width, const_raw_index, const_feature, n_features,
                                   n_rows, complete
    edges/{in}--{out}/      E (out_feature, in_feature); attrs: in_layer, out_layer, complete

``status`` is ``running`` while a job writes, ``failed`` after an error, and ``complete`` only
once every layer and edge group is written. Every array carries ``dimension_names`` so
``xarray.open_zarr(store, group=...)`` opens each group.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ribray import __version__
from ribray.math.basis import Basis
from ribray.math.sequential import SequentialModel

FORMAT_VERSION = 1


class StoreError(ValueError):
    """A store that cannot be written or read; the message says why."""


def edge_group(a: str, b: str) -> str:
    return f"edges/{a}--{b}"


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def check_path(path: Path, overwrite: bool) -> None:
    """Check, without changing anything, that ``path`` can hold a new store."""
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: output path is a file, not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not _is_store(path):
            raise StoreError(f"{path}: output directory exists and is not a Zarr store; "
                             f"refusing to write into it")
        if not overwrite:
            raise StoreError(f"{path}: a store exists already; pass --overwrite to replace it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise StoreError(f"{path}: {parent} is a file, not a directory")
            break


class StoreWriter:
    """Writes one job's results; each piece as soon as it is computed."""

    def __init__(self, path: Path, attrs: dict[str, Any], overwrite: bool = False):
        self.path = Path(path)
        check_path(self.path, overwrite)
        if self.path.is_dir():  # an old ribray store, and overwrite was asked for
            shutil.rmtree(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.root = zarr.open_group(str(self.path), mode="w")
        self.root.attrs.update({"ribray_version": __version__, "format_version": FORMAT_VERSION,
                                "status": "running", "timings": {}, **attrs})
        self.root.require_group("layers")
        self.root.require_group("edges")

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
                        "complete": False})

    def basis(self, layer: str, b: Basis) -> None:
        g = self.root.require_group(f"layers/{layer}")
        self._array(g, "C", b.C, ["raw", "feature"])
        self._array(g, "C_pinv", b.C_pinv, ["feature", "raw"])
        self._array(g, "lambdas", b.lambdas, ["feature"])
        if "M" in b.extra:
            self._array(g, "M", b.extra["M"], ["pca", "pca_T"])
            self._array(g, "pca_eigenvalues", b.extra["pca_eigenvalues"], ["pca"])
        g.attrs.update({"n_features": b.n_features, "const_feature": b.const_feature,
                        "complete": True})

    def edges(self, layer: str, next_layer: str, E: np.ndarray) -> None:
        g = self.root.require_group(edge_group(layer, next_layer))
        self._array(g, "E", E, ["out_feature", "in_feature"])
        g.attrs.update({"in_layer": layer, "out_layer": next_layer, "complete": True})

    def finish(self, timings: dict[str, float]) -> None:
        self.root.attrs.update({"timings": timings, "status": "complete"})

    def fail(self, reason: str) -> None:
        self.root.attrs.update({"status": "failed", "error": reason})


def open_store(path: str | Path) -> zarr.Group:
    path = Path(path)
    if not _is_store(path):
        raise StoreError(f"{path}: not a Zarr store (no zarr.json)")
    try:
        root = zarr.open_group(str(path), mode="r")
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
        const = g.attrs.get("const_feature")
        rest = np.sort(np.delete(lam, const) if const is not None else lam)[::-1]
        layers.append({"layer": name, "width": g.attrs.get("width"),
                       "features": g.attrs.get("n_features"),
                       "const_lambda": float(lam[const]) if const is not None else None,
                       "top_lambdas": [float(v) for v in rest[:4]],
                       "complete": bool(g.attrs.get("complete", False))})
    edges = []
    names = attrs.get("node_layers", [])
    for a, b in zip(names[:-1], names[1:]):
        key = edge_group(a, b)
        if key in root:
            E = np.asarray(root[key]["E"][...])
            edges.append({"edge": f"{a}--{b}", "shape": list(E.shape), "sum": float(E.sum()),
                          "max": float(E.max()) if E.size else 0.0})
    return {"status": attrs.get("status"), "basis": attrs.get("basis"),
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

    def __init__(self, path: Path, attrs: dict[str, Any], overwrite: bool = False):
        self.path = Path(path)
        check_analysis_target(self.path, overwrite)
        self.root = zarr.open_group(str(self.path), mode="r+")
        if ANALYSIS in self.root:
            del self.root[ANALYSIS]
        self.group = self.root.create_group(ANALYSIS)
        self.group.attrs.update({"ribray_version": __version__, "status": "running",
                                 "timings": {}, **attrs})

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

    def fail(self, reason: str) -> None:
        self.group.attrs.update({"status": "failed", "error": reason})


def check_analysis_target(path: Path, overwrite: bool) -> zarr.Group:
    """The store at ``path`` must be a complete ribray store; an analysis already in it is
    refused unless ``overwrite``. Changes nothing; raises :class:`StoreError`."""
    root = open_store(path)
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
