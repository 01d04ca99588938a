"""Time the reference modular-addition job (seed 0) phase by phase.

Usage (from the repository root; needs ../shared/reference-models):

    python benchmarks/bench_modadd_reference.py [--job jobs/reference/modadd-seed0-lib.yaml]
                                                [--workers 1 2] [--serial]

For each worker count it runs the whole job through Ray (a fresh local instance per run, no
dashboard) and prints seconds per phase as recorded in the store's ``timings`` attribute:
preflight (checkpoint, data, checks), ray_start, workers_start (actors load the model), gram,
basis_M (Jacobian-Gram passes and eigendecompositions), edges, total. ``--serial`` adds the same
recursion in this process without Ray, which isolates the math from the orchestration. Figures
vary with machine load: compare rows from one run only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray

from ribray import pipeline
from ribray.build import basis_settings, compute_settings, load_data, load_sequential
from ribray.config import load_job
from ribray.data import shard_ranges
from ribray.orchestrate import run_job
from ribray.shards import SerialBackend, ShardComputer

PHASES = ["preflight", "ray_start", "workers_start", "gram", "basis_M", "edges", "total"]


def ray_run(job_file: Path, workers: int) -> dict[str, float]:
    job = load_job(job_file)
    job = job.model_copy(update={"ray": job.ray.model_copy(update={"num_workers": workers})})
    with tempfile.TemporaryDirectory() as tmp:
        timings = run_job(job, Path(tmp) / "store.zarr", dashboard=False, log=lambda s: None)
    ray.shutdown()
    return timings


def serial_run(job_file: Path) -> dict[str, float]:
    job = load_job(job_file)
    t0 = time.perf_counter()
    model, data = load_sequential(job), load_data(job)
    comp = ShardComputer(model, data.inputs, compute_settings(job))
    layers = list(job.basis.node_layers)
    t1 = time.perf_counter()
    timings = pipeline.run(SerialBackend(comp, shard_ranges(len(data), job.ray.shard_size)),
                           layers, {n: model.width(n) for n in layers}, basis_settings(job),
                           pipeline.MemorySink())
    timings["preflight"] = t1 - t0
    timings["total"] = time.perf_counter() - t0
    return timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", type=Path, default=Path("jobs/reference/modadd-seed0-lib.yaml"))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--serial", action="store_true", help="also run without Ray")
    args = ap.parse_args()
    rows = {}
    if args.serial:
        rows["serial (no Ray)"] = serial_run(args.job)
    for w in args.workers:
        rows[f"Ray, {w} worker{'s' if w > 1 else ''}"] = ray_run(args.job, w)
    print(f"{args.job}")
    print(f"{'run':<18}" + "".join(f"{p:>14}" for p in PHASES))
    for name, t in rows.items():
        print(f"{name:<18}" + "".join(f"{t.get(p, float('nan')):>14.2f}" for p in PHASES))


if __name__ == "__main__":
    main()
