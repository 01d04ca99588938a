"""Figures of an analysed store (matplotlib, Agg): the interaction graph and the ablation curves.

Every function reads a store opened with :func:`ribray.store.open_store` (or several), draws one
figure, saves it as ``{out_base}.{fmt}`` for each requested format (PNG at 150 dpi) and returns
the paths written. Nothing here changes a store.

* :func:`interaction_graph`: the layered graph of the paper's figures 3, 7 and 13.
* :func:`ablation_curves`: edge-ablation probes of the bisect search, and node ablation (fig. 5).
* :func:`lambda_spectra`: Λ of every node layer.
* :func:`edges_required_bars`, :func:`node_ablation_overlay`: several stores compared
  (figures 6, 8 and 14: LIB against PCA).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import zarr
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

DPI = 150
GREY = "#b4b4b4"
MAX_UNCONNECTED_SHOWN = 5  # per layer, of the nodes without a kept edge
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
         "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
         "axes.spines.right": False, "svg.hashsalt": "ribray", "savefig.facecolor": "white"}
SCORE_LABEL = {"accuracy": "accuracy", "ce_loss": "cross-entropy loss (nats)"}


def _subplots(nrows: int = 1, ncols: int = 1, **kw: Any):
    """``pyplot.subplots`` without pyplot: a standalone Figure (nothing global is touched, so
    importing this module leaves a notebook's backend alone; savefig renders with Agg)."""
    fig_kw = {k: kw.pop(k) for k in ("figsize", "layout", "constrained_layout") if k in kw}
    fig = Figure(**fig_kw)
    return fig, fig.subplots(nrows, ncols, **kw)


def save(fig: Figure, out_base: Path, formats: Iterable[str]) -> list[Path]:
    """Save ``fig`` as ``{out_base}.{fmt}`` for each format, close it, return the paths."""
    out_base = Path(out_base)
    out_base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out_base.parent / f"{out_base.name}.{fmt}"
        meta = {"Date": None} if fmt == "svg" else None
        fig.savefig(path, format=fmt, dpi=DPI, bbox_inches="tight", metadata=meta)
        paths.append(path)
    return paths


# --- reading the store -------------------------------------------------------------------


def analysis_layers(root: zarr.Group) -> list[str]:
    """The analysed node layers (the store's node layers when there is no analysis)."""
    if "analysis" in root and root["analysis"].attrs.get("node_layers"):
        return list(root["analysis"].attrs["node_layers"])
    return list(root.attrs["node_layers"])


def const_feature(root: zarr.Group, layer: str) -> int | None:
    c = root[f"layers/{layer}"].attrs.get("const_feature")
    return None if c is None else int(c)


def n_features(root: zarr.Group, layer: str) -> int:
    return int(root[f"layers/{layer}"].attrs["n_features"])


def store_label(root: zarr.Group) -> str:
    """``name (basis)`` of a store, for legends."""
    return f"{root.attrs.get('config', {}).get('name', '?')} ({root.attrs.get('basis', '?')})"


def edge_ablation(root: zarr.Group) -> dict[str, dict[str, Any]]:
    """Per layer pair ``in--out`` (model order): probes, keep mask and attrs of the search."""
    if "analysis/edge_ablation" not in root:
        return {}
    groups = dict(root["analysis/edge_ablation"].groups())
    layers = analysis_layers(root)
    order = [f"{a}--{b}" for a, b in zip(layers[:-1], layers[1:])]
    names = [n for n in order if n in groups] + sorted(n for n in groups if n not in order)
    out = {}
    for name in names:
        g = groups[name]
        out[name] = {"n_kept": np.asarray(g["n_kept"][...]), "score": np.asarray(g["score"][...]),
                     "passed": np.asarray(g["passed"][...]), "attrs": dict(g.attrs)}
    return out


def node_ablation(root: zarr.Group) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer (model order): (n_kept, score) of node ablation."""
    if "analysis/node_ablation" not in root:
        return {}
    groups = dict(root["analysis/node_ablation"].groups())
    order = [n for n in root.attrs["node_layers"] if n in groups]
    order += sorted(n for n in groups if n not in order)
    return {n: (np.asarray(groups[n]["n_kept"][...]), np.asarray(groups[n]["score"][...]))
            for n in order}


def resolutions(root: zarr.Group) -> list[float]:
    """Resolutions γ of ``analysis/modularity``, largest first."""
    if "analysis/modularity" not in root:
        return []
    return sorted((float(g.attrs["resolution"]) for _, g in root["analysis/modularity"].groups()),
                  reverse=True)


def modules(root: zarr.Group, resolution: float) -> dict[str, np.ndarray]:
    """Module id per feature of each layer at ``resolution`` (ValueError if not computed)."""
    for _, g in root["analysis/modularity"].groups() if "analysis/modularity" in root else []:
        if np.isclose(float(g.attrs["resolution"]), resolution):
            return {name: np.asarray(sub["module"][...]) for name, sub in g.groups()}
    raise ValueError(f"no modules at resolution {resolution:g} (have: "
                     f"{', '.join(f'{r:g}' for r in resolutions(root)) or 'none'})")


def _score_kind(root: zarr.Group) -> str:
    return str(root["analysis"].attrs.get("score_kind", "accuracy")) if "analysis" in root \
        else "accuracy"


# --- the interaction graph ---------------------------------------------------------------


@dataclass
class _Pair:
    """Kept edges of one layer pair, constant features removed (zeros elsewhere)."""

    a: str
    b: str
    W: np.ndarray  # (out, in): E where kept and not constant, else 0
    required: int | None


def _pairs(root: zarr.Group, layers: list[str]) -> list[_Pair]:
    searches = edge_ablation(root)
    out = []
    for a, b in zip(layers[:-1], layers[1:]):
        key = f"edges/{a}--{b}"
        if key not in root:
            out.append(_Pair(a, b, np.zeros((n_features(root, b), n_features(root, a))), None))
            continue
        E = np.asarray(root[key]["E"][...], dtype=np.float64)
        search = searches.get(f"{a}--{b}")
        keep = (np.asarray(root[f"analysis/edge_ablation/{a}--{b}/keep"][...], dtype=bool)
                if search else np.ones(E.shape, dtype=bool))
        keep &= E > 0
        ca, cb = const_feature(root, a), const_feature(root, b)
        if ca is not None:
            keep[:, ca] = False
        if cb is not None:
            keep[cb, :] = False
        required = search["attrs"].get("edges_required") if search else None
        out.append(_Pair(a, b, np.where(keep, E, 0.0), required))
    return out


def _palette(n_modules: int) -> list:
    """Qualitative colours without greys (grey means "no kept edge")."""
    if n_modules <= 9:
        cmap = matplotlib.colormaps.get_cmap("tab10")
        return [cmap(i) for i in range(10) if i != 7]
    cmap = matplotlib.colormaps.get_cmap("tab20")
    return [cmap(i) for i in range(20) if i not in (14, 15)]


def interaction_graph(root: zarr.Group, out_base: Path, formats: Sequence[str] = ("png",),
                      edge_width: str = "sqrt", merge_output: bool = False,
                      max_nodes_per_layer: int = 60, resolution: float | None = None
                      ) -> list[Path]:
    """The layered interaction graph (paper figures 3, 7, 13) of the analysed node layers.

    Nodes of a layer are its non-constant features, sorted top-down by importance (the sum of
    their kept edges, in and out; ties by index), the ``max_nodes_per_layer`` most important
    shown; edges are the kept edges between shown nodes, width ∝ √E (``sqrt``) or E²
    (``squared``), normalised per layer pair. Nodes are coloured by Leiden module at
    ``resolution`` (default: the largest γ computed); grey nodes have no kept edge.
    """
    if edge_width not in ("sqrt", "squared"):
        raise ValueError(f"edge_width must be 'sqrt' or 'squared', got {edge_width!r}")
    layers = analysis_layers(root)
    pairs = _pairs(root, layers)
    res = resolution if resolution is not None else (resolutions(root) or [None])[0]
    mods = modules(root, res) if res is not None else {}

    # importance and the shown nodes of each layer
    shown: list[np.ndarray] = []
    importance: list[np.ndarray] = []
    hidden: list[int] = []  # nodes without a kept edge left out, per layer
    for k, layer in enumerate(layers):
        imp = np.zeros(n_features(root, layer))
        if k > 0:
            imp += pairs[k - 1].W.sum(axis=1)
        if k < len(pairs):
            imp += pairs[k].W.sum(axis=0)
        idx = np.arange(imp.size)
        c = const_feature(root, layer)
        if c is not None:
            idx = idx[idx != c]
        idx = idx[np.argsort(-imp[idx], kind="stable")]
        n_live = int((imp[idx] > 0).sum())
        n_dead = len(idx) - n_live
        extra = n_dead if n_dead <= MAX_UNCONNECTED_SHOWN + 3 else MAX_UNCONNECTED_SHOWN
        keep = idx[:min(max_nodes_per_layer, n_live + extra)]
        hidden.append(n_dead - int((imp[keep] <= 0).sum()))
        shown.append(keep)
        importance.append(imp)
    merged = merge_output and len(layers) > 1
    if merged:
        shown[-1] = np.array([-1])

    n_max = max(len(s) for s in shown)
    n_mod = max((int(m.max()) + 1 for m in mods.values() if m.size), default=0)
    palette = _palette(n_mod)

    def node_colour(layer: str, feature: int, imp: float):
        if imp <= 0:
            return GREY
        if not mods:
            return palette[0]
        m = int(mods[layer][feature]) if layer in mods else -1
        return GREY if m < 0 else palette[m % len(palette)]

    width = max(6.0, 2.3 * len(layers) + 1.2)
    height = float(np.clip(2.6 + 0.16 * n_max, 4.0, 13.0))
    with matplotlib.rc_context(STYLE):
        fig, ax = _subplots(figsize=(width, height))
        ax.set_axis_off()
        ys = [{int(f): -r for r, f in enumerate(s)} for s in shown]
        if merged:
            ys[-1] = {-1: -(n_max - 1) / 2}
        # edges, widest on top
        segs, widths, colours = [], [], []
        for k, pair in enumerate(pairs):
            fin, fout = shown[k], shown[k + 1]
            if merged and k == len(pairs) - 1:
                W = pair.W.sum(axis=0, keepdims=True)[:, fin]
                fout_idx = np.array([-1])
            else:
                W = pair.W[np.ix_(fout, fin)]
                fout_idx = fout
            scale = np.sqrt(W) if edge_width == "sqrt" else W ** 2
            top = scale.max() if scale.size else 0.0
            if top <= 0:
                continue
            for i, j in zip(*np.nonzero(W > 0)):
                src, dst = int(fin[j]), int(fout_idx[i])
                segs.append([(k, ys[k][src]), (k + 1, ys[k + 1][dst])])
                widths.append(0.15 + 2.85 * scale[i, j] / top)
                ms = mods.get(pair.a)
                md = mods.get(pair.b)
                same = (ms is not None and ms[src] >= 0 and
                        (dst < 0 or (md is not None and md[dst] == ms[src])))
                colours.append(palette[int(ms[src]) % len(palette)] if same else "#8c8c8c")
        if segs:
            order = np.argsort(widths, kind="stable")
            ax.add_collection(LineCollection([segs[i] for i in order],
                                             linewidths=[widths[i] for i in order],
                                             colors=[colours[i] for i in order], alpha=0.6,
                                             zorder=1, capstyle="round"))
        # nodes
        spacing_pt = height * 72 * 0.75 / max(n_max + 1, 2)
        size = float(np.clip(0.55 * spacing_pt, 3.0, 11.0)) ** 2
        radius = np.sqrt(size) / 2
        label_nodes = spacing_pt >= 9 and n_max <= 40
        for k, layer in enumerate(layers):
            if merged and k == len(layers) - 1:
                ax.scatter([k], [ys[k][-1]], s=size * 2.5, c="#333333", zorder=3,
                           edgecolors="white", linewidths=0.6)
                ax.annotate("all features", (k, ys[k][-1]), xytext=(8, 0),
                            textcoords="offset points", va="center", fontsize=7)
                continue
            f = shown[k]
            cols = [node_colour(layer, int(i), importance[k][i]) for i in f]
            ax.scatter(np.full(len(f), k), [ys[k][int(i)] for i in f], s=size, c=cols,
                       zorder=3, edgecolors="white", linewidths=0.5)
            if label_nodes:
                for i in f:
                    ax.annotate(str(int(i)), (k, ys[k][int(i)]), xytext=(-radius - 2, 0),
                                textcoords="offset points", ha="right", va="center",
                                fontsize=5.5, color="#444444", zorder=4)
        # column titles and pair annotations
        for k, layer in enumerate(layers):
            total = n_features(root, layer) - (const_feature(root, layer) is not None)
            sub = ("summed" if merged and k == len(layers) - 1 else
                   f"{len(shown[k])} of {total} features" if len(shown[k]) < total else
                   f"{total} features")
            ax.annotate(layer, (k, 0), xytext=(0, 20), textcoords="offset points",
                        ha="center", va="bottom", fontsize=9, fontweight="bold")
            ax.annotate(sub, (k, 0), xytext=(0, 9), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7, color="#555555")
            n_more = total - len(shown[k])
            if n_more and not (merged and k == len(layers) - 1):
                note = (f"+ {n_more} without kept edges" if n_more == hidden[k] else
                        f"+ {n_more} more ({n_more - hidden[k]} with kept edges)")
                ax.annotate(note, (k, -(len(shown[k]) - 1)), xytext=(0, -9),
                            textcoords="offset points", ha="center", va="top", fontsize=6.5,
                            color="#666666", zorder=4,
                            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none",
                                  "alpha": 0.85})
        for k, pair in enumerate(pairs):
            if pair.required is not None:
                ax.annotate(f"{pair.required:,} edges kept", (k + 0.5, -(n_max - 1)),
                            xytext=(0, -26), textcoords="offset points", ha="center",
                            va="top", fontsize=7, color="#555555")
        ax.set_xlim(-0.45, len(layers) - 0.55)
        ax.set_ylim(-(n_max - 1) - 40 / spacing_pt, 36 / spacing_pt)

        name = root.attrs.get("config", {}).get("name", "?")
        basis = str(root.attrs.get("basis", "?")).upper()
        req = [f"{p.a}→{p.b}: {p.required:,}" for p in pairs if p.required is not None]
        title = f"{name} — {basis} basis"
        sub = ("edges required: " + ", ".join(req) if req else
               "all edges (no edge ablation in the store)")
        how = "√E" if edge_width == "sqrt" else "E²"
        sub += f"; line width ∝ {how}, constant features left out"
        wrap = max(40, int(width * 14))
        fig.suptitle(title + "\n" + textwrap.fill(sub, wrap), fontsize=10, y=0.995)
        # legend: the largest modules, then grey
        handles = []
        if mods:
            counts = np.bincount(np.concatenate([m[m >= 0] for m in mods.values()]),
                                 minlength=n_mod) if n_mod else np.zeros(0, int)
            top_n = min(n_mod, 8)
            for m in range(top_n):
                handles.append(Line2D([], [], marker="o", ls="", color=palette[m % len(palette)],
                                      label=f"module {m} ({counts[m]} nodes)"))
            if n_mod > top_n:
                handles.append(Line2D([], [], ls="", label=f"+ {n_mod - top_n} smaller modules"))
        else:
            handles.append(Line2D([], [], marker="o", ls="", color=palette[0], label="feature"))
        handles.append(Line2D([], [], marker="o", ls="", color=GREY,
                              label="no kept edge / no module"))
        gamma = f"Leiden modules, γ = {res:g}" if res is not None else "no modules computed"
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5),
                   frameon=False, title=gamma, title_fontsize=8, bbox_to_anchor=(0.5, -0.01))
        fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.7 / height,
                            bottom=(0.3 + 0.2 * ((len(handles) + 4) // 5)) / height)
        return save(fig, out_base, formats)


# --- ablation curves ---------------------------------------------------------------------


def _log_x(ax: Axes, values: np.ndarray) -> None:
    if values.size and values.min() <= 0:
        ax.set_xscale("symlog", linthresh=1, linscale=0.4)
    else:
        ax.set_xscale("log")


def _zoom(ax: Axes, edges: dict[str, dict[str, Any]], kind: str, base: float | None,
          tol: float | None, targets: set[float]) -> None:
    """Limit the score axis to ~30 tolerances around the unablated score when some probes lie
    far outside; those are drawn at the axis edge as triangles."""
    if base is None or not tol:
        return
    lo, hi = ((base - 30 * tol, base + 3 * tol) if kind == "accuracy" else
              (base - 3 * tol, base + 30 * tol))
    scores = np.concatenate([s["score"] for s in edges.values()])
    if scores.size == 0 or (scores.min() >= lo and scores.max() <= hi):
        return
    refs = [float(base), *targets]
    lo = min(max(lo, scores.min()), *refs)
    hi = max(min(hi, scores.max()), *refs)
    pad = 0.06 * (hi - lo) or tol
    lo, hi = lo - pad, hi + pad
    cmap = matplotlib.colormaps.get_cmap("tab10")
    for c, s in enumerate(edges.values()):
        for sel, y, m in ((s["score"] < lo, lo, "v"), (s["score"] > hi, hi, "^")):
            if sel.any():
                ax.scatter(s["n_kept"][sel], np.full(sel.sum(), y), marker=m, s=26,
                           color=cmap(c % 10), zorder=4, clip_on=False)
    ax.set_ylim(lo, hi)
    ax.text(0.01, 0.01, "▼ ▲ probes beyond the axis", transform=ax.transAxes, fontsize=6.5,
            color="#666666", va="bottom")


def ablation_curves(root: zarr.Group, out_base: Path, formats: Sequence[str] = ("png",)
                    ) -> list[Path]:
    """(a) edge ablation: score of each probe of the search against kept edges, the target
    and the edges required; (b) node ablation: score against kept features (paper fig. 5).
    A panel without data is left out; with neither, the figure says so."""
    edges, nodes = edge_ablation(root), node_ablation(root)
    kind = _score_kind(root)
    ylabel = SCORE_LABEL.get(kind, kind)
    panels = [p for p, ok in (("edges", edges), ("nodes", nodes)) if ok]
    cmap = matplotlib.colormaps.get_cmap("tab10")
    with matplotlib.rc_context(STYLE):
        fig, axes = _subplots(1, max(1, len(panels)), figsize=(5.2 * max(1, len(panels)), 3.9),
                                 squeeze=False)
        if not panels:
            axes[0, 0].set_axis_off()
            axes[0, 0].text(0.5, 0.5, "no ablation data in the store", ha="center")
        for ax, panel in zip(axes[0], panels):
            if panel == "edges":
                targets = set()
                for c, (name, s) in enumerate(edges.items()):
                    colour = cmap(c % 10)
                    o = np.argsort(s["n_kept"])
                    n, sc, ok = s["n_kept"][o], s["score"][o], s["passed"][o]
                    label = name.replace("--", " → ")
                    ax.plot(n, sc, "-", color=colour, lw=0.8, alpha=0.5)
                    ax.scatter(n[ok], sc[ok], color=colour, s=22, zorder=3, label=label)
                    ax.scatter(n[~ok], sc[~ok], color=colour, marker="x", s=22, zorder=3)
                    req = s["attrs"].get("edges_required")
                    if req is not None:
                        ax.axvline(req, color=colour, ls=":", lw=1)
                    if s["attrs"].get("target") is not None:
                        targets.add(float(s["attrs"]["target"]))
                for t in sorted(targets):
                    ax.axhline(t, color="black", ls="--", lw=0.8)
                attrs = root["analysis"].attrs
                _zoom(ax, edges, kind, attrs.get("base_score"), attrs.get("tolerance"), targets)
                allx = np.concatenate([s["n_kept"] for s in edges.values()])
                _log_x(ax, allx)
                ax.set_xlabel("edges kept (largest E first)")
                ax.set_ylabel(ylabel)
                ax.set_title("(a) edge ablation: bisect-search probes", loc="left")
                extra = [Line2D([], [], color="grey", marker="o", ls="", label="passed"),
                         Line2D([], [], color="grey", marker="x", ls="", label="failed"),
                         Line2D([], [], color="black", ls="--", lw=0.8, label="target"),
                         Line2D([], [], color="grey", ls=":", label="edges required")]
                ax.legend(handles=ax.get_legend_handles_labels()[0] + extra, fontsize=7,
                          frameon=False, loc="best")
            else:
                for c, (layer, (n, sc)) in enumerate(nodes.items()):
                    o = np.argsort(n)
                    ax.plot(n[o], sc[o], "-", color=cmap(c % 10), lw=1.2, label=layer,
                            marker="o" if n.size <= 30 else None, ms=3)
                base = root["analysis"].attrs.get("base_score")
                if base is not None:
                    ax.axhline(float(base), color="black", ls=":", lw=0.8, label="unablated")
                ax.set_xscale("log")
                ax.set_xlabel("features kept (largest Λ first)")
                ax.set_ylabel(ylabel)
                ax.set_title("(b) node ablation", loc="left")
                ax.legend(fontsize=7, frameon=False, loc="best")
            ax.grid(alpha=0.25, lw=0.5)
        fig.suptitle(f"{store_label(root)}: ablations", fontsize=10)
        fig.tight_layout()
        return save(fig, out_base, formats)


def lambda_spectra(root: zarr.Group, out_base: Path, formats: Sequence[str] = ("png",)
                   ) -> list[Path]:
    """Λ of every node layer, sorted descending against rank, log y; the constant feature is
    left out of the line and marked with a star at rank 0."""
    cmap = matplotlib.colormaps.get_cmap("tab10")
    with matplotlib.rc_context(STYLE):
        fig, ax = _subplots(figsize=(6.2, 4.0))
        any_const = False
        for c, layer in enumerate(root.attrs["node_layers"]):
            if f"layers/{layer}/lambdas" not in root:
                continue
            lam = np.asarray(root[f"layers/{layer}/lambdas"][...], dtype=np.float64)
            const = const_feature(root, layer)
            rest = np.sort(np.delete(lam, const) if const is not None else lam)[::-1]
            rest = rest[rest > 0]
            colour = cmap(c % 10)
            ax.plot(np.arange(1, rest.size + 1), rest, "-", color=colour, lw=1.3,
                    label=f"{layer} ({rest.size})")
            if const is not None and lam[const] > 0:
                any_const = True
                ax.scatter([0], [lam[const]], marker="*", s=60, color=colour, zorder=3)
        ax.set_yscale("log")
        ax.set_xlabel("feature rank (constant feature at 0)" if any_const else "feature rank")
        ax.set_ylabel("Λ" if root.attrs.get("basis") in ("lib", "gib") else "λ")
        handles = ax.get_legend_handles_labels()[0]
        if any_const:
            handles.append(Line2D([], [], marker="*", ls="", color="grey", ms=8,
                                  label="constant feature"))
        ax.legend(handles=handles, frameon=False, fontsize=7, title="layer (features)",
                  title_fontsize=7)
        ax.grid(alpha=0.25, lw=0.5, which="major")
        ax.set_title(f"{store_label(root)}: eigenvalue spectra per node layer")
        fig.tight_layout()
        return save(fig, out_base, formats)


# --- comparisons of several stores -------------------------------------------------------


def edges_required_bars(roots: Sequence[zarr.Group], labels: Sequence[str], out_base: Path,
                        formats: Sequence[str] = ("png",)) -> list[Path]:
    """Grouped bars of edges required per layer pair, one colour per store (paper figures 6,
    8, 14); a store without a layer pair has no bar there."""
    per_store = [{k: v["attrs"].get("edges_required") for k, v in edge_ablation(r).items()}
                 for r in roots]
    pairs: list[str] = []
    for d in per_store:
        pairs += [p for p in d if p not in pairs]
    n = max(1, len(roots))
    cmap = matplotlib.colormaps.get_cmap("tab10")
    with matplotlib.rc_context(STYLE):
        fig, ax = _subplots(figsize=(max(5.0, 1.1 + len(pairs) * (0.5 + 0.55 * n)), 4.0))
        bw = 0.8 / n
        values = [v for d in per_store for v in d.values() if v is not None]
        for s, (d, label) in enumerate(zip(per_store, labels)):
            xs = [i for i, p in enumerate(pairs) if d.get(p) is not None]
            hs = [d[pairs[i]] for i in xs]
            bars = ax.bar(np.array(xs) + (s - (n - 1) / 2) * bw, hs, bw * 0.92,
                          color=cmap(s % 10), label=label)
            ax.bar_label(bars, labels=[f"{h:,}" for h in hs], fontsize=7, padding=2)
        if values and min(values) > 0 and max(values) / min(values) > 50:
            ax.set_yscale("log")
        ax.margins(y=0.12)
        ax.set_xticks(range(len(pairs)), [p.replace("--", "\n→ ") for p in pairs])
        ax.set_ylabel("edges required")
        ax.set_xlabel("layer pair")
        ax.legend(frameon=False)
        ax.set_title("Edges required to stay within the tolerance")
        fig.tight_layout()
        return save(fig, out_base, formats)


def node_ablation_overlay(roots: Sequence[zarr.Group], labels: Sequence[str], out_base: Path,
                          formats: Sequence[str] = ("png",)) -> list[Path]:
    """Node-ablation curves of several stores, one panel per layer."""
    data = [node_ablation(r) for r in roots]
    layers: list[str] = []
    for d in data:
        layers += [n for n in d if n not in layers]
    kinds = {_score_kind(r) for r in roots}
    ylabel = SCORE_LABEL.get(next(iter(kinds)), "score") if len(kinds) == 1 else "score"
    n = max(1, len(layers))
    ncol = min(n, 3)
    nrow = (n + ncol - 1) // ncol
    cmap = matplotlib.colormaps.get_cmap("tab10")
    with matplotlib.rc_context(STYLE):
        fig, axes = _subplots(nrow, ncol, figsize=(4.0 * ncol, 3.2 * nrow), squeeze=False,
                                 sharey=True)
        for ax in axes.flat[n:]:
            ax.set_axis_off()
        if not layers:
            axes[0, 0].set_axis_off()
            axes[0, 0].text(0.5, 0.5, "no node ablation in these stores", ha="center")
        for ax, layer in zip(axes.flat, layers):
            for s, (d, label) in enumerate(zip(data, labels)):
                if layer in d:
                    k, sc = d[layer]
                    o = np.argsort(k)
                    ax.plot(k[o], sc[o], "-", color=cmap(s % 10), lw=1.3, label=label)
            ax.set_xscale("log")
            ax.set_title(layer)
            ax.set_xlabel("features kept")
            ax.grid(alpha=0.25, lw=0.5)
        for row in axes:
            row[0].set_ylabel(ylabel)
        fig.suptitle("Node ablation: only the first n features of a layer kept", fontsize=10)
        fig.tight_layout()
        if layers:
            handles, names = axes.flat[0].get_legend_handles_labels()
            for ax in axes.flat[1:n]:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    if lab not in names:
                        handles.append(h)
                        names.append(lab)
            fig.legend(handles, names, loc="upper center", ncol=min(len(names), 4),
                       frameon=False, bbox_to_anchor=(0.5, 0.0))
        return save(fig, out_base, formats)


__all__ = ["ablation_curves", "edges_required_bars", "interaction_graph", "lambda_spectra",
           "node_ablation_overlay", "save"]
