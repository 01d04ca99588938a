"""Time the analysis job (``ribray analyze``) on one store, for several worker counts.

Usage (from the repository root):

    python benchmarks/bench_analysis.py STORE [--job jobs/reference/modadd-analysis.yaml]
                                        [--workers 1 2] [--probes 1]

The store is copied to a temporary folder for each run (the original is not touched), analysed
through Ray (a fresh local instance per run, no dashboard, no plots), and the seconds per phase
recorded in ``analysis.timings`` are printed with the edges required per layer pair, which must
not depend on the worker count. Figures vary with machine load: compare rows from one run only.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import ray
import zarr

from ribray.analyze import run_analysis
from ribray.config import AnalysisSpec, load_analysis

PHASES = ["base", "ablations", "modularity", "labels", "total_compute"]


def run(store: Path, spec: AnalysisSpec, workers: int, probes: int) -> tuple[dict, dict]:
    spec = spec.model_copy(update={
        "ray": spec.ray.model_copy(update={"num_workers": workers}),
        "edge_ablation": spec.edge_ablation.model_copy(update={"probes_per_round": probes}),
        "plots": spec.plots.model_copy(update={"enabled": False})})
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "store.zarr"
        shutil.copytree(store, copy)
        if "analysis" in zarr.open_group(str(copy), mode="r"):
            del zarr.open_group(str(copy), mode="r+")["analysis"]
        timings = run_analysis(copy, spec, dashboard=False, log=lambda s: None)
        g = zarr.open_group(str(copy), mode="r")["analysis/edge_ablation"]
        required = {name: sub.attrs["edges_required"] for name, sub in sorted(g.groups())}
    ray.shutdown()
    return timings, required


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--job", type=Path, default=None)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--probes", type=int, default=1)
    args = ap.parse_args()
    spec = load_analysis(args.job) if args.job else AnalysisSpec()
    rows = []
    for w in args.workers:
        timings, required = run(args.store, spec, w, args.probes)
        rows.append((w, timings, required))
        print(f"workers {w}: " + ", ".join(f"{p} {timings.get(p, 0.0):.1f}s" for p in PHASES)
              + f"; edges required {required}", flush=True)
    base = rows[0][1]["total_compute"]
    for w, t, _ in rows[1:]:
        print(f"speed-up {rows[0][0]} -> {w} workers: {base / t['total_compute']:.2f}x")
    if len({tuple(r[2].items()) for r in rows}) != 1:
        raise SystemExit("edges required differ between worker counts")


if __name__ == "__main__":
    main()
