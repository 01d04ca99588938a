"""Plots and the HTML report of real analysed stores (LIB and PCA of a small transformer).

The headless-browser test needs Chromium; it skips where none is installed, unless
``RIBRAY_REQUIRE_CHROMIUM=1``, which makes a missing browser a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr
from matplotlib import image as mpimg

from ribray import plots
from ribray.config import PlotsSpec
from ribray.report import write_comparison, write_report
from ribray.store import StoreError, open_store

FIGURES = ("interaction_graph", "ablation_curves", "lambda_spectra")


@pytest.fixture(scope="session")
def lib_store(analysed_lib_store) -> Path:
    return analysed_lib_store


@pytest.fixture(scope="session")
def pca_store(analysed_pca_store) -> Path:
    return analysed_pca_store


@pytest.fixture(scope="session")
def lib_report(lib_store, tmp_path_factory) -> Path:
    return write_report(lib_store, tmp_path_factory.mktemp("report") / "lib-report",
                        PlotsSpec(), log=lambda s: None)


def _copy_without(store: Path, dest: Path, group: str) -> Path:
    """A copy of ``store`` with ``group`` deleted (the original stays untouched)."""
    shutil.copytree(store, dest)
    root = zarr.open_group(str(dest), mode="r+")
    del root[group]
    return dest


def _colours(rgb: np.ndarray) -> int:
    """Number of distinct colours of an (..., 3) float image in [0, 1]."""
    c = np.round(rgb * 255).astype(np.uint32)
    return int(np.unique((c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]).size)


def _check_image(path: Path, min_colours: int = 40, min_ink: float = 0.01) -> None:
    """A real figure: many distinct colours and a fair share of non-white pixels."""
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, img.shape
    colours = _colours(img[..., :3])
    ink = float((img[..., :3].min(axis=2) < 0.9).mean())
    assert colours >= min_colours, f"{path.name}: only {colours} colours"
    assert ink >= min_ink, f"{path.name}: only {ink:.2%} non-white pixels"


# --- the report of one store --------------------------------------------------------------


def test_analysis_is_non_trivial(lib_store):
    """The fixture's point: the searches keep some but not all edges, and modules exist."""
    root = open_store(lib_store)
    for _, g in root["analysis/edge_ablation"].groups():
        assert 0 < g.attrs["edges_required"] < g.attrs["n_candidates"]
    assert plots.resolutions(root) == [1.0, 0.5]
    assert "analysis/labels/ln2.0" in root


def test_report_files_and_links(lib_report):
    folder = lib_report.parent
    assert lib_report.name == "report.html"
    for name in FIGURES:
        for ext in ("png", "svg"):
            assert (folder / f"{name}.{ext}").stat().st_size > 5000, (name, ext)
    text = lib_report.read_text(encoding="utf-8")
    srcs = re.findall(r'<img[^>]*\bsrc="([^"]+)"', text)
    assert set(srcs) == {f"{n}.png" for n in FIGURES}
    assert 'id="graph" src="interaction_graph.png"' in text
    for ref in srcs + re.findall(r'href="([^"]+)"', text):
        assert not ref.startswith(("/", "file:")), ref
        assert (folder / ref).is_file(), ref
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.IGNORECASE)
    assert "<link" not in text and "@import" not in text and "url(" not in text
    for heading in ("Node layers", "Analysis settings", "Edges required", "Modules",
                    "Feature labels", "Λ spectra"):
        assert f"<h2>{heading}</h2>" in text


def test_report_content_matches_store(lib_store, lib_report):
    root = open_store(lib_store)
    text = lib_report.read_text(encoding="utf-8")
    assert str(lib_store.resolve()) in text and "test-lib" in text
    for _, g in root["analysis/edge_ablation"].groups():
        a = g.attrs
        row = re.search(rf"<tr><td>{re.escape(a['in_layer'])} → {re.escape(a['out_layer'])}"
                        rf"</td>(.*?)</tr>", text)
        assert row, (a["in_layer"], a["out_layer"])
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", row.group(1))
        assert cells[0] == f"{a['n_candidates']:,}" and cells[1] == f"{a['edges_required']:,}"
    st = root["layers/ln2.0"].attrs["stability"]  # "Is the data enough?": the jackknife
    row = re.search(r"<tr><td>ln2\.0</td>(.*?)</tr>", text.split("Is the data enough?")[1])
    assert row and re.findall(r"<td[^>]*>([^<]*)</td>", row.group(1))[:2] == [
        f"{st['n_shards']:,}", ", ".join(f"{v:.2g}" for v in st["top_lambda_rel_se"][:3])]
    labels = root["analysis/labels/ln2.0"].attrs["labels"][0]
    non_constant = [lab for lab in labels[:40] if lab != "constant"]
    assert non_constant and all(lab in text for lab in non_constant[:5])


