"""End to end on a real local Ray instance: stores, worker-count independence, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from conftest import ROOT, SHARED, write_job
from ribray.cli import app
from ribray.config import load_job
from ribray.orchestrate import run_job
from ribray.store import open_store

runner = CliRunner()


def arrays(path: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    out = {}
    for group in ("layers", "edges"):
        for name, g in root[group].groups():
            for an, arr in g.arrays():
                out[f"{group}/{name}/{an}"] = np.asarray(arr[...])
    return out


@pytest.fixture(scope="module")
def two_stores(ray_local, small_transformer_ckpt, tmp_path_factory):
    """The same job with 1 and with 3 workers."""
    stores = {}
    for n in (1, 3):
        d = tmp_path_factory.mktemp(f"w{n}")
        job = load_job(write_job(d / "job.yaml", **{"model.path": str(small_transformer_ckpt),
                                                    "ray.num_workers": n}))
        run_job(job, d / "store.zarr", log=lambda s: None)
        stores[n] = d / "store.zarr"
    return stores


def test_worker_count_does_not_change_results(two_stores):
    """Shards are fixed by the data and shard size, each worker uses one thread, and partials
    are merged in shard order: 1 and 3 workers must give the same bits, not merely close
    numbers (a completion-order reduction would differ at ~1e-16 and fail here)."""
    a, b = arrays(two_stores[1]), arrays(two_stores[3])
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_store_layout(two_stores):
    root = open_store(two_stores[1])
    attrs = dict(root.attrs)
    assert attrs["status"] == "complete"
    assert attrs["node_layers"] == ["ln1.0", "ln2.0", "unembed", "output"]
    assert attrs["basis"] == "lib" and attrs["config"]["name"] == "test"
    assert set(attrs["fingerprints"]) == {"model", "data"}
    assert {"gram", "basis_M", "edges", "total"} <= set(attrs["timings"])
    for layer in attrs["node_layers"]:
        g = root[f"layers/{layer}"]
        assert g.attrs["complete"] is True
        C, Cp, lam = g["C"], g["C_pinv"], g["lambdas"]
        assert C.shape == (g.attrs["width"], g.attrs["n_features"]) == Cp.shape[::-1]
        assert lam.shape == (g.attrs["n_features"],)
        assert C.metadata.dimension_names == ("raw", "feature")
    for a, b in zip(attrs["node_layers"][:-1], attrs["node_layers"][1:]):
        E = root[f"edges/{a}--{b}/E"]
        assert E.shape == (root[f"layers/{b}"].attrs["n_features"],
                           root[f"layers/{a}"].attrs["n_features"])


def test_xarray_opens_every_group(two_stores):
    xr = pytest.importorskip("xarray")
    root = open_store(two_stores[1])
    groups = [f"layers/{n}" for n in root.attrs["node_layers"]]
    groups += [f"edges/{n}" for n, _ in root["edges"].groups()]
    for g in groups:
        ds = xr.open_zarr(str(two_stores[1]), group=g, consolidated=False)
        assert len(ds.data_vars) >= 1
    ds = xr.open_zarr(str(two_stores[1]), group="layers/ln2.0", consolidated=False)
    lam = ds["lambdas"].values
    C = ds["C"].values
    assert ds["C"].dims == ("raw", "feature") and C.shape[1] == lam.shape[0]


def test_show(two_stores):
    res = runner.invoke(app, ["show", str(two_stores[1]), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["status"] == "complete" and len(s["layers"]) == 4 and len(s["edges"]) == 3
    E = np.asarray(zarr.open_group(str(two_stores[1]))["edges/ln2.0--unembed/E"][...])
    assert s["edges"][1]["sum"] == pytest.approx(float(E.sum()), rel=1e-12)
    res = runner.invoke(app, ["show", str(two_stores[1])])
    assert res.exit_code == 0 and "ln2.0" in res.output


def one_line_error(res, *needles: str) -> None:
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_bad_job_files(tmp_path, small_transformer_ckpt):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    one_line_error(runner.invoke(app, ["validate", str(bad_yaml)]), str(bad_yaml), "YAML")
    extra = write_job(tmp_path / "extra.yaml", **{"model.path": str(small_transformer_ckpt),
                                                  "model.colour": "red"})
    one_line_error(runner.invoke(app, ["validate", str(extra)]), "model.colour",
                   "Extra inputs are not permitted")
    thr = write_job(tmp_path / "thr.yaml", **{"model.path": str(small_transformer_ckpt),
                                              "basis.truncation_threshold": -1})
    one_line_error(runner.invoke(app, ["submit", str(thr)]), "basis.truncation_threshold")
    one_line_error(runner.invoke(app, ["validate", str(tmp_path / "none.yaml")]), "not found")


def test_bad_inputs_leave_no_complete_store(tmp_path, small_transformer_ckpt):
    missing = write_job(tmp_path / "missing.yaml", **{"model.path": str(tmp_path / "no.pt")})
    one_line_error(runner.invoke(app, ["submit", str(missing)]), "model.path", "not found")
    wrong = tmp_path / "wrong.pt"
    obj = torch.load(small_transformer_ckpt, weights_only=True)
    obj["state_dict"]["blocks.0.mlp.W_in"] = torch.zeros(3, 3)
    torch.save(obj, wrong)
    shaped = write_job(tmp_path / "shaped.yaml", **{"model.path": str(wrong)})
    one_line_error(runner.invoke(app, ["submit", str(shaped)]), "model.path", "W_in")
    layer = write_job(tmp_path / "layer.yaml", **{"model.path": str(small_transformer_ckpt),
                                                  "basis.node_layers": ["ln1.0", "mlp_hidden.0",
                                                                        "output"]})
    one_line_error(runner.invoke(app, ["submit", str(layer)]), "basis.node_layers",
                   "mlp_hidden.0")
    order = write_job(tmp_path / "order.yaml", **{"model.path": str(small_transformer_ckpt),
                                                  "basis.node_layers": ["ln2.0", "ln1.0"]})
    one_line_error(runner.invoke(app, ["validate", str(order)]), "basis.node_layers", "order")
    afile = tmp_path / "afile"
    afile.write_text("x")
    isfile = write_job(tmp_path / "isfile.yaml", **{"model.path": str(small_transformer_ckpt),
                                                    "out": str(afile)})
    one_line_error(runner.invoke(app, ["submit", str(isfile)]), "out", "is a file")
    assert afile.read_text() == "x"
    assert not (tmp_path / "store.zarr").exists()


def test_existing_store_needs_overwrite(two_stores, small_transformer_ckpt, tmp_path):
    # the same job again (any worker count): complete already, nothing is recomputed
    before = np.asarray(open_store(two_stores[1])["layers/ln2.0/C"][...])
    same = write_job(tmp_path / "same.yaml", **{"model.path": str(small_transformer_ckpt),
                                                "out": str(two_stores[1]),
                                                "ray.num_workers": 2})
    res = runner.invoke(app, ["submit", str(same), "--no-dashboard"])
    assert res.exit_code == 0 and "complete already" in res.output, res.output
    assert np.array_equal(np.asarray(open_store(two_stores[1])["layers/ln2.0/C"][...]), before)
    # another configuration is refused unless --overwrite
    job = write_job(tmp_path / "job.yaml", **{"model.path": str(small_transformer_ckpt),
                                              "out": str(two_stores[1]),
                                              "basis.truncation_threshold": 1e-9})
    one_line_error(runner.invoke(app, ["submit", str(job)]), "different job configuration",
                   "--overwrite")
    assert open_store(two_stores[1]).attrs["status"] == "complete"
    # a job that fails its checks does not touch the old store, even with --overwrite
    bad = write_job(tmp_path / "bad.yaml", **{"model.path": str(small_transformer_ckpt),
                                              "out": str(two_stores[1]),
                                              "basis.node_layers": ["ln1.0", "nope", "output"]})
    one_line_error(runner.invoke(app, ["submit", str(bad), "--overwrite"]), "nope")
    assert open_store(two_stores[1]).attrs["status"] == "complete"


def test_data_that_does_not_fit_the_model(small_transformer_ckpt, tmp_path):
    job = write_job(tmp_path / "job.yaml", **{"model.path": str(small_transformer_ckpt),
                                              "data.modulus": 20})
    one_line_error(runner.invoke(app, ["validate", str(job)]), "field data.modulus",
                   "the model has 14")
    from ribray.checkpoints import save_mlp
    from ribray.math.models import MLP

    save_mlp(tmp_path / "mlp.pt", MLP([5, 4, 10]))
    digits = write_job(tmp_path / "digits.yaml", **{
        "model.path": str(tmp_path / "mlp.pt"),
        "data": {"kind": "digits"},
        "basis.node_layers": ["layers.0", "layers.1", "output"]})
    one_line_error(runner.invoke(app, ["validate", str(digits)]), "field data",
                   "the model takes (n, 5)")


def test_more_workers_than_the_cluster_holds(ray_local, small_transformer_ckpt, tmp_path):
    job = write_job(tmp_path / "job.yaml", **{"model.path": str(small_transformer_ckpt),
                                              "ray.num_workers": 50})
    one_line_error(runner.invoke(app, ["submit", str(job)]), "field ray.num_workers", "exceed")
    gpu = write_job(tmp_path / "gpu.yaml", **{"model.path": str(small_transformer_ckpt),
                                              "ray.gpus_per_worker": 1})
    one_line_error(runner.invoke(app, ["submit", str(gpu)]), "field ray.gpus_per_worker")
    assert not (tmp_path / "store.zarr").exists()


def test_autoscaling_takes_the_worker_count_as_given(ray_local, small_transformer_ckpt,
                                                     tmp_path):
    """On an autoscaling cluster the current size is no limit (the actors wait for nodes), but
    the count and GPUs must be explicit; neither changes the result hash."""
    from ribray.orchestrate import placement
    from ribray.store import result_hash

    loose = write_job(tmp_path / "loose.yaml", **{"model.path": str(small_transformer_ckpt),
                                                  "ray.autoscaling": True})
    one_line_error(runner.invoke(app, ["validate", str(loose)]), "field ray",
                   "needs ray.num_workers and ray.gpus_per_worker")
    job = load_job(write_job(tmp_path / "job.yaml", **{
        "model.path": str(small_transformer_ckpt), "ray.autoscaling": True,
        "ray.num_workers": 50, "ray.gpus_per_worker": 1}))
    assert placement(job.ray) == (50, 1)  # 50 GPU workers on a 3-CPU, 0-GPU cluster
    plain = job.model_copy(update={"ray": job.ray.model_copy(
        update={"autoscaling": False, "num_workers": 2})})
    assert result_hash(job.model_dump()) == result_hash(plain.model_dump())


def test_driver_threads_leave_the_workers_cores_alone(ray_local):
    """The driver's BLAS threads get the CPUs of its node that no worker there holds."""
    import ray

    from ribray.orchestrate import driver_threads

    here = ray.get_runtime_context().get_node_id()
    assert driver_threads([{"node": here}] * 2, 1.0, cpu_count=2) == 1  # all held: one
    assert driver_threads([{"node": here}], 2.0, cpu_count=8) == 6
    assert driver_threads([{"node": "elsewhere"}] * 4, 1.0, cpu_count=8) == 8
    assert driver_threads([], 1.0, cpu_count=3) == 3


