"""Fault tolerance and resume: bit-equal stores after a killed worker, a removed node and a killed
driver (on a local multi-node cluster, tests/fault_injection.py), and the store's lease.

The fault scenarios run in a subprocess: a Ray driver joins one cluster per process, and this
test session has its own local instance. Each scenario's store must equal the undisturbed run's
bit for bit: the shards are the same, a shard's partial sum does not depend on which worker (or
which attempt) computed it, partials are reduced in shard order, and kept partials round-trip
through the store exactly.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from conftest import ROOT, write_job
from ribray.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("faults")
    env = {**os.environ, "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN")
           or secrets.token_hex(16)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fault_injection.py"), str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAULTS-JSON ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[0].removeprefix("FAULTS-JSON "))


def test_one_worker_per_gpu_on_a_multi_node_cluster(tmp_path):
    """Two nodes with one fake GPU each: without ray.num_workers, ribray starts one worker per
    GPU, each holding one GPU (Ray's GPU ids), on distinct nodes; the job completes (the
    workers fall back to the CPU because no CUDA device exists)."""
    env = {**os.environ, "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN")
           or secrets.token_hex(16)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fault_injection.py"),
                           "placement", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PLACEMENT-JSON ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(lines[0].removeprefix("PLACEMENT-JSON "))
    workers = [re.search(r"worker \d+: pid \d+ on node (\w+) \((\w+), GPU ids \[(\d+)\]\)", ln)
               for ln in r["log"] if "worker " in ln and " pid " in ln]
    assert len(workers) == 2 and all(workers), r["log"][:4]
    assert len({m.group(1) for m in workers}) == 2  # one per node
    assert r["status"] == "complete"


def test_progress_is_reported(ray_local, small_transformer_ckpt, tmp_path):
    """Every phase reports shards done with rates; the store's progress attribute is there
    while the job runs and gone once it is complete."""
    from ribray.config import load_job
    from ribray.orchestrate import run_job
    from ribray.progress import Event, Reporter

    job = write_job(tmp_path / "job.yaml", **{"model.path": str(small_transformer_ckpt)})
    seen: list[dict] = []
    lines: list[str] = []
    store = tmp_path / "new" / "folder" / "s.zarr"  # folders that do not exist yet
    run_job(load_job(job), store, dashboard=False, log=lines.append,
            on_progress=lambda ev: seen.append(ev.as_dict()))
    phases = {e["phase"] for e in seen}
    # ln2.0 (MLP) and unembed (affine) take M from the Gram pass's sums: no pass of their own
    assert phases == {"gram", "M/ln1.0", "edges/ln1.0--ln2.0", "edges/ln2.0--unembed",
                      "edges/unembed--output"}
    finals = [e for e in seen if e["done"] == e["total"]]
    assert len(finals) == len(phases) and all(e["eta"] == 0.0 for e in finals)
    assert all(e["samples_per_s"] > 0 and e["tokens_per_s"] == 3 * e["samples_per_s"]
               for e in finals)  # modular addition: 3 tokens per sample
    assert any("samples/s" in ln and "tokens/s" in ln for ln in lines)
    assert "progress" not in zarr.open_group(str(store), mode="r").attrs
    bars = Reporter(lambda s: None, bars=True)  # the terminal view renders without a terminal
    bars(Event("j", "gram", 1, 2, 0.5, 10.0, 30.0))
    bars.close()
    from ribray.remote import format_progress  # what `ribray status` prints of it

    assert format_progress(Event("j", "M/ln2.0", 1, 4, 2.0, 64.0, 192.0, 1).as_dict()) == (
        "phase M/ln2.0, shards 1/4, 64 samples/s, 192 tokens/s, ETA 6s")


def _check(result: dict, fault: str) -> None:
    log = result["log"]
    assert any(ln.startswith(f"FAULT: {fault}") for ln in log), log
    assert not any(ln.startswith("FAULT-ERROR") for ln in log), log
    assert result["status"] == "complete" and not result["partials_left"]
    assert result["n_arrays"] > 20
    assert result["equal"], result["diffs"]


def test_killed_worker_gives_a_bit_equal_store(faults):
    _check(faults["kill_worker"], "killed worker")


def test_removed_node_gives_a_bit_equal_store(faults):
    _check(faults["remove_node"], "removed node")


@pytest.mark.parametrize("scenario", ["kill_driver", "kill_driver_url"])
def test_killed_driver_resumes_to_a_bit_equal_store(faults, scenario):
    """At a local path and at a ``file://`` URL (fsspec and zarr's FsspecStore, the code path
    of ``s3://`` and ``gs://`` stores): the lease, the kept partials and the resume."""
    r = faults[scenario]
    assert r["reached_trigger"] and r["status_after_kill"] == "running"
    assert r["resume_rc"] == 0 and r["resumes"] == 1
    log = "\n".join(r["log"])
    # only what was not complete is recomputed: statistics, the finished layers and the kept
    # shards of the interrupted phase come from the store
    assert "gram: written by an earlier run" in log
    assert "basis unembed: written by an earlier run" in log
    assert "M/ln2.0:" in log and "shards kept by an earlier run" in log
    assert r["status"] == "complete" and not r["partials_left"]
    assert r["equal"], r["diffs"]


