"""The Jacobian phase: fast paths against the exact path, and achieved FLOP/s.

Usage (from the repository root):

    python benchmarks/bench_jacobians.py [--threads 1] [--samples 512] [--ctx 16] [--seqs 2]

1. This machine's matmul rate (2048², float32 and float64, ``--threads`` threads).
2. Modular addition (the shipped ``checkpoints/modadd-p113.pt``, float64, ``--samples``
   inputs): for the attention, MLP and unembedding sections, M and edges with
   ``jacobians: exact`` and ``auto``, side by side: seconds, ratio, largest difference
   relative to the largest entry.
3. GPT-2-small-shaped sections (d_model 768, 12 heads of 64, d_mlp 3072, GELU; random weights,
   float32, ``--seqs`` sequences of ``--ctx`` tokens, queries at every position): M of the
   attention section (by parts) and of the MLP section (closed form), with the matmul FLOPs
   each executes (``torch.utils.flop_counter``), achieved FLOP/s, and the fraction of the
   float32 matmul rate. The exact path on the attention section is timed on 48 of the 768
   output features and scaled to all of them (it is linear in the feature count); the flop
   counter cannot follow its ``autograd.grad`` calls, so it has a time only.

Bases are random full-rank matrices of the right shapes (timing does not depend on their
values). Figures vary with machine load: compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ribray.checkpoints import load_model
from ribray.data import modular_addition
from ribray.math import lib
from ribray.math.jacobian import integration_points
from ribray.math.models import Transformer, TransformerConfig
from ribray.math.sequential import SequentialModel, to_sequential

ROOT = Path(__file__).resolve().parents[1]
POINTS = integration_points("gradient", 0)


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def matmul_rate(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t, _ = timed(lambda: a @ b, repeat=3)
    return 2 * n**3 / t


def basis(width: int, k: int, seed: int, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    C = np.random.default_rng(seed).standard_normal((width, k)).astype(dtype)
    return C, np.linalg.pinv(C.astype(np.float64)).astype(dtype)


def modadd(samples: int) -> None:
    model, _ = load_model(ROOT / "checkpoints" / "modadd-p113.pt", "ribray", torch.float64)
    seq = to_sequential(model, last_pos_only=True).eval()
    x = modular_addition(113, 0.3, 0, "train").inputs[:samples]
    print(f"\n2. modular addition, {len(x)} samples, float64 (seconds; exact/auto)")
    print(f"{'section':<22}{'what':<7}{'exact':>9}{'auto':>9}{'ratio':>8}{'max rel diff':>14}")
    for a, b in [("ln1.0", "ln2.0"), ("ln2.0", "unembed"), ("unembed", "output")]:
        C_a, C_a_pinv = basis(seq.width(a), seq.width(a) - 10, 1)
        C_b, _ = basis(seq.width(b), seq.width(b) - 10, 2)
        for what, fn, args in (("M", lib.m_partial, (a, b, C_b)),
                               ("edges", lib.edge_partial, (a, b, C_a, C_a_pinv, C_b))):
            te, ex = timed(partial(fn, seq, x, *args, POINTS, 256, method="exact"))
            ta, au = timed(partial(fn, seq, x, *args, POINTS, 256, method="auto"), repeat=2)
            diff = np.abs(au.total - ex.total).max() / np.abs(ex.total).max()
            print(f"{a + '->' + b:<22}{what:<7}{te:>9.3f}{ta:>9.3f}{te / ta:>7.1f}x{diff:>14.1e}",
                  flush=True)


def counted(fn: Callable[[], object], count: bool) -> tuple[float, int | None]:
    """Seconds, and matmul FLOPs (the flop counter cannot follow ``autograd.grad``, which
    the exact path calls: None there)."""
    flops = None
    if count:
        with FlopCounterMode(display=False) as fc:
            fn()
        flops = fc.get_total_flops()
    t, _ = timed(fn, repeat=1 if not count else 2)
    return t, flops


def gpt2_shaped(ctx: int, seqs: int, f32_rate: float) -> None:
    cfg = TransformerConfig(d_vocab=1000, n_ctx=ctx, d_model=768, n_heads=12, d_head=64,
                            d_mlp=3072, n_layers=1, act_fn="gelu")
    model = Transformer(cfg, dtype=torch.float32)
    model.init_weights(torch.Generator().manual_seed(0))
    seq: SequentialModel = to_sequential(model, last_pos_only=False).eval()
    tokens = torch.randint(0, 1000, (seqs, ctx), generator=torch.Generator().manual_seed(1))
    print(f"\n3. GPT-2-small-shaped sections, float32, {seqs} sequences x {ctx} tokens; float32 "
          f"matmul rate {f32_rate / 1e9:.1f} GFLOP/s")
    print(f"{'section':<30}{'path':<22}{'seconds':>9}{'GFLOP':>9}{'GFLOP/s':>9}{'of rate':>9}")
    C_att, _ = basis(seq.width("ln2.0"), 768, 3, np.float32)
    rows = [("attention ln1.0->ln2.0", "by parts (auto)",
             lambda: lib.m_partial(seq, tokens, "ln1.0", "ln2.0", C_att, POINTS, seqs), 1.0),
            ("attention ln1.0->ln2.0", "exact, 48 features",
             lambda: lib.m_partial(seq, tokens, "ln1.0", "ln2.0", C_att[:, :48], POINTS, seqs,
                                   method="exact"), 768 / 48)]
    C_mlp, _ = basis(seq.width("unembed"), 768, 4, np.float32)
    rows.append(("MLP ln2.0->unembed", "closed form (auto)",
                 lambda: lib.m_partial(seq, tokens, "ln2.0", "unembed", C_mlp, POINTS, seqs),
                 1.0))
    for name, path, fn, scale in rows:
        t, flops = counted(fn, count=scale == 1.0)
        t *= scale
        tag = f" (x{scale:g})" if scale != 1.0 else ""
        rate = "" if flops is None else (f"{flops / 1e9:>9.2f}{flops / t / 1e9:>9.1f}"
                                         f"{flops / t / f32_rate:>8.0%}")
        print(f"{name:<30}{path + tag:<22}{t:>9.3f}{rate}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=16)
    ap.add_argument("--seqs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    f32, f64 = matmul_rate(torch.float32), matmul_rate(torch.float64)
    print(f"1. matmul 2048², {args.threads} thread(s): float32 {f32 / 1e9:.1f} GFLOP/s, "
          f"float64 {f64 / 1e9:.1f} GFLOP/s")
    modadd(args.samples)
    gpt2_shaped(args.ctx, args.seqs, f32)


if __name__ == "__main__":
    main()
