"""The fast paths (closed forms, by-parts attention) against the exact per-feature autograd
path, which stays the reference (``jacobians: exact``).

Tolerance: both paths are float64 and differ only in summation order; observed differences
are ~1e-13 relative. The tests use 1e-10 of the largest entry: a wrong term (a missing cross
term, a transposed factor, a wrong mask) is O(1) of the scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ribray.math import lib
from ribray.math.jacobian import integration_points
from ribray.math.models import MLP, Transformer, TransformerConfig
from ribray.math.sequential import SequentialModel, to_sequential

RULES = [("gradient", 0), ("trapezoidal", 3), ("gauss-legendre", 2)]
RTOL = 1e-10


def _random_params(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _transformer(act: str, n_layers: int = 2) -> tuple[SequentialModel, torch.Tensor]:
    cfg = TransformerConfig(d_vocab=11, n_ctx=4, d_model=10, n_heads=2, d_head=5, d_mlp=14,
                            n_layers=n_layers, act_fn=act)
    model = Transformer(cfg, dtype=torch.float64)
    _random_params(model, 3)
    tokens = torch.randint(0, 11, (37, 4), generator=torch.Generator().manual_seed(4))
    return to_sequential(model, last_pos_only=True), tokens


def _mlp(act: str) -> tuple[SequentialModel, torch.Tensor]:
    model = MLP([6, 9, 7, 5], act_fn=act, dtype=torch.float64)
    _random_params(model, 5)
    return to_sequential(model), torch.randn(41, 6, generator=torch.Generator().manual_seed(6),
                                            dtype=torch.float64)


def _basis(model: SequentialModel, inputs: torch.Tensor, layer: str, k: int, seed: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """A random full-column-rank C (raw, k) and its pseudo-inverse, as a basis would be."""
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((model.width(layer), k))
    return C, np.linalg.pinv(C)


def _compare(model: SequentialModel, inputs: torch.Tensor, a: str, b: str, rule: str, n: int,
             batch_size: int = 16) -> None:
    pts = integration_points(rule, n)
    k_a, k_b = max(2, model.width(a) - 2), max(2, model.width(b) - 1)
    C_a, C_a_pinv = _basis(model, inputs, a, k_a, 1)
    C_b, _ = _basis(model, inputs, b, k_b, 2)
    for fn, args in ((lib.m_partial, (a, b, C_b)), (lib.edge_partial, (a, b, C_a, C_a_pinv, C_b))):
        exact = fn(model, inputs, *args, pts, batch_size, method="exact")
        fast = fn(model, inputs, *args, pts, batch_size, method="auto")
        assert fast.count == exact.count
        scale = np.abs(exact.total).max()
        assert scale > 0
        np.testing.assert_allclose(fast.total, exact.total, rtol=0, atol=RTOL * scale,
                                   err_msg=f"{fn.__name__} {a}->{b} {rule}")


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("rule,n", RULES)
def test_elementwise_sections_match_the_exact_path(act, rule, n):
    """MLP blocks with their residual, their halves, the unembedding, and MLP layers: every
    section with at most one activation takes the closed form and equals the exact path."""
    model, tokens = _transformer(act)
    for a, b in [("ln2.0", "ln1.1"), ("ln2.1", "unembed"), ("mlp_in.0", "mlp_out.0"),
                 ("mlp_out.0", "ln1.1"), ("ln2_out.1", "output"), ("unembed", "output")]:
        assert model.section_parts(a, b) is not None, (a, b)
        _compare(model, tokens, a, b, rule, n)
    mlp, x = _mlp(act)
    for a, b in [("layers.0", "layers.1"), ("layers.1", "layers.2"), ("layers.2", "output")]:
        _compare(mlp, x, a, b, rule, n)


@pytest.mark.parametrize("rule,n", RULES)
def test_attention_by_parts_matches_the_exact_path(rule, n):
    """Block 0 keeps all positions (causal mask, a query at every position), block 1 only the
    last; identities around the attention are part of the section."""
    model, tokens = _transformer("gelu")
    for a, b in [("ln1.0", "ln2.0"), ("attn_in.0", "ln2_out.0"), ("ln1_out.1", "ln2.1")]:
        assert model.section_attention(a, b) is not None, (a, b)
        _compare(model, tokens, a, b, rule, n, batch_size=7)


def test_other_sections_take_the_exact_path(monkeypatch):
    """Two activations, attention with an MLP, or attention over the memory budget: no fast
    path, so ``auto`` is the exact path, bit for bit."""
    model, tokens = _transformer("relu")
    mlp, _ = _mlp("relu")
    assert mlp.section_parts("layers.0", "layers.2") is None
    assert model.section_parts("ln1.0", "ln2.0") is None
    assert model.section_attention("ln1.0", "ln1.1") is None
    monkeypatch.setattr(lib, "ATTENTION_BUDGET", 8)
    pts = integration_points("gradient", 0)
    C, _ = _basis(model, tokens, "ln2.0", 5, 1)
    for a, b in [("ln1.0", "ln1.1"), ("ln1.0", "ln2.0")]:
        C_b, _ = _basis(model, tokens, b, 5, 2)
        exact = lib.m_partial(model, tokens, a, b, C_b, pts, 16, method="exact")
        auto = lib.m_partial(model, tokens, a, b, C_b, pts, 16, method="auto")
        assert np.array_equal(exact.total, auto.total)


def test_a_whole_job_gives_the_same_basis_either_way(tmp_path):
    """The pipeline on the serial backend with both settings: the same eigenvalues Λ and Jacobian-
    Grams M (PCA coordinates) in every layer, to 1e-9 (M passes through one eigendecomposition
    of the Gram first, whose rounding both share)."""
    from ribray import pipeline
    from ribray.data import shard_ranges
    from ribray.shards import ComputeSettings, SerialBackend, ShardComputer

    model, tokens = _transformer("relu")
    layers = ["ln1.0", "ln2.0", "ln1.1", "ln2.1", "unembed", "output"]
    pts = integration_points("gradient", 0)
    sinks = {}
    for method in ("exact", "auto"):
        comp = ShardComputer(model, tokens, ComputeSettings(16, pts, pts, jacobians=method))
        sinks[method] = pipeline.MemorySink()
        pipeline.run(SerialBackend(comp, shard_ranges(len(tokens), 10)), layers,
                     {k: model.width(k) for k in layers},
                     pipeline.BasisSettings("lib", 1e-12, "absolute", False, True),
                     sinks[method])
    for layer in layers[:-1]:
        e, f = sinks["exact"].bases[layer], sinks["auto"].bases[layer]
        np.testing.assert_allclose(f.lambdas, e.lambdas, rtol=0, atol=1e-9 * e.lambdas.max())
        Me, Mf = e.extra["M"], f.extra["M"]
        np.testing.assert_allclose(Mf, Me, rtol=0, atol=1e-9 * np.abs(Me).max())


class _Calls:
    """A serial backend that records which passes over the data it made."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def gram(self, layers, sections=None):
        self.calls.append(("gram", tuple(sections or ())))
        return self.backend.gram(layers, sections)

    def m(self, layer, target, C_target):
        self.calls.append(("m", layer))
        return self.backend.m(layer, target, C_target)

    def edges(self, *args):
        self.calls.append(("edges", args[0]))
        return self.backend.edges(*args)


