"""Fault injection on a local multi-node Ray cluster (run by tests/test_resume.py).

    python tests/fault_injection.py OUT_DIR
    python tests/fault_injection.py placement OUT_DIR

Starts ``ray.cluster_utils.Cluster``: a head without CPUs (so the driver's objects live on a
node that stays) and three worker nodes of one CPU each, two of them holding LibWorker actors
and one spare. On it, the same LIB job (the shipped modular-addition model, 1024 samples in 8
shards) runs four times:

* ``reference``: undisturbed;
* ``kill_worker``: one worker process SIGKILLed once the M phase of ``ln2.0`` has kept 2 shards;
* ``remove_node``: the node of one worker removed (not gracefully) at the same point;
* ``kill_driver``: ``ribray submit --address`` in a subprocess, SIGKILLed at the same point,
  then the same command again, which resumes;
* ``kill_driver_url``: the same with the store at a ``file://`` URL (fsspec, FsspecStore).

It prints one JSON line: per scenario, whether its arrays equal the reference's bit for bit,
and what the runs logged. It runs in its own process because a Ray driver can join only one
cluster, and the test session has its own local instance.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
TRIGGER = "partials/M/ln2.0"
TRIGGER_SHARDS = 2


def job_file(out_dir: Path) -> Path:
    import yaml

    job = {"name": "faults", "model": {"path": str(ROOT / "checkpoints" / "modadd-p113.pt")},
           "data": {"kind": "modular-addition", "n_samples": 1024},
           "basis": {"kind": "lib", "node_layers": ["ln1.0", "ln2.0", "unembed", "output"],
                     "truncation_threshold": 1e-10, "threshold_mode": "relative"},
           # the exact path and partials kept at once: phases long enough to be interrupted
           # mid-way, and shards kept from the first one on
           "jacobians": "exact",
           "ray": {"num_workers": 2, "shard_size": 128, "batch_size": 64,
                   "keep_partials_after_s": 0},
           "out": str(out_dir / "unused.zarr")}
    path = out_dir / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def kept_shards(store: Path | str, key: str) -> int:
    """Complete per-shard partials of a phase in a store being written (0 if none yet)."""
    try:
        root = zarr.open_group(str(store), mode="r")
        if key not in root:
            return 0
        return sum(bool(g.attrs.get("complete")) for _, g in root[key].groups())
    except Exception:  # noqa: BLE001 - the store is being written; try again
        return 0


def wait_for(store: Path | str, stop: threading.Event, timeout: float = 300.0) -> bool:
    t0 = time.time()
    while not stop.is_set() and time.time() - t0 < timeout:
        if kept_shards(store, TRIGGER) >= TRIGGER_SHARDS:
            return True
        time.sleep(0.05)
    return False


def arrays(store: Path | str) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(store), mode="r")
    out = {}
    for top in ("layers", "edges"):
        for name, g in root[top].groups():
            for arr_name, arr in g.arrays():
                out[f"{top}/{name}/{arr_name}"] = np.asarray(arr[...])
    return out


def compare(a: Path | str, b: Path | str) -> dict:
    """Bit-equality of every array, and the root attributes that describe the result."""
    x, y = arrays(a), arrays(b)
    diffs = sorted(k for k in set(x) | set(y)  # bytes: -0.0 and 0.0 differ, NaN equals NaN
                   if k not in x or k not in y or x[k].shape != y[k].shape
                   or x[k].dtype != y[k].dtype or x[k].tobytes() != y[k].tobytes())
    for top in ("layers", "edges"):  # the attributes that describe each group's contents
        ga, gb = (dict(zarr.open_group(str(p), mode="r")[top].groups()) for p in (a, b))
        for name in set(ga) | set(gb):
            keys = ("n_features", "const_feature", "n_rows", "width", "complete")
            if name not in ga or name not in gb or any(
                    ga[name].attrs.get(k) != gb[name].attrs.get(k) for k in keys):
                diffs.append(f"{top}/{name} attributes")
    ra = dict(zarr.open_group(str(a), mode="r").attrs)
    rb = dict(zarr.open_group(str(b), mode="r").attrs)
    same_attrs = all(ra.get(k) == rb.get(k) for k in ("node_layers", "basis", "fingerprints",
                                                       "n_samples"))
    root_b = zarr.open_group(str(b), mode="r")
    return {"equal": not diffs and same_attrs, "diffs": diffs, "n_arrays": len(x),
            "status": rb.get("status"), "partials_left": "partials" in root_b,
            "resumes": rb.get("resumes", 0)}


def in_process(job: Path, store: Path, fault=None) -> list[str]:
    """Run the job as a driver in this process; ``fault(log_lines)`` runs in a thread once the
    trigger point is reached."""
    from ribray.config import load_job
    from ribray.orchestrate import run_job

    lines: list[str] = []
    stop = threading.Event()

    def inject():
        if wait_for(store, stop):
            try:
                lines.append(f"FAULT: {fault(lines)}")
            except Exception as exc:  # noqa: BLE001 - reported to the test, which fails
                lines.append(f"FAULT-ERROR: {type(exc).__name__}: {exc}")

    t = threading.Thread(target=inject, daemon=True) if fault else None
    if t:
        t.start()
    try:
        run_job(load_job(job), store, log=lines.append)
    finally:
        stop.set()
        if t:
            t.join(timeout=5)
    return lines


def kill_driver(job: Path, store: Path | str, ref: Path, address: str) -> dict:
    """``ribray submit`` in a subprocess, SIGKILLed at the trigger, then run again."""
    cmd = [sys.executable, "-m", "ribray.cli", "submit", str(job), "--out", str(store),
           "--address", address, "--no-dashboard"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, cwd=ROOT)
    reached = wait_for(store, threading.Event())
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    status_after_kill = dict(zarr.open_group(str(store), mode="r").attrs).get("status")
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    return {**compare(ref, store), "reached_trigger": reached,
            "status_after_kill": status_after_kill, "resume_rc": second.returncode,
            "log": (second.stdout + second.stderr).splitlines()}


def worker_pids(lines: list[str]) -> list[tuple[int, str]]:
    return [(int(m.group(1)), m.group(2)) for ln in lines
            for m in [re.search(r"worker \d+: pid (\d+) on node (\w+)", ln)] if m]


def placement(out_dir: Path) -> None:
    """A cluster of two nodes with one (fake) GPU and two CPUs each, and a job that leaves the
    worker count to ribray: one worker per GPU, each holding one GPU, on distinct nodes."""
    import ray
    import yaml
    from ray.cluster_utils import Cluster

    out_dir.mkdir(parents=True, exist_ok=True)
    job = job_file(out_dir)
    spec = yaml.safe_load(job.read_text())
    spec["ray"].pop("num_workers")
    job.write_text(yaml.safe_dump(spec))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        lines = in_process(job, out_dir / "gpus.zarr")
        status = dict(zarr.open_group(str(out_dir / "gpus.zarr"), mode="r").attrs)["status"]
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("PLACEMENT-JSON " + json.dumps({"log": lines, "status": status}))


def main(out_dir: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    out_dir.mkdir(parents=True, exist_ok=True)
    job = job_file(out_dir)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    result: dict = {}
    try:
        ref = out_dir / "reference.zarr"
        result["reference_log"] = in_process(job, ref)

        def kill_worker(lines):
            pid, _ = worker_pids(lines)[0]
            os.kill(pid, signal.SIGKILL)
            return f"killed worker pid {pid}"

        store = out_dir / "kill_worker.zarr"
        log = in_process(job, store, kill_worker)
        result["kill_worker"] = {**compare(ref, store), "log": log}

        def remove_node(lines):
            _, node_id = worker_pids(lines)[0]
            node = next(n for n in nodes if n.node_id == node_id)
            cluster.remove_node(node, allow_graceful=False)
            return f"removed node {node_id[:12]}"

        store = out_dir / "remove_node.zarr"
        log = in_process(job, store, remove_node)
        result["remove_node"] = {**compare(ref, store), "log": log}

        result["kill_driver"] = kill_driver(job, out_dir / "kill_driver.zarr", ref,
                                            cluster.address)
        # the same at a file:// URL: the store goes through fsspec and zarr's FsspecStore
        url = (out_dir / "kill_driver_url.zarr").as_uri()
        result["kill_driver_url"] = kill_driver(job, url, ref, cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("FAULTS-JSON " + json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1] == "placement":
        placement(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
