"""The shipped language-model jobs at full model size, here: seconds and tokens/s per phase.

Usage (from the repository root)::

    python benchmarks/bench_lm.py [--job jobs/tinystories.yaml] [--samples 32]
                                  [--jacobian-samples 8] [--workers 2] [--blocks K]

The job file is run as shipped except for what cannot be had offline or in minutes: the
model is a randomly initialised model of the checkpoint's architecture and size (TinyStories-1M:
GPT-Neo, 8 blocks of width 64, 16 heads, local attention in every other block; GPT-2 small: 12
blocks of width 768), saved with ``save_pretrained`` and loaded back through the user's path;
the data is ``data/lm-smoke.txt`` repeated, tokenised with the smoke model's word-level
tokenizer (its ids fit any vocabulary); the sample counts are ``--samples`` and
``--jacobian-samples`` instead of the job's; ``--blocks K`` keeps the node layers of the first
K blocks, the next node layer being the final one (default: all). Context length, node layers,
sources, dtype and batch sizes are the job's. Random weights give other features than the
trained ones but the same cost.

It prints the store's seconds per phase, tokens per second for the statistics (Gram) and for the
Jacobian phases (M and edges together, as Ray runs them in shared maps; per Jacobian token; the
log lines above give each phase's own rate), and the projection of each phase to the job's
own sample counts and node layers (linear in the samples, and in the blocks: every block has
the same sections; the unembedding's section is not in a ``--blocks`` run). CPU figures on this
2-core machine; on a GPU machine the same script gives the GPU figures (``ray.gpus_per_worker``
is the job's when a GPU is present, 0 otherwise).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import ray
import torch

from ribray.config import load_job
from ribray.orchestrate import run_job

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "checkpoints" / "lm-smoke"


def same_size_model(name: str, out: Path) -> None:
    """A random model with the configuration of the hub checkpoint ``name`` (known ones only:
    nothing is downloaded), saved to ``out`` with the smoke model's tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)  # the same weights every run: the features kept set the cost
    if name == "roneneldan/TinyStories-1M":
        cfg = GPTNeoConfig(vocab_size=50257, max_position_embeddings=2048, hidden_size=64,
                           num_layers=8, num_heads=16, intermediate_size=256,
                           attention_types=[[["global", "local"], 4]], window_size=256)
        model = GPTNeoForCausalLM(cfg)
    elif name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config())
    else:
        raise SystemExit(f"no known configuration for {name!r}")
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SMOKE / f, out / f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", type=Path, default=ROOT / "jobs" / "tinystories.yaml")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--jacobian-samples", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=None)
    args = ap.parse_args()
    job = load_job(args.job)
    full_n, full_jac = job.data.n_samples, job.data.jacobian_samples
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, text = Path(tmp) / "model", Path(tmp) / "text.txt"
        same_size_model(job.model.path, model_dir)
        base = (ROOT / "data" / "lm-smoke.txt").read_text()
        need = args.samples * job.data.n_ctx  # ~1 token per word: repeat until enough words
        text.write_text(base * (need // max(1, len(base.split())) + 2))
        layers, per_block = list(job.basis.node_layers), 1.0
        if args.blocks is not None:
            n_blocks = 1 + max(int(n.rsplit(".", 1)[1]) for n in layers if "." in n)
            kept = [n for n in layers if "." in n and int(n.rsplit(".", 1)[1]) < args.blocks]
            layers, per_block = layers[: len(kept) + 1], n_blocks / args.blocks
        gpus = job.ray.gpus_per_worker if torch.cuda.is_available() else 0
        job = job.model_copy(update={
            "model": job.model.model_copy(update={"path": str(model_dir)}),
            "data": job.data.model_copy(update={
                "path": str(text), "n_samples": args.samples,
                "jacobian_samples": args.jacobian_samples, "cache_dir": str(Path(tmp) / "c")}),
            "basis": job.basis.model_copy(update={"node_layers": layers}),
            "ray": job.ray.model_copy(update={"num_workers": args.workers,
                                              "gpus_per_worker": gpus})})
        timings = run_job(job, Path(tmp) / "store.zarr", dashboard=False, log=print)
    ray.shutdown()
    ctx = job.data.n_ctx
    print(f"\n{args.job.name}: {len(layers)} node layers, n_ctx {ctx}, {args.samples} sequences "
          f"for the statistics, {args.jacobian_samples} for M and the edges, "
          f"{args.workers} workers")
    print(f"{'phase':<10}{'seconds':>10}{'tokens/s':>12}{'projected to the job':>24}"
          f"  (x{per_block:g} for the blocks)")
    jac = timings.get("basis_M", 0.0) + timings.get("edges", 0.0)  # fused on Ray
    rows = [("gram", timings.get("gram", float("nan")), args.samples, full_n),
            ("M + edges", jac, args.jacobian_samples, full_jac)]
    for phase, t, n, full in rows:
        proj = t * (full or n) / n * per_block
        print(f"{phase:<10}{t:>10.2f}{n * ctx / t:>12.0f}{proj / 3600:>20.2f} h")
    for phase in ("preflight", "ray_start", "workers_start", "total"):
        print(f"{phase:<10}{timings.get(phase, float('nan')):>10.2f}")


if __name__ == "__main__":
    main()
