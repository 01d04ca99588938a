"""The HTML report of an analysed store, and the comparison of several stores.

:func:`write_report` draws the figures of :mod:`ribray.plots` into a folder and writes
``report.html`` beside them: one static page with inline CSS, relative links to the images and
no network access at all, so it opens straight from disk (``file://``). A tiny inline script
records, once the page has loaded, how many ``<img>`` elements loaded
(``body[data-images-loaded]``) out of how many (``body[data-images-total]``), and where the
graph is drawn (``body[data-graph-rect]``: left, top, width, height in CSS pixels).

:func:`write_comparison` draws the edges-required bars and the node-ablation overlay of several
analysed stores (LIB against PCA, paper figures 6, 8 and 14) with ``comparison.html``.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ribray import plots
from ribray.config import PlotsSpec
from ribray.location import is_url
from ribray.store import StoreError, analysis_summary, open_store, summary

Log = Callable[[str], None]
MAX_LABEL_ROWS = 40  # features per layer in the label tables
MAX_MODULE_ROWS = 12  # modules per γ in the membership tables
MIN_EXPLAINED = 1e-3  # Fourier labels explaining less are noise (a constant feature)

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1180px; padding: 1.2em 2em 3em; color: #1e1e1e; line-height: 1.45; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
h3 { font-size: 1.02em; margin-top: 1.4em; }
.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.88em; }
th, td { border: 1px solid #d6d6d6; padding: 0.25em 0.6em; text-align: left;
         vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; }
figure img { max-width: 100%; max-height: 88vh; width: auto; height: auto;
             border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.status-complete { color: #176b1d; font-weight: 600; }
.status-other { color: #a4161a; font-weight: 600; }
code { background: #f5f5f5; padding: 0 0.25em; }
.small { font-size: 0.82em; color: #555; }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.dataset.imagesLoaded = String(ok.length);
  document.body.dataset.imagesTotal = String(imgs.length);
  var g = document.getElementById("graph");
  if (g) {
    var r = g.getBoundingClientRect();
    document.body.dataset.graphRect = [r.left + window.scrollX, r.top + window.scrollY,
                                       r.width, r.height].map(Math.round).join(",");
  }
});
"""


