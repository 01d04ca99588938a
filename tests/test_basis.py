"""Properties of the bases and edges that would catch a wrong number (serial backend, float64).

Tolerances: eigen-decompositions and a few matmuls in float64 on O(1)-O(100) data are accurate to
~1e-13 relative; the checks use 1e-9 (or 1e-8 on second moments summed over many rows), far
below any real error (a wrong normalisation is O(1), a leaked block is O(1) of the scale).
"""

from __future__ import annotations

import numpy as np
import torch

from ribray import pipeline
from ribray.data import modular_addition, shard_ranges
from ribray.math import basis as bases
from ribray.math.jacobian import integration_points
from ribray.math.models import MLP, Transformer, TransformerConfig
from ribray.math.sequential import SequentialModel, to_sequential
from ribray.shards import ComputeSettings, SerialBackend, ShardComputer


def run_serial(model: SequentialModel, inputs: torch.Tensor, layers: list[str], kind: str,
               threshold: float = 1e-12, mode: str = "absolute", rotate_final: bool = False,
               shard_size: int = 40) -> pipeline.MemorySink:
    pts = integration_points("gradient", 0)
    comp = ShardComputer(model, inputs, ComputeSettings(16, pts, pts))
    sink = pipeline.MemorySink()
    pipeline.run(SerialBackend(comp, shard_ranges(len(inputs), shard_size)), layers,
                 {n: model.width(n) for n in layers},
                 pipeline.BasisSettings(kind, threshold, mode, rotate_final, True), sink)
    return sink


def acts(model: SequentialModel, inputs: torch.Tensor, layer: str) -> np.ndarray:
    with torch.no_grad():
        a = model.activations(inputs, [layer])[layer]
    return a.reshape(-1, a.shape[-1]).numpy()


