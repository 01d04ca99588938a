"""Stores at fsspec URLs: ``memory://`` (an fsspec file system with no local files, as S3 or
GCS are to this code) in this process, and ``file://`` across processes in the fault tests
(tests/test_resume.py). The numbers must not depend on where the store is."""

from __future__ import annotations

import importlib.util
import secrets
import time

import fsspec
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from conftest import write_job
from ribray.cli import app
from ribray.config import load_job
from ribray.location import Location
from ribray.orchestrate import PreflightError, run_job
from ribray.remote import check_store
from ribray.store import Lease, StoreError, check_path, open_store, summary

runner = CliRunner()


def _arrays(root: zarr.Group) -> dict[str, bytes]:
    out = {}
    for top in ("layers", "edges"):
        for name, g in root[top].groups():
            for an, arr in g.arrays():
                a = np.asarray(arr[...])
                out[f"{top}/{name}/{an}"] = (a.shape, a.dtype.str, a.tobytes())
    return out


def _memory_url(name: str) -> str:
    return f"memory://ribray-tests-{secrets.token_hex(4)}/{name}"


def test_a_store_at_a_memory_url_is_bit_equal_to_a_local_one(ray_local, small_transformer_ckpt,
                                                             tmp_path):
    job = load_job(write_job(tmp_path / "job.yaml",
                             **{"model.path": str(small_transformer_ckpt)}))
    local = tmp_path / "local.zarr"
    url = _memory_url("store.zarr")
    run_job(job, local, dashboard=False, log=lambda s: None)
    run_job(job, url, dashboard=False, log=lambda s: None)
    a = open_store(local)
    b = open_store(url)
    assert b.attrs["status"] == "complete" and b.attrs["config"]["out"] == url
    assert _arrays(a) == _arrays(b)
    assert summary(b)["layers"] == summary(a)["layers"]
    fs = fsspec.filesystem("memory")
    assert not fs.exists(url + ".lock")  # the lease beside the store is released
    assert not any("partials" in p for p in fs.find(url))  # kept partials are dropped
    # the same job again: complete already, nothing recomputed
    lines: list[str] = []
    run_job(job, url, dashboard=False, log=lines.append)
    assert any("complete already" in ln for ln in lines)
    # another configuration is refused unless --overwrite, as for a local path
    other = job.model_copy(update={"name": "other"})
    with pytest.raises(PreflightError, match="different job configuration"):
        run_job(other, url, dashboard=False, log=lambda s: None)


def test_leases_at_a_url_exclude_a_second_writer_and_expire(monkeypatch):
    url = _memory_url("leased.zarr")
    first = Lease(url)
    try:
        with pytest.raises(StoreError, match="being written by pid"):
            Lease(url)
        with pytest.raises(StoreError, match="being written by pid"):
            check_path(Location(url), overwrite=True)
    finally:
        first.release()
    assert Lease.holder(url) is None
    # a lease whose heartbeat stopped (a driver killed on another host) is taken over
    stale = Lease(url)
    stale._stop.set()
    lock = Location(url + ".lock")
    lock.write_text(lock.read_text().replace(stale.info["host"], "elsewhere"), "t")
    monkeypatch.setattr(Lease, "TIMEOUT", 0.05)
    time.sleep(0.1)
    second = Lease(url)
    assert second._owned() and not stale._owned()
    stale.release()  # not the owner any more: must leave the new lease alone
    assert second._owned()
    second.release()
    assert not lock.exists()


def test_url_stores_from_the_command_line(tmp_path, small_transformer_ckpt):
    """``show`` of a URL store, a URL store's doctor check, and a missing backend in one line."""
    assert check_store(_memory_url("x.zarr")).ok
    res = runner.invoke(app, ["show", _memory_url("absent.zarr")])
    assert res.exit_code == 2 and "not a Zarr store" in res.output
    if importlib.util.find_spec("s3fs") is None:
        job = write_job(tmp_path / "job.yaml", **{"model.path": str(small_transformer_ckpt),
                                                  "out": "s3://bucket/x.zarr"})
        res = runner.invoke(app, ["submit", str(job), "--no-dashboard"])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1, res.output
        assert "needs the s3fs package" in lines[0]
        check = check_store("gs://bucket/x.zarr")
        assert not check.ok and "gcsfs" in check.detail