@pytest.mark.parametrize("arch,kind", [("transformer-relu", "lib"), ("transformer-gelu", "lib"),
                                       ("mlp-gelu", "lib"), ("transformer-relu", "gib")])
def test_closed_sections_take_their_sums_from_the_gram_pass(arch, kind):
    """With ``closed``, the Gram pass also takes each position-wise section's Σ g and Σ g gᵀ,
    and those layers' bases come without a pass of their own: no M pass for them, and the same
    Λ, M, C and jackknife spread as from their M passes, to 1e-12 of the largest entry (the
    same sums in float64, merged in another order: ~1e-16 apart before the eigensolver)."""
    from functools import partial

    from ribray import pipeline
    from ribray.data import shard_ranges
    from ribray.shards import ComputeSettings, SerialBackend, ShardComputer

    if arch.startswith("transformer"):
        model, inputs = _transformer(arch.split("-")[1])
        layers = ["ln1.0", "ln2.0", "ln1.1", "ln2.1", "unembed", "output"]
    else:
        model, inputs = _mlp("gelu")
        layers = model.names
    pts = integration_points("trapezoidal", 3)
    comp = ShardComputer(model, inputs, ComputeSettings(16, pts, pts))
    pairs = pipeline.m_pairs(layers, kind)
    closed = {pair: partial(lib.m_from_sums, parts, points=pts)
              for pair, parts in lib.closed_sections(model, pairs, "auto").items()}
    assert closed and len(closed) < len(pairs) or arch == "mlp-gelu"
    sinks, calls = {}, {}
    for mode in ("passes", "sums"):
        backend = _Calls(SerialBackend(comp, shard_ranges(len(inputs), 10)))
        sinks[mode] = pipeline.MemorySink()
        pipeline.run(backend, layers, {k: model.width(k) for k in layers},
                     pipeline.BasisSettings(kind, 1e-12, "absolute", False, True),
                     sinks[mode], closed=closed if mode == "sums" else None)
        calls[mode] = backend.calls
    m_layers = {c[1] for c in calls["sums"] if c[0] == "m"}
    assert m_layers == {a for a, _ in pairs} - {a for a, _ in closed}
    assert {c[1] for c in calls["passes"] if c[0] == "m"} == {a for a, _ in pairs}
    for layer in layers[:-1]:
        a, b = sinks["passes"].bases[layer], sinks["sums"].bases[layer]
        signs = np.sign(np.sum(a.C * b.C, axis=0))  # an eigenvector's sign is arbitrary
        for x, y in ((a.lambdas, b.lambdas), (a.extra["M"], b.extra["M"]), (a.C, b.C * signs)):
            np.testing.assert_allclose(y, x, rtol=0, atol=1e-12 * np.abs(x).max())
        assert (a.stability is None) == (b.stability is None)
        if a.stability is not None:
            np.testing.assert_allclose(b.stability["top_lambda_rel_se"],
                                       a.stability["top_lambda_rel_se"], rtol=1e-8)
    for key, E in sinks["passes"].edge_sets.items():
        np.testing.assert_allclose(sinks["sums"].edge_sets[key], E, rtol=0,
                                   atol=1e-12 * np.abs(E).max())


