"""docs/example.ipynb runs end to end on a small real store and is committed without outputs.

The fixture is the session's analysed LIB store of the fitted p = 13 transformer (conftest), and a
copy of it without ``analysis/``. The
notebook is executed by a real Jupyter kernel (nbclient) with ``RIBRAY_STORE`` pointing at the
store; its last cell prints ``NOTEBOOK-OK {json}``, which the tests parse. On the job's full
data each LIB feature's second moment equals its Λ (C = R V diag(√Λ)), so the notebook's own
check must hold to round-off.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("xarray")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "example.ipynb"
LAYERS = ["ln1.0", "ln2.0", "unembed", "output"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, analysed_lib_store) -> dict[str, Path]:
    """The session's analysed LIB store (the fitted p = 13 transformer), and a copy of it
    without ``analysis/``."""
    import zarr

    plain = tmp_path_factory.mktemp("notebook") / "plain.zarr"
    shutil.copytree(analysed_lib_store, plain)
    del zarr.open_group(str(plain), mode="r+")["analysis"]
    return {"analysed": analysed_lib_store, "plain": plain}


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def _execute(store: Path, monkeypatch) -> tuple[dict, list]:
    """Run the notebook on ``store``; returns the NOTEBOOK-OK summary and the code cells."""
    monkeypatch.setenv("RIBRAY_STORE", str(store))  # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    cells = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    lines = [line for o in cells[-1].outputs if o.output_type == "stream"
             for line in o.text.splitlines() if line.startswith("NOTEBOOK-OK ")]
    assert len(lines) == 1, cells[-1].outputs
    return json.loads(lines[0].removeprefix("NOTEBOOK-OK ")), cells


def _images(cells: list) -> int:
    return sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs)


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    # a short markdown cell before every step
    assert nb.cells[0].cell_type == "markdown"
    assert all(a.cell_type == "markdown" for a, b in zip(nb.cells, nb.cells[1:])
               if b.cell_type == "code")


def test_notebook_runs_on_an_analysed_store(stores, monkeypatch):
    import zarr

    store = stores["analysed"]
    before = _snapshot(store)
    checks, cells = _execute(store, monkeypatch)
    assert checks["store"] == str(store)
    assert checks["n_layers"] == 4 and checks["node_layers"] == LAYERS
    assert checks["basis"] == "lib"
    assert checks["analysis"] is True and checks["analysis_status"] == "complete"
    # all samples of the job's data (p = 13: far fewer than the notebook's 4096 cap)
    n_samples = zarr.open_group(str(store), mode="r").attrs["n_samples"]
    assert checks["full_data"] is True and checks["n_samples_used"] == n_samples < 4096
    # E[f_hat²] = Λ for every non-constant feature of every LIB layer with an M
    assert checks["lambda_layers_checked"] == LAYERS[:-1]
    assert checks["max_lambda_rel_dev"] is not None and checks["max_lambda_rel_dev"] < 1e-6
    # Λ spectra, feature maps, edge probes, node ablation, interaction graph
    assert _images(cells) >= 5
    assert _snapshot(store) == before  # the notebook only reads


def test_notebook_runs_on_a_store_without_analysis(stores, monkeypatch):
    checks, cells = _execute(stores["plain"], monkeypatch)
    assert checks["node_layers"] == LAYERS and checks["analysis"] is False
    assert checks["analysis_status"] is None
    assert checks["max_lambda_rel_dev"] < 1e-6
    assert _images(cells) >= 3  # Λ spectra, feature maps, interaction graph