def test_figures_are_real_images(lib_report):
    for name in FIGURES:
        _check_image(lib_report.parent / f"{name}.png")


def test_graph_options_and_missing_modularity(lib_store, tmp_path):
    """Merged output, squared widths, a node cap, a chosen γ; and a store without
    modularity (one colour) still draws."""
    root = open_store(lib_store)
    paths = plots.interaction_graph(root, tmp_path / "g", ["png"], edge_width="squared",
                                    merge_output=True, max_nodes_per_layer=4, resolution=0.5)
    assert paths == [tmp_path / "g.png"]
    _check_image(paths[0], min_colours=20, min_ink=0.005)
    with pytest.raises(ValueError, match="resolution 3"):
        plots.interaction_graph(root, tmp_path / "x", ["png"], resolution=3.0)
    bare = _copy_without(lib_store, tmp_path / "bare.zarr", "analysis/modularity")
    page = write_report(bare, tmp_path / "bare-report", PlotsSpec(formats=["png"]),
                        log=lambda s: None)
    text = page.read_text(encoding="utf-8")
    assert "No modularity analysis" in text and "no modules computed" in text
    _check_image(page.parent / "interaction_graph.png")
    assert not (page.parent / "interaction_graph.svg").exists()


# --- the page in a real browser -----------------------------------------------------------


def _chromium() -> str:
    path = "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else \
        shutil.which("chromium")
    if path is None:
        if os.environ.get("RIBRAY_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium not found and RIBRAY_REQUIRE_CHROMIUM=1")
        pytest.skip("chromium not installed")
    return path


def _run_chromium(page: Path, profile: Path, *extra: str) -> str:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
           "--force-device-scale-factor=1", *extra, page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_report_in_headless_chromium(lib_report, tmp_path):
    dom = _run_chromium(lib_report, tmp_path / "profile", "--dump-dom")
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total, "the page's load script did not run"
    assert int(total.group(1)) == len(FIGURES)
    assert loaded.group(1) == total.group(1)
    assert 'id="graph"' in dom
    rect = re.search(r'data-graph-rect="(-?\d+),(-?\d+),(\d+),(\d+)"', dom)
    assert rect, "no graph position recorded"
    left, top, width, height = (int(v) for v in rect.groups())
    assert width > 400 and height > 200

    shot = tmp_path / "shot.png"
    _run_chromium(lib_report, tmp_path / "profile2", f"--screenshot={shot}",
                  "--window-size=1280,2000")
    img = mpimg.imread(shot)
    assert img.shape[:2] == (2000, 1280)
    bottom = min(top + height, img.shape[0])
    assert bottom - top > 200, "the graph is not in the first 2000 pixels of the page"
    region = img[top:bottom, left:left + width, :3]
    ink = float((region.min(axis=2) < 0.9).mean())
    colours = _colours(region)
    assert ink > 0.02 and colours > 40, (ink, colours)


# --- comparisons ---------------------------------------------------------------------------


def test_comparison_of_lib_and_pca(lib_store, pca_store, tmp_path):
    page = write_comparison([lib_store, pca_store], tmp_path / "cmp")
    assert page == tmp_path / "cmp" / "comparison.html"
    for name in ("edges_required", "node_ablation"):
        assert (page.parent / f"{name}.svg").is_file()
        _check_image(page.parent / f"{name}.png", min_colours=20)
    text = page.read_text(encoding="utf-8")
    assert "test-lib (lib)" in text and "test-pca (pca)" in text
    assert not re.search(r"https?://", text)
    for src in re.findall(r'<img[^>]*\bsrc="([^"]+)"', text):
        assert (page.parent / src).is_file()
    lib, pca = open_store(lib_store), open_store(pca_store)
    for name, g in lib["analysis/edge_ablation"].groups():
        a, b = name.split("--")
        row = re.search(rf"<tr><td>{re.escape(a)} → {re.escape(b)}</td>(.*?)</tr>", text)
        assert row, name
        cells = re.findall(r"<td[^>]*>([^<]*)</td>", row.group(1))
        want = [g.attrs["edges_required"],
                pca[f"analysis/edge_ablation/{name}"].attrs["edges_required"]]
        assert cells == [f"{v:,}" for v in want]


def test_comparison_needs_an_analysis(lib_store, tmp_path):
    bare = _copy_without(lib_store, tmp_path / "bare.zarr", "analysis")
    with pytest.raises(StoreError) as err:
        write_comparison([lib_store, bare], tmp_path / "cmp")
    msg = str(err.value)
    assert str(bare) in msg and "analysis" in msg and "\n" not in msg
    assert not (tmp_path / "cmp" / "comparison.html").exists()