def test_a_next_layer_without_features_gives_empty_sums():
    """k_out = 0 (every Λ under the cutoff): the fast paths return the exact path's empty or
    zero sums instead of dividing by zero."""
    model, tokens = _transformer("relu")
    pts = integration_points("gradient", 0)
    for a, b in [("ln1.0", "ln2.0"), ("ln2.0", "ln1.1")]:
        C_a, C_a_pinv = _basis(model, tokens, a, 4, 1)
        empty = np.zeros((model.width(b), 0))
        for method in ("exact", "auto"):
            m = lib.m_partial(model, tokens, a, b, empty, pts, 16, method=method)
            e = lib.edge_partial(model, tokens, a, b, C_a, C_a_pinv, empty, pts, 16,
                                 method=method)
            assert m.total.shape == (model.width(a),) * 2 and not m.total.any()
            assert e.total.shape == (0, 4)


@pytest.mark.parametrize("rule,n", RULES)
@pytest.mark.parametrize("arch", ["gpt2", "gpt-neox-parallel"])
def test_layer_norm_halves_match_the_exact_path(arch, rule, n, tmp_path):
    """Both halves of every layer norm (the final one, whose "out" half drops the residual,
    and a parallel block's second, which carries the attention output) in closed form."""
    from test_lm_models import _saved

    from ribray.hf import hf_to_sequential, load_hf
    from ribray.math.lm import LnIn, LnOut

    model = hf_to_sequential(load_hf(_saved(arch, tmp_path), torch.float64))
    tokens = torch.randint(0, 61, (6, 16), generator=torch.Generator().manual_seed(5))
    pairs = [("ln1.0", "ln1_out.0"), ("ln1_out.0", "attn_in.0"), ("ln2.1", "ln2_out.1"),
             ("ln2_out.1", "mlp_in.1"), ("ln_final", "ln_final_out"),
             ("ln_final_out", "unembed")]
    for a, b in pairs:
        assert isinstance(model.section_step(a, b), (LnIn, LnOut))
        _compare(model, tokens, a, b, rule, n, batch_size=4)