def test_nan_stops_the_job_and_marks_the_store_failed(ray_local, small_transformer_ckpt,
                                                      tmp_path):
    obj = torch.load(small_transformer_ckpt, weights_only=True)
    obj["state_dict"]["unembed.W_U"][0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(obj, bad)
    job = write_job(tmp_path / "job.yaml", **{"model.path": str(bad)})
    res = runner.invoke(app, ["submit", str(job), "--no-dashboard"])
    assert res.exit_code == 1, res.output
    last = res.output.strip().splitlines()[-1]
    assert "non-finite" in last and "output" in last and "shard 0" in last, last
    assert open_store(tmp_path / "store.zarr").attrs["status"] == "failed"


def test_readme_main_job(ray_local, tmp_path):
    """The README's first command on the shipped checkpoint: `ribray submit jobs/modadd.yaml`,
    then `ribray show` (output redirected to a temporary store)."""
    store = tmp_path / "modadd.zarr"
    res = runner.invoke(app, ["submit", str(ROOT / "jobs" / "modadd.yaml"), "--out", str(store),
                              "--no-dashboard"])
    assert res.exit_code == 0, res.output
    s = json.loads(runner.invoke(app, ["show", str(store), "--json"]).output)
    assert s["status"] == "complete" and [r["layer"] for r in s["layers"]] == [
        "ln1.0", "ln2.0", "unembed", "output"]
    root = open_store(store)
    assert root["layers/output"].attrs["n_features"] == 113 + 1  # d_vocab, unrotated
    for layer in ("ln1.0", "ln2.0", "unembed"):
        g = root[f"layers/{layer}"]
        assert 1 < g.attrs["n_features"] <= g.attrs["width"]


def test_train_commands_write_loadable_checkpoints(tmp_path):
    from ribray.checkpoints import load_model
    from ribray.train import train_modadd

    res = runner.invoke(app, ["train", "digits-mlp", "--out", str(tmp_path / "mlp.pt")])
    assert res.exit_code == 0, res.output
    model, meta = load_model(tmp_path / "mlp.pt", "ribray", torch.float64)
    assert meta["test_acc"] > 0.9 and model.sizes == [64, 64, 64, 10]
    meta = train_modadd(tmp_path / "m.pt", p=7, max_epochs=20, log=lambda s: None)
    model, saved = load_model(tmp_path / "m.pt", "ribray", torch.float64)
    assert saved["epochs"] == 20 and model.cfg.d_vocab == 8


ANALYSIS_JOBS = sorted((ROOT / "jobs").rglob("*-analysis.yaml"))


@pytest.mark.parametrize("job_file", sorted(set((ROOT / "jobs").rglob("*.yaml")) -
                                            set(ANALYSIS_JOBS)), ids=lambda p: p.name)
def test_shipped_job_files_validate(job_file, monkeypatch):
    if "reference" in job_file.parts and not SHARED.is_dir():
        pytest.skip("reference checkpoints not available")
    monkeypatch.chdir(ROOT)  # job files' relative paths resolve against the working directory
    res = runner.invoke(app, ["validate", str(job_file.relative_to(ROOT))])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("job_file", ANALYSIS_JOBS, ids=lambda p: p.name)
def test_shipped_analysis_jobs_fit_their_stores(job_file):
    """Analysis jobs validate, and their node layers are consecutive node layers of the jobs
    they are meant for (the reference modular-addition jobs)."""
    from ribray.analyze import resolve_layers
    from ribray.config import load_analysis, load_job

    spec = load_analysis(job_file)
    for job in sorted(job_file.parent.glob("modadd-seed*.yaml")):
        assert resolve_layers(spec, load_job(job).basis.node_layers) == spec.node_layers
    assert spec.score.kind == "accuracy" and spec.score.resolved_tolerance == 0.001
    assert spec.data == {"split": "test"}