def test_a_store_another_live_job_writes_is_refused(tmp_path, small_transformer_ckpt,
                                                    ray_local):
    """A lease held by a live process refuses a second submit (with or without --overwrite);
    once that process is gone the lease is stale and the job runs."""
    store = tmp_path / "store.zarr"
    job = write_job(tmp_path / "job.yaml", **{"model.path": str(small_transformer_ckpt),
                                              "out": str(store)})
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from ribray.store import Lease; Lease(Path(sys.argv[1])); print('held', flush=True); "
         "time.sleep(120)", str(store)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--overwrite"]):
            res = runner.invoke(app, ["submit", str(job), "--no-dashboard", *extra])
            lines = [ln for ln in res.output.splitlines() if ln.strip()]
            assert res.exit_code == 2 and len(lines) == 1, res.output
            assert f"being written by pid {holder.pid}" in lines[0]
        assert not store.exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    res = runner.invoke(app, ["submit", str(job), "--no-dashboard"])
    assert res.exit_code == 0, res.output
    assert zarr.open_group(str(store), mode="r").attrs["status"] == "complete"
    assert not Path(str(store) + ".lock").exists()  # released at the end


def test_kept_partials_round_trip_exactly_and_damage_is_recomputed(tmp_path):
    """Partials come back bit for bit (counts per layer included); one whose chunk was lost
    (zarr would read zeros) fails its checksum and is left out, so a resumed run computes that
    shard again instead of using wrong numbers."""
    import shutil

    import numpy as np

    from ribray.math.accumulators import ActSums, Moments, Sum
    from ribray.store import StoreWriter

    rng = np.random.default_rng(0)
    w = StoreWriter(tmp_path / "s.zarr", {"config": {"name": "t"}})
    try:
        gram = {"ln1.0": Moments(6, rng.normal(size=3), rng.normal(size=(3, 3))),
                "ln2.0": Moments(2, rng.normal(size=2), rng.normal(size=(2, 2))),
                "ln2.0--unembed": ActSums(6, rng.normal(size=5), rng.normal(size=(5, 5))),
                "unembed--output": ActSums(6)}  # an affine section: the count alone
        w.save_partial("gram", 0, gram)
        w.save_partial("M/ln2.0", 3, Sum(7, rng.normal(size=(4, 4))))
        back = w.load_partials("gram")[0]
        assert back.keys() == gram.keys()
        for k, m in gram.items():
            assert type(back[k]) is type(m) and back[k].count == m.count
            for name in ("mean", "comoment", "g_sum", "gram"):
                a, b = getattr(m, name, None), getattr(back[k], name, None)
                assert (a is None and b is None) or a.tobytes() == b.tobytes()
        assert list(w.load_partials("M/ln2.0")) == [3]
        assert w.load_partials("M/ln2.0")[3].per_source is None
        with_sources = Sum(7, rng.normal(size=(4, 4)), rng.normal(size=(2, 4, 4)))
        w.save_partial("edges/a--b", 0, with_sources)
        kept = w.load_partials("edges/a--b")[0]
        assert kept.total.tobytes() == with_sources.total.tobytes()
        assert kept.per_source.tobytes() == with_sources.per_source.tobytes()
        w.save_partial("edges/c--d", 0, Sum(7, rng.normal(size=(4, 4)), np.zeros((1, 0))))
        assert w.load_partials("edges/c--d")[0].n_sources == 1  # one source: the empty marker
        shutil.rmtree(tmp_path / "s.zarr" / "partials" / "M" / "ln2.0" / "000003" / "total" / "c")
        assert w.load_partials("M/ln2.0") == {}
    finally:
        w.fail("test over")