# --- small HTML helpers ------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell (``—`` for None)."""
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not np.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}"
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] = ()
          ) -> str:
    """An HTML table; every cell escaped (numbers formatted with :func:`fmt`)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            num = i < len(numeric) and numeric[i]
            cls = ' class="num"' if num else ""
            cells.append(f"<td{cls}>{esc(fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure(paths: Sequence[Path], folder: Path, alt: str, caption: str,
           img_id: str | None = None) -> str:
    """``<figure>`` with the PNG (else the first file) as image and links to the others."""
    if not paths:
        return ""
    png = [p for p in paths if p.suffix == ".png"]
    main = png[0] if png else paths[0]
    rel = main.relative_to(folder).as_posix()
    ident = f' id="{esc(img_id)}"' if img_id else ""
    links = " ".join(f'<a href="{esc(p.relative_to(folder).as_posix())}">'
                     f"{esc(p.suffix[1:].upper())}</a>" for p in paths if p != main)
    links = f" ({links})" if links else ""
    return (f'<figure><a href="{esc(rel)}"><img{ident} src="{esc(rel)}" alt="{esc(alt)}" '
            f'loading="eager"></a><figcaption>{esc(caption)}{links}</figcaption></figure>')


def page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n"
            f"<script>{SCRIPT}</script>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _status(value: Any) -> str:
    cls = "status-complete" if value == "complete" else "status-other"
    return f'<span class="{cls}">{esc(value)}</span>'


# --- the report of one store -------------------------------------------------------------


def _layer_rows(layers: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for lay in layers:
        top = lay.get("top_lambdas") or []
        rows.append([lay["layer"], lay.get("width"), lay.get("features"),
                     lay.get("const_lambda"),
                     ", ".join(fmt(v, 3) for v in top) if top else None])
    return rows


def _data_enough(layers: list[dict[str, Any]]) -> str:
    """"Is the data enough?": the leave-one-shard-out spread of each LIB layer and, where a
    job's stochastic sources took effect, their error (the summary's layer attrs
    ``stability`` and ``stochastic_error``, docs/zarr-layout.md); empty where no layer has
    either."""
    parts = []
    stab = [(r["layer"], r["stability"]) for r in layers if r.get("stability")]
    if stab:
        parts.append(table(
            ["node layer", "shards", "top Λ s.e. (relative)", "largest angle (°)",
             "median angle (°)"],
            [[n, st["n_shards"], ", ".join(fmt(v, 2) for v in st["top_lambda_rel_se"][:3]),
              st["max_principal_angle_deg"], st["median_principal_angle_deg"]]
             for n, st in stab], numeric=[False, True, False, True, True]))
        parts.append('<p class="small">Leave-one-shard-out (jackknife) spread of the LIB '
                     "rotation: standard errors of the top Λ relative to Λ, and principal "
                     "angles between the kept subspaces with each shard left out.</p>")
    src = [(r["layer"], r["stochastic_error"]) for r in layers if r.get("stochastic_error")]
    if src:
        parts.append(table(
            ["node layer", "sources r", "M rel. error", "top Λ s.e. (relative)"],
            [[n, st.get("r"), st.get("m_rel_error", st.get("reason")),
              ", ".join(fmt(v, 2) for v in st.get("top_lambda_rel_se", [])[:3]) or None]
             for n, st in src], numeric=[False, True, True, False]))
        parts.append('<p class="small">The error of the stochastic sources, from the spread '
                     "between them (it needs r ≥ 2).</p>")
    return "<h2>Is the data enough?</h2>" + "".join(parts) if parts else ""


def _settings(a: dict[str, Any], root: zarr.Group) -> str:
    data = a.get("data") or {}
    data_txt = ", ".join(f"{k} {v}" for k, v in data.items() if v is not None)
    timings = root["analysis"].attrs.get("timings") or {}
    rows = [["score", plots.SCORE_LABEL.get(a.get("score_kind"), a.get("score_kind"))],
            ["tolerance", fmt(a.get("tolerance"))],
            ["unablated score", fmt(a.get("base_score"), 6)],
            ["evaluation data", data_txt or "—"],
            ["evaluation samples", fmt(a.get("n_samples"))],
            ["analysed node layers", ", ".join(a.get("node_layers") or [])],
            ["analysis status", a.get("status")]]
    if "total_compute" in timings:
        rows.append(["analysis time", f"{timings['total_compute']:.1f} s"])
    return table(["setting", "value"], rows)


def _modules_tables(root: zarr.Group, mods: list[dict[str, Any]], layers: list[str]) -> str:
    if not mods:
        return "<p>No modularity analysis in the store.</p>"
    out = [table(["resolution γ", "modularity Q", "modules", "seed"],
                 [[m["resolution"], m["modularity"], m["n_modules"], m["seed"]] for m in mods],
                 numeric=[True, True, True, True])]
    for m in mods:
        per = plots.modules(root, float(m["resolution"]))
        cols = [n for n in layers if n in per]
        n_mod = int(m["n_modules"] or 0)
        shown = min(n_mod, MAX_MODULE_ROWS)
        rows = []
        for k in range(shown):
            rows.append([f"module {k}"] + [int((per[n] == k).sum()) for n in cols]
                        + [sum(int((per[n] == k).sum()) for n in cols)])
        if n_mod > shown:
            rows.append([f"{n_mod - shown} smaller modules"]
                        + [int((per[n] >= shown).sum()) for n in cols]
                        + [sum(int((per[n] >= shown).sum()) for n in cols)])
        rows.append(["no edge (−1)"] + [int((per[n] < 0).sum()) for n in cols]
                    + [sum(int((per[n] < 0).sum()) for n in cols)])
        out.append(f"<h3>Module membership, γ = {esc(fmt(m['resolution']))}</h3>")
        out.append(table(["module", *cols, "total"], rows,
                         numeric=[False] + [True] * (len(cols) + 1)))
    return "\n".join(out)


def _label_tables(root: zarr.Group, layers: list[str], resolution: float | None) -> str:
    g = root["analysis/labels"]
    per = plots.modules(root, resolution) if resolution is not None else {}
    out = []
    names = [n for n in layers if n in g] + sorted(n for n, _ in g.groups() if n not in layers)
    for name in names:
        sub = g[name]
        labels: list[list[str]] = sub.attrs.get("labels", [])
        if not labels:
            continue
        lam = np.asarray(root[f"layers/{name}/lambdas"][...])
        explained = (np.asarray(sub["explained"][...]) if "explained" in sub
                     else np.ones((len(labels), len(labels[0]))))
        n = min(len(labels[0]), MAX_LABEL_ROWS)

        def cell(t: int, f: int, labels: list[list[str]] = labels,
                 explained: np.ndarray = explained) -> str:
            lab = labels[t][f]
            return "" if lab == "constant" or explained[t, f] < MIN_EXPLAINED else lab

        positions = [t for t in range(len(labels)) if any(cell(t, f) for f in range(n))]
        rows = []
        for f in range(n):
            mod = int(per[name][f]) if name in per else None
            rows.append([f, lam[f] if f < lam.size else None,
                         "—" if mod is None else ("none" if mod < 0 else mod)]
                        + [cell(t, f) for t in positions])
        head = ["feature", "Λ", "module"] + [f"label, position {t}" for t in positions]
        more = len(labels[0]) - n
        note = f' <span class="small">(first {n} of {len(labels[0])} features)</span>' \
            if more > 0 else ""
        out.append(f"<h3>{esc(name)}{note}</h3>")
        out.append(table(head, rows, numeric=[True, True, True]))
    modulus = next((g[n].attrs.get("modulus") for n in names), None)
    intro = (f"<p>Fourier labels (appendix F) on the full {esc(modulus)}×{esc(modulus)} grid: "
             "the largest components of each feature with the fraction of its variance they "
             "explain. Labels of constant features, and labels that explain less than "
             f"{100 * MIN_EXPLAINED:g} % of the variance (numerical noise where a feature is "
             "constant at that position), are left blank; positions with no label left are "
             "not shown. Modules at the largest γ.</p>")
    return intro + "\n".join(out)


def write_report(store: str | Path, folder: Path, plots_spec: PlotsSpec | None = None,
                 log: Log = print) -> Path:
    """Draw the figures of ``store`` into ``folder`` and write ``folder/report.html``;
    returns the page's path. The store is only read."""
    spec = plots_spec or PlotsSpec()
    folder = Path(folder)
    t0 = time.perf_counter()
    root = open_store(store)
    folder.mkdir(parents=True, exist_ok=True)
    attrs = dict(root.attrs)
    a = analysis_summary(root)
    layers = summary(root)["layers"]  # node layers as `ribray show` lists them
    formats = list(spec.formats)
    name = attrs.get("config", {}).get("name", "?")
    basis = str(attrs.get("basis", "?"))

    graph, curves = [], []
    has_edges = bool(a and a.get("edge_ablation"))
    if has_edges:
        graph = plots.interaction_graph(root, folder / "interaction_graph", formats,
                                        edge_width=spec.edge_width,
                                        merge_output=spec.merge_output,
                                        max_nodes_per_layer=spec.max_nodes_per_layer)
    if a and (a.get("edge_ablation") or a.get("node_ablation")):
        curves = plots.ablation_curves(root, folder / "ablation_curves", formats)
    spectra = plots.lambda_spectra(root, folder / "lambda_spectra", formats)

    parts = [f"<h1>LIB report: {esc(name)}</h1>",
             f'<p class="sub">store <code>{esc(_shown(store))}</code> · basis '
             f"<b>{esc(basis.upper())}</b> · job status {_status(attrs.get('status'))} · "
             f"analysis {_status(a.get('status') if a else 'absent')}</p>"]
    parts.append("<h2>Node layers</h2>")
    parts.append(table(["node layer", "width", "features kept", "Λ const", "top Λ"],
                       _layer_rows(layers), numeric=[False, True, True, True, False]))
    parts.append(f'<p class="small">{esc(attrs.get("n_samples", "?"))} samples analysed by the '
                 f"job; Λ const is the constant feature's value (— where the layer has none)."
                 "</p>")
    parts.append(_data_enough(layers))
    if a is None:
        parts.append("<h2>Analysis</h2><p>The store has no analysis yet: run "
                     f"<code>ribray analyze {esc(store)}</code>.</p>")
    else:
        parts.append("<h2>Analysis settings</h2>")
        parts.append(_settings(a, root))
        layers = list(a.get("node_layers") or attrs.get("node_layers", []))
        mods = a.get("modularity") or []
        if graph:
            gamma = mods[0]["resolution"] if mods else None
            how = "√E" if spec.edge_width == "sqrt" else "E²"
            cap = (f"Interaction graph: kept edges only, line width ∝ {how} (normalised per "
                   f"layer pair); nodes sorted by importance (sum of kept edges), at most "
                   f"{spec.max_nodes_per_layer} per layer; constant features left out; "
                   + (f"colours: Leiden modules at γ = {fmt(gamma)}, grey: no kept edge."
                      if gamma is not None else "no modules computed; grey: no kept edge."))
            parts.append("<h2>Interaction graph</h2>")
            parts.append(figure(graph, folder, "interaction graph", cap, img_id="graph"))
        if a.get("edge_ablation"):
            parts.append("<h2>Edges required</h2>")
            rows = []
            for e in a["edge_ablation"]:
                cand, req = e.get("n_candidates"), e.get("edges_required")
                frac = f"{100 * req / cand:.2f} %" if cand and req is not None else None
                rows.append([e["edge"].replace("--", " → "), cand, req, frac, e.get("epsilon"),
                             e.get("evaluations")])
            parts.append(table(["layer pair", "candidates", "edges required", "fraction",
                                "ε (smallest kept E)", "evaluations"], rows,
                               numeric=[False, True, True, True, True, True]))
        if curves:
            parts.append("<h2>Ablation curves</h2>")
            parts.append(figure(curves, folder, "ablation curves",
                                "(a) every probe of the bisect search per layer pair (o: within "
                                "the tolerance, x: not), target and edges required; (b) score "
                                "with only the first n features of a layer kept."))
        parts.append("<h2>Modules</h2>")
        parts.append(_modules_tables(root, mods, layers))
        if a.get("labels"):
            parts.append("<h2>Feature labels</h2>")
            parts.append(_label_tables(root, layers, mods[0]["resolution"] if mods else None))
    parts.append("<h2>Λ spectra</h2>")
    parts.append(figure(spectra, folder, "lambda spectra",
                        "Λ of every node layer, sorted, log scale; stars: constant features."))
    parts.append(f'<p class="small">Written by ribray {esc(attrs.get("ribray_version", "?"))} '
                 f"on {esc(time.strftime('%Y-%m-%d %H:%M'))}.</p>")
    path = folder / "report.html"
    path.write_text(page(f"LIB report: {name} ({basis})", "\n".join(parts)), encoding="utf-8")
    log(f"report: {path} ({len(graph) + len(curves) + len(spectra)} figures, "
        f"{time.perf_counter() - t0:.1f}s)")
    return path


