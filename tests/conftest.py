"""Shared fixtures: a real local Ray instance, small real models saved to disk, job files.

Reference checkpoints are read from ../shared/reference-models when present; tests that need
them skip cleanly where it is absent (a user's fresh clone has none).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "reference-models"
SHIPPED_MODADD = ROOT / "checkpoints" / "modadd-p113.pt"


def reference(name: str) -> Path:
    """Path of a reference checkpoint folder, or skip the test if ../shared is absent."""
    p = SHARED / name
    if not p.is_dir():
        pytest.skip(f"reference checkpoints not available ({p})")
    return p


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread in the test process: the tests' tensors are tiny, and on a 2-core
    machine shared with Ray workers more threads only contend (small autograd calls were ~20x
    slower with the default thread count under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with 3 logical CPUs; token auth stays on (random token)."""
    import ray

    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    if not ray.is_initialized():
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_transformer_ckpt(tmp_path_factory) -> Path:
    """A random 1-block transformer (non-zero biases) saved as a ribray checkpoint."""
    from ribray.checkpoints import save_transformer
    from ribray.math.models import Transformer, TransformerConfig

    gen = torch.Generator().manual_seed(7)
    model = Transformer(TransformerConfig(d_vocab=14, n_ctx=3, d_model=12, n_heads=2, d_head=6,
                                          d_mlp=24))
    model.init_weights(gen)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("ckpt") / "small-modadd.pt"
    save_transformer(path, model, {"note": "random weights for tests"})
    return path


def write_job(path: Path, **overrides) -> Path:
    """A modular-addition job on p = 13 (vocab 14), merged with ``overrides`` (dotted keys)."""
    job = {
        "name": "test",
        "model": {"path": "MISSING", "format": "ribray", "dtype": "float64"},
        "data": {"kind": "modular-addition", "modulus": 13, "frac_train": 0.5, "seed": 0,
                 "split": "train"},
        "basis": {"kind": "lib", "node_layers": ["ln1.0", "ln2.0", "unembed", "output"],
                  "truncation_threshold": 1e-12},
        "edges": {"enabled": True},
        "ray": {"shard_size": 16, "batch_size": 8, "num_workers": 1},
        "out": str(path.parent / "store.zarr"),
    }
    for key, value in overrides.items():
        node = job
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="session")
def fitted_ckpt(small_transformer_ckpt, tmp_path_factory) -> Path:
    """The small random transformer fitted (300 Adam steps, ~1 s) to all p = 13 pairs, so
    the ablation searches keep a non-trivial graph (a random model is at chance, and every
    edge could be ablated)."""
    from ribray.checkpoints import load_model, save_transformer
    from ribray.data import modular_addition

    torch.manual_seed(0)
    model, _ = load_model(small_transformer_ckpt, "ribray", torch.float32)
    data = modular_addition(13, 0.5, 0, "all")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        logits = model(data.inputs, last_pos_only=True)[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, data.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("fitted") / "fitted-modadd.pt"
    save_transformer(path, model, {"note": "fitted for tests"})
    return path


def analysed_store(kind: str, ckpt: Path, root: Path) -> Path:
    """A complete store of ``ckpt`` (basis ``kind``, all p = 13 pairs) with its analysis."""
    from ribray.analyze import run_analysis
    from ribray.config import AnalysisSpec, load_job
    from ribray.orchestrate import run_job

    job = load_job(write_job(root / "job.yaml", **{
        "name": f"test-{kind}", "model.path": str(ckpt), "basis.kind": kind,
        "data.split": "all"}))
    store = root / "store.zarr"
    run_job(job, store, dashboard=False, log=lambda s: None)
    spec = AnalysisSpec(data={"split": "all"}, ray={"num_workers": 1})  # tiny evaluations
    run_analysis(store, spec, dashboard=False, log=lambda s: None)
    return store


@pytest.fixture(scope="session")
def analysed_lib_store(ray_local, fitted_ckpt, tmp_path_factory) -> Path:
    """A complete, analysed LIB store (layers ln1.0, ln2.0, unembed, output); read only."""
    return analysed_store("lib", fitted_ckpt, tmp_path_factory.mktemp("lib"))


@pytest.fixture(scope="session")
def analysed_pca_store(ray_local, fitted_ckpt, tmp_path_factory) -> Path:
    """The same model and job with basis.kind: pca, analysed; read only."""
    return analysed_store("pca", fitted_ckpt, tmp_path_factory.mktemp("pca"))