def test_quick_phases_keep_no_partials(ray_local, small_transformer_ckpt, tmp_path):
    """Partials are kept once a phase has run ``ray.keep_partials_after_s``: from the first
    shard with 0 (all but the last, whose phase then completes), none for a phase that ends
    sooner. Either way the reduced result is the same."""
    import numpy as np
    import ray

    from ribray.build import load_data
    from ribray.config import load_job
    from ribray.data import shard_ranges
    from ribray.orchestrate import LibWorker, RayBackend
    from ribray.store import StoreWriter

    job = load_job(write_job(tmp_path / "job.yaml", **{"model.path": str(small_transformer_ckpt)}))
    workers = [ray.remote(num_cpus=1)(LibWorker).remote(job.model_dump()) for _ in range(2)]
    shards = shard_ranges(len(load_data(job)), job.ray.shard_size)
    layers = ["ln1.0", "ln2.0"]
    results = {}
    for keep_after in (0.0, 3600.0):
        writer = StoreWriter(tmp_path / f"keep{keep_after:g}.zarr", {"config": {"k": keep_after}})
        try:
            backend = RayBackend(workers, shards, lambda s: None, cache=writer,
                                 keep_after=keep_after)
            results[keep_after] = backend.gram(layers)
            kept = writer.load_partials("gram")
        finally:
            writer.fail("test")
        assert len(kept) == (len(shards) - 1 if keep_after == 0 else 0)
    for s in range(len(shards)):
        for layer in layers:
            a, b = results[0.0][s][layer], results[3600.0][s][layer]
            assert a.count == b.count and np.array_equal(a.comoment, b.comoment)
    for w in workers:
        ray.kill(w)


def test_a_failing_recursion_writes_what_it_had(ray_local, small_transformer_ckpt, tmp_path):
    """On Ray the driver's writes wait until the workers have shards to compute; when the
    recursion fails (here a layer's M from the Gram pass's sums raises), what was computed
    before the failure (every layer's statistics, the final basis) is written before the error
    is raised, and nothing after it is."""
    import ray

    from ribray import pipeline
    from ribray.build import load_data, load_sequential
    from ribray.config import load_job
    from ribray.data import shard_ranges
    from ribray.orchestrate import LibWorker, RayBackend

    job = load_job(write_job(tmp_path / "job.yaml", **{"model.path": str(small_transformer_ckpt)}))
    workers = [ray.remote(num_cpus=1)(LibWorker).remote(job.model_dump()) for _ in range(2)]
    layers = list(job.basis.node_layers)
    model = load_sequential(job)
    widths = {n: model.width(n) for n in layers}

    def broken(sums, C):
        raise RuntimeError("broken on purpose")

    sink = pipeline.MemorySink()
    backend = RayBackend(workers, shard_ranges(len(load_data(job)), job.ray.shard_size),
                         lambda s: None)
    try:
        with pytest.raises(RuntimeError, match="broken on purpose"):
            pipeline.run(backend, layers, widths,
                         pipeline.BasisSettings("lib", 1e-12, "absolute", False, True), sink,
                         closed={("unembed", "output"): broken})
    finally:
        for w in workers:
            ray.kill(w)
    assert set(sink.grams) == set(layers)  # queued before the failure, written after it
    assert set(sink.bases) == {"output"} and not sink.edge_sets