def _shown(store: str | Path) -> str:
    """A local store's absolute path; a URL as it is."""
    return str(store) if is_url(store) else str(Path(store).resolve())


# --- comparison of several stores --------------------------------------------------------


def _analysed(path: str | Path) -> zarr.Group:
    root = open_store(path)
    status = root["analysis"].attrs.get("status") if "analysis" in root else None
    if status != "complete":
        what = "no analysis" if status is None else f"an analysis with status {status!r}"
        raise StoreError(f"{path}: the store has {what}; run `ribray analyze {path}` first")
    return root


def write_comparison(stores: Sequence[str | Path], folder: Path,
                     formats: Sequence[str] = ("png", "svg")) -> Path:
    """Edges required (bars) and node ablation (overlay) of several analysed stores, with
    ``folder/comparison.html``; raises :class:`StoreError` for a store without a complete
    analysis. Returns the page's path."""
    stores = [str(s) for s in stores]
    if not stores:
        raise StoreError("no stores to compare")
    roots = [_analysed(s) for s in stores]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = [plots.store_label(r) for r in roots]
    bars = plots.edges_required_bars(roots, labels, folder / "edges_required", formats)
    nodes = plots.node_ablation_overlay(roots, labels, folder / "node_ablation", formats)

    per_store = [{e["edge"]: e for e in (analysis_summary(r) or {}).get("edge_ablation", [])}
                 for r in roots]
    pairs: list[str] = []
    for d in per_store:
        pairs += [p for p in d if p not in pairs]
    rows = [[p.replace("--", " → ")] + [d[p]["edges_required"] if p in d else None
                                        for d in per_store] for p in pairs]
    store_rows = []
    for s, r, lab in zip(stores, roots, labels):
        a = r["analysis"].attrs
        store_rows.append([lab, str(s), a.get("score_kind"), a.get("tolerance"),
                           a.get("base_score"), a.get("n_samples")])
    body = ["<h1>Comparison of analysed stores</h1>",
            table(["store", "path", "score", "tolerance", "unablated score", "samples"],
                  store_rows, numeric=[False, False, False, True, True, True]),
            "<h2>Edges required</h2>",
            table(["layer pair", *labels], rows, numeric=[False] + [True] * len(labels)),
            figure(bars, folder, "edges required",
                   "Edges required per layer pair to stay within the tolerance."),
            "<h2>Node ablation</h2>",
            figure(nodes, folder, "node ablation",
                   "Score with only the first n features of a layer kept.")]
    path = folder / "comparison.html"
    path.write_text(page("ribray comparison", "\n".join(body)), encoding="utf-8")
    return path


__all__ = ["write_comparison", "write_report"]