def small_modadd() -> tuple[SequentialModel, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    m = Transformer(TransformerConfig(d_vocab=14, n_ctx=3, d_model=12, n_heads=2, d_head=6,
                                      d_mlp=24), dtype=torch.float64)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return to_sequential(m, last_pos_only=True), modular_addition(13, 0.6, 0, "train").inputs


LAYERS = ["ln1.0", "ln2.0", "unembed", "output"]


def test_pca_basis_is_plain_pca():
    model, x = small_modadd()
    sink = run_serial(model, x, LAYERS, "pca")
    for layer in LAYERS[:-1]:
        f = acts(model, x, layer)
        b = sink.bases[layer]
        cov = np.cov(f[:, :-1].T, bias=True)
        vals, vecs = np.linalg.eigh(cov)
        order = np.argsort(-vals)
        vals, vecs = vals[order], vecs[:, order]
        k = b.n_features - 1
        assert b.const_feature == 0 and b.lambdas[0] == 1.0
        np.testing.assert_allclose(b.lambdas[1:], vals[:k], rtol=1e-9)
        assert np.all(vals[k:] <= 1e-12)  # only directions at the threshold were dropped
        f_hat = f @ b.C
        np.testing.assert_allclose(f_hat[:, 0], 1.0, rtol=0, atol=1e-12)
        expect = (f[:, :-1] - f[:, :-1].mean(0)) @ vecs[:, :k]
        signs = np.sign(np.sum(f_hat[:, 1:] * expect, axis=0))
        np.testing.assert_allclose(f_hat[:, 1:], expect * signs, atol=1e-9 * np.abs(expect).max())


def test_lib_features_second_moments_and_constant_carries_the_mean():
    model, x = small_modadd()
    sink = run_serial(model, x, LAYERS, "lib")
    for layer in LAYERS[:-1]:
        f = acts(model, x, layer)
        b = sink.bases[layer]
        f_hat = f @ b.C
        second = f_hat.T @ f_hat / f_hat.shape[0]
        scale = b.lambdas.max()
        np.testing.assert_allclose(second, np.diag(b.lambdas), rtol=0, atol=1e-9 * scale)
        assert np.all(np.diff(b.lambdas[1:]) <= 0)  # sorted descending after the constant
        np.testing.assert_allclose(f_hat[:, 0], np.sqrt(b.lambdas[0]), rtol=1e-10)
        np.testing.assert_allclose(f_hat[:, 1:].mean(0), 0.0, atol=1e-9 * np.sqrt(scale))
        mean = sink.grams[layer][0]
        np.testing.assert_allclose(f_hat[0, 0] * b.C_pinv[0], mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b.C_pinv @ b.C, np.eye(b.n_features), atol=1e-9)


def test_gib_last_two_layers_equal_lib():
    model, x = small_modadd()
    lib = run_serial(model, x, LAYERS, "lib")
    gib = run_serial(model, x, LAYERS, "gib")
    for layer in ("unembed", "output"):
        np.testing.assert_allclose(gib.bases[layer].C, lib.bases[layer].C, rtol=1e-12, atol=0)
        np.testing.assert_allclose(gib.bases[layer].lambdas, lib.bases[layer].lambdas,
                                   rtol=1e-12)
    # and further back they differ: GIB looks through to the output, LIB only one section
    assert not np.allclose(gib.bases["ln1.0"].lambdas[:3], lib.bases["ln1.0"].lambdas[:3])


def test_block_diagonal_linear_mlp_gives_block_diagonal_edges():
    """Two independent 3-wide linear networks side by side: every LIB feature lives in one
    block and no edge crosses between blocks (the constant feature links only to itself)."""
    gen = torch.Generator().manual_seed(3)
    sizes = [6, 6, 6, 6]
    model = MLP(sizes, act_fn="linear", dtype=torch.float64)
    with torch.no_grad():
        for layer in model.layers:
            W = torch.zeros(6, 6, dtype=torch.float64)
            W[:3, :3] = torch.randn(3, 3, generator=gen, dtype=torch.float64)
            W[3:, 3:] = torch.randn(3, 3, generator=gen, dtype=torch.float64)
            layer.W.copy_(W)
            layer.b.copy_(torch.randn(6, generator=gen, dtype=torch.float64))
    x = torch.randn(200, 6, generator=gen, dtype=torch.float64) * torch.tensor(
        [1.0, 2.0, 0.5, 3.0, 1.5, 0.7], dtype=torch.float64)
    # make the blocks exactly uncorrelated over the sample (independent only in expectation
    # otherwise, and PCA would then legitimately mix them)
    xc = x - x.mean(0)
    q, _ = torch.linalg.qr(xc[:, :3])
    x[:, 3:] = x[:, 3:] - q @ (q.T @ xc[:, 3:])
    seq = to_sequential(model)
    layers = ["layers.0", "layers.1", "layers.2", "output"]
    sink = run_serial(seq, x, layers, "lib")

    def block_of(b: bases.Basis) -> list[int]:
        out = []
        for j in range(b.n_features):
            if j == b.const_feature:
                out.append(-1)
                continue
            col = b.C_pinv[j, :6]  # the raw directions the feature writes to
            n0, n1 = np.abs(col[:3]).max(), np.abs(col[3:]).max()
            assert min(n0, n1) < 1e-9 * max(n0, n1), "a feature mixes the two blocks"
            out.append(0 if n0 > n1 else 1)
        return out

    blocks = {n: block_of(sink.bases[n]) for n in layers}
    for a, b in zip(layers[:-1], layers[1:]):
        E = sink.edge_sets[(a, b)]
        scale = E.max()
        for i, bi in enumerate(blocks[b]):
            for j, bj in enumerate(blocks[a]):
                # the constant feature feeds the constant feature, and the uncentred logits
                # (`output` has no constant feature to carry their mean)
                allowed = bi == bj or (bj == -1 and b == "output")
                if not allowed:
                    assert E[i, j] < 1e-10 * scale, (a, b, i, j, E[i, j])
        assert E[np.ix_([k for k, v in enumerate(blocks[b]) if v >= 0],
                        [k for k, v in enumerate(blocks[a]) if v >= 0])].max() > 1e-3 * scale


def test_relative_threshold_scales_with_the_data():
    """A relative threshold keeps the same features when the activations are rescaled; an
    absolute one is not scale-invariant (why both are offered)."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 5)) * np.array([1.0, 1e-2, 1e-4, 1e-6, 1e-8])
    for scale in (1.0, 1e6):
        cov = np.cov((z * scale).T, bias=True)
        cov_c = np.zeros((6, 6))
        cov_c[:5, :5] = cov
        rel = bases.pca(cov_c, np.zeros(6), 5, 1e-13, "relative")
        assert rel.D.shape[0] == 1 + 4  # 1e-16 relative variance dropped at both scales
    absolute = [bases.pca(np.pad(np.cov((z * s).T, bias=True), ((0, 1), (0, 1))), np.zeros(6), 5,
                          1e-10, "absolute").D.shape[0] for s in (1.0, 1e6)]
    assert absolute[0] != absolute[1]


def test_integration_rules_agree_on_a_linear_section():
    """For a linear section the integrand does not depend on α, so every rule gives the same
    M and edges as the gradient rule."""
    gen = torch.Generator().manual_seed(1)
    model = MLP([4, 5, 3], act_fn="linear", dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    seq = to_sequential(model)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    results = {}
    for rule, n in [("gradient", 0), ("trapezoidal", 4), ("gauss-legendre", 3)]:
        pts = integration_points(rule, n)
        comp = ShardComputer(seq, x, ComputeSettings(8, pts, pts))
        sink = pipeline.MemorySink()
        layers = ["layers.0", "layers.1", "output"]
        pipeline.run(SerialBackend(comp, [(0, 30)]), layers, {k: seq.width(k) for k in layers},
                     pipeline.BasisSettings("lib", 1e-12, "absolute", False, True), sink)
        results[rule] = sink
    for rule in ("trapezoidal", "gauss-legendre"):
        for key, E in results["gradient"].edge_sets.items():
            np.testing.assert_allclose(results[rule].edge_sets[key], E, rtol=1e-10,
                                       atol=1e-12 * E.max())


def test_neuron_basis_is_raw_coordinates_constant_first():
    model, x = small_modadd()
    sink = run_serial(model, x, LAYERS, "neuron")
    b = sink.bases["ln2.0"]
    w = model.width("ln2.0")
    assert b.C.shape == (w, w) and b.C[w - 1, 0] == 1.0
    f = acts(model, x, "ln2.0")
    np.testing.assert_allclose(b.lambdas[1:], f[:, :-1].var(0), rtol=1e-9)


def test_rotate_final_layer():
    """`rotate_final`: `output` (no constant) is rotated onto its covariance eigenvectors; a
    final layer with a constant gets the PCA basis, constant first."""
    model, x = small_modadd()
    out = run_serial(model, x, LAYERS, "lib", rotate_final=True).bases["output"]
    f = acts(model, x, "output")
    vals = np.sort(np.linalg.eigvalsh(np.cov(f.T, bias=True)))[::-1]
    np.testing.assert_allclose(out.lambdas, vals, rtol=1e-9, atol=1e-12 * vals[0])
    np.testing.assert_allclose(out.C.T @ out.C, np.eye(out.n_features), atol=1e-12)
    assert out.const_feature is None
    short = run_serial(model, x, LAYERS[:-1], "lib", rotate_final=True).bases["unembed"]
    pca = bases.pca(np.cov(acts(model, x, "unembed").T, bias=True),
                    acts(model, x, "unembed").mean(0), model.width("unembed") - 1, 1e-12,
                    "absolute")
    np.testing.assert_allclose(short.lambdas, pca.D, rtol=1e-9)
    assert short.const_feature == 0


def test_float32_model_agrees_with_float64():
    """A float32 model (float64 accumulation) gives the same large Λ and kept dimensions as
    float64 to float32 precision: relative 1e-4 on Λ above 1e-3 of the largest."""
    model, x = small_modadd()
    ref = run_serial(model, x, LAYERS, "lib", threshold=1e-6, mode="relative")
    f32 = run_serial(model.to(torch.float32), x, LAYERS, "lib", threshold=1e-6,
                     mode="relative")
    for layer in LAYERS[:-1]:
        a, b = ref.bases[layer].lambdas, f32.bases[layer].lambdas
        big = a > 1e-3 * a.max()
        np.testing.assert_allclose(b[: len(a)][big], a[big], rtol=1e-4)


def test_edges_into_a_layer_without_features():
    """A next layer that kept no feature (every Λ under the cutoff) gives an empty edge
    matrix, not a crash."""
    from ribray.math.lib import edge_partial

    model, x = small_modadd()
    w_in, w_out = model.width("ln2.0"), model.width("unembed")
    C_in = np.eye(w_in)[:, :5]
    s = edge_partial(model, x[:7], "ln2.0", "unembed", C_in, C_in.T, np.zeros((w_out, 0)),
                     integration_points("gradient", 0), 4)
    assert s.total.shape == (0, 5) and s.count == 7
