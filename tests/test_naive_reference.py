"""ribray's fast Jacobian statistics against a deliberately naive float64 re-implementation.

ribray computes integrated Jacobians one output row at a time for a whole batch of samples,
then contracts them with einsum/matmul (:mod:`ribray.math.jacobian`,
:mod:`ribray.math.lib`). The reference here loops over samples, integration points, output
positions and output features, takes one ``torch.autograd.grad`` per scalar output, and builds the
sums with explicit Python loops and ``np.outer``, written straight from the definitions:

* integrated Jacobian ``g[b, t, i] = Σ_α w_α ∂F_{b,t,i}/∂x_b`` at ``α·x_b`` (constant included);
* ``M_raw = 1/(N·T_in) Σ_{b,t,i,s} g[b,t,i][s,:] ⊗ g[b,t,i][s,:]``;
* ``E[i, j] = 1/(N·T_in) Σ_{b,t} (Σ_s f_hat[b,s,j] · h[b,t,i][s,j])²`` with ``h`` the integrated
  Jacobian of ``G(z) = run(z @ C_in_pinv) @ C_out`` with respect to the features ``z``.

Tolerance: everything is float64, and both sides do the same few matmuls in a different order,
so they agree to round-off (~1e-15 relative). We require ``max|ribray - naive| / max|naive| <=
1e-10``: five orders of magnitude of margin for accumulation order, yet any real error (a wrong
index, a transposed matrix, a wrong weight or normalisation) changes the result at O(1) relative
and fails by many orders of magnitude.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ribray import pipeline
from ribray.math.basis import Basis
from ribray.math.jacobian import Point, integration_points
from ribray.math.lib import edge_partial, m_partial
from ribray.math.models import MLP, Transformer, TransformerConfig
from ribray.math.sequential import SequentialModel, to_sequential
from ribray.shards import ComputeSettings, SerialBackend, ShardComputer

# See the module docstring: float64 round-off is ~1e-15; real errors are O(1).
RTOL = 1e-10

RULES = [("gradient", 0), ("trapezoidal", 3), ("gauss-legendre", 2)]
RULE_IDS = [f"{r}-{n}" for r, n in RULES]

# Batch sizes for ribray: one that splits the samples into uneven pieces, one that does
# everything at once.
RIBRAY_BATCHES = [4, 256]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = float(np.max(np.abs(want)))
    assert scale > 0, "reference is identically zero: the test would be vacuous"
    return float(np.max(np.abs(got - want))) / scale


# ---------------------------------------------------------------------------------------------
# Integration rules
# ---------------------------------------------------------------------------------------------


def expected_points(rule: str, n: int) -> list[tuple[float, float]]:
    """Hand-written (alpha, weight) lists, sorted by alpha."""
    if rule == "gradient":
        return [(1.0, 1.0)]
    if rule == "trapezoidal":
        if n == 0:
            return [(0.5, 1.0)]
        eps = 1e-3 / (n + 1)
        h = (1 - 2 * eps) / n
        pts = []
        for k in range(n + 1):
            w = 1.0 / n
            if k in (0, n):
                w /= 2
            pts.append((eps + k * h, w))
        return pts
    if rule == "gauss-legendre":
        # Legendre nodes/weights on [-1, 1], written out, mapped to [0, 1] (weights halved).
        table = {
            0: [(0.0, 2.0)],
            1: [(-1 / math.sqrt(3), 1.0), (1 / math.sqrt(3), 1.0)],
            2: [(-math.sqrt(3 / 5), 5 / 9), (0.0, 8 / 9), (math.sqrt(3 / 5), 5 / 9)],
        }
        return [((x + 1) / 2, w / 2) for x, w in table[n]]
    raise AssertionError(rule)


@pytest.mark.parametrize("rule,n", [("gradient", 0), ("trapezoidal", 0),
                                    ("trapezoidal", 1), ("trapezoidal", 3),
                                    ("trapezoidal", 10), ("gauss-legendre", 0),
                                    ("gauss-legendre", 1), ("gauss-legendre", 2)])
def test_integration_points_match_hand_written(rule, n):
    """Points and weights against values written out here (gradient takes no n)."""
    got = sorted((p.alpha, p.weight) for p in integration_points(rule, n))
    want = expected_points(rule, n)
    assert len(got) == len(want)
    for (a, w), (ea, ew) in zip(got, want, strict=True):
        assert a == pytest.approx(ea, abs=1e-14)
        assert w == pytest.approx(ew, abs=1e-14)
    assert all(isinstance(p, Point) for p in integration_points(rule, n))
    assert sum(w for _, w in got) == pytest.approx(1.0, abs=1e-14)


def test_integration_points_trapezoidal_ends():
    n = 4
    pts = integration_points("trapezoidal", n)
    eps = 1e-3 / (n + 1)
    assert pts[0].alpha == pytest.approx(eps, abs=1e-16)
    assert pts[-1].alpha == pytest.approx(1 - eps, abs=1e-16)
    assert [p.weight for p in pts] == pytest.approx([1 / 8, 1 / 4, 1 / 4, 1 / 4, 1 / 8])


def test_integration_points_unknown_rule():
    with pytest.raises(ValueError):
        integration_points("simpson", 3)


def quad(points: list[Point], coeffs: np.ndarray) -> float:
    """Σ_α w_α p(α) for the polynomial with ``coeffs`` (lowest degree first)."""
    return float(sum(p.weight * np.polynomial.polynomial.polyval(p.alpha, coeffs)
                     for p in points))


def exact(coeffs: np.ndarray) -> float:
    """∫_0^1 of the polynomial with ``coeffs`` (lowest degree first)."""
    return float(sum(c / (k + 1) for k, c in enumerate(coeffs)))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 6])
def test_gauss_legendre_exact_to_degree_2n_plus_1(n):
    rng = np.random.default_rng(n)
    pts = integration_points("gauss-legendre", n)
    assert len(pts) == n + 1
    for _ in range(5):
        coeffs = rng.standard_normal(2 * n + 2)  # degree 2n + 1
        assert quad(pts, coeffs) == pytest.approx(exact(coeffs), abs=1e-12)
    # ...and not beyond: α^(2n+2) is integrated with an error far above round-off (the error
    # shrinks fast with n: ~6e-9 at n = 6).
    mono = np.zeros(2 * n + 3)
    mono[-1] = 1.0
    assert abs(quad(pts, mono) - exact(mono)) > 1e-11


@pytest.mark.parametrize("n", [0, 1, 3, 8])
def test_trapezoidal_exact_for_linear(n):
    # Symmetric points with weights summing to 1: exact for a + b·α on [0, 1].
    pts = integration_points("trapezoidal", n)
    for coeffs in ([1.0, 0.0], [0.3, -2.0], [-1.5, 4.0]):
        assert quad(pts, np.array(coeffs)) == pytest.approx(exact(np.array(coeffs)), abs=1e-13)


def test_trapezoidal_converges_quadratically():
    # ∫_0^1 p for a smooth p: error O(1/n²) (plus O(ε) from the shortened interval, ε ~ 1e-3/n).
    coeffs = np.array([0.5, -1.0, 3.0, 2.0, -1.0])
    errs = []
    for n in (4, 8, 16, 32):
        err = abs(quad(integration_points("trapezoidal", n), coeffs) - exact(coeffs))
        assert err < 2.0 / n**2
        errs.append(err)
    assert errs[-1] < errs[0] / 20


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

DT = torch.float64


def random_biases(model: torch.nn.Module, gen: torch.Generator, prefix: str) -> None:
    """Overwrite every bias (leaf name starting with ``prefix``) with non-zero random values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith(prefix):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                assert bool((p != 0).all())


def make_transformer() -> Transformer:
    gen = torch.Generator().manual_seed(1234)
    model = Transformer(TransformerConfig(d_vocab=11, n_ctx=3, d_model=8, n_heads=2, d_head=4,
                                          d_mlp=16, n_layers=1), dtype=DT)
    model.init_weights(gen)
    random_biases(model, gen, "b_")
    return model


def transformer_tokens(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 10, (n, 3), generator=gen)
    tokens[:, -1] = 10
    return tokens


def make_mlp(act_fn: str) -> MLP:
    gen = torch.Generator().manual_seed(99)
    model = MLP([5, 7, 6, 3], act_fn=act_fn, dtype=DT)
    model.init_weights(gen)
    random_biases(model, gen, "b")
    return model


def mlp_inputs() -> torch.Tensor:
    return torch.randn(9, 5, generator=torch.Generator().manual_seed(5), dtype=DT)


def seq_transformer(last_pos_only: bool) -> tuple[SequentialModel, torch.Tensor]:
    return to_sequential(make_transformer(), last_pos_only=last_pos_only), transformer_tokens(6, 3)


def seq_mlp(act_fn: str) -> tuple[SequentialModel, torch.Tensor]:
    return to_sequential(make_mlp(act_fn)), mlp_inputs()


MODELS = {
    "transformer-last": lambda: seq_transformer(True),
    "transformer-all": lambda: seq_transformer(False),
    "mlp-gelu": lambda: seq_mlp("gelu"),
    "mlp-relu": lambda: seq_mlp("relu"),
}

SECTIONS = [
    (m, a, b)
    for m in ("transformer-last", "transformer-all")
    for a, b in [("ln1.0", "ln2.0"), ("ln2.0", "unembed"), ("unembed", "output"),
                 ("ln1.0", "output")]
] + [
    (m, a, b)
    for m in ("mlp-gelu", "mlp-relu")
    for a, b in [("layers.0", "layers.1"), ("layers.1", "output"), ("layers.2", "output")]
]
SECTION_IDS = [f"{m}:{a}->{b}" for m, a, b in SECTIONS]


def test_sequential_forms_reproduce_the_models():
    """The naive reference runs the sequential form; check it is the model it claims to be."""
    model, tokens = make_transformer(), transformer_tokens(6, 3)
    for last in (True, False):
        seq = to_sequential(model, last_pos_only=last)
        with torch.no_grad():
            got, want = seq(tokens), model(tokens, last_pos_only=last)
        assert rel_err(got.numpy(), want.numpy()) < RTOL
    for act in ("gelu", "relu"):
        mlp, x = make_mlp(act), mlp_inputs()
        with torch.no_grad():
            got, want = to_sequential(mlp)(x), mlp(x).unsqueeze(1)
        assert rel_err(got.numpy(), want.numpy()) < RTOL


# ---------------------------------------------------------------------------------------------
# Naive reference
# ---------------------------------------------------------------------------------------------


def naive_activations(model: SequentialModel, inputs: torch.Tensor, layer: str) -> torch.Tensor:
    """Activations at ``layer``, by running the steps from the embedding (not .activations)."""
    with torch.no_grad():
        return model.run(model.embed(inputs), model.names[0], layer)


def naive_integrated_grads(fn, x_b: torch.Tensor, points: list[Point]) -> np.ndarray:
    """For one sample ``x_b`` (T_in, d): array g[t, i, s, j] = Σ_α w_α ∂fn_{t,i}/∂x_{s,j} at α·x_b.

    ``fn`` maps (1, T_in, d) to (1, T_out, k). One autograd.grad call per scalar output.
    """
    g = None
    for alpha, w in points:
        z = (alpha * x_b.detach().clone()).unsqueeze(0).requires_grad_(True)
        out = fn(z)
        assert out.shape[0] == 1
        _, t_out, k = out.shape
        if g is None:
            g = np.zeros((t_out, k) + tuple(x_b.shape))
        for t in range(t_out):
            for i in range(k):
                (grad,) = torch.autograd.grad(out[0, t, i], z, retain_graph=True)
                g[t, i] += w * grad[0].numpy()
    assert g is not None
    return g


def naive_m(model: SequentialModel, inputs: torch.Tensor, layer: str, target: str,
            C_target: np.ndarray, points: list[Point]) -> tuple[np.ndarray, int]:
    x = naive_activations(model, inputs, layer)
    N, T_in, d = x.shape
    C = torch.tensor(C_target, dtype=DT)

    def F(z):
        return model.run(z, layer, target) @ C

    M = np.zeros((d, d))
    for b in range(N):
        g = naive_integrated_grads(F, x[b], points)
        for t in range(g.shape[0]):
            for i in range(g.shape[1]):
                for s in range(T_in):
                    M += np.outer(g[t, i, s, :], g[t, i, s, :])
    return M / (N * T_in), N * T_in


def naive_edges(model: SequentialModel, inputs: torch.Tensor, layer: str, nxt: str,
                C_in: np.ndarray, C_in_pinv: np.ndarray, C_out: np.ndarray,
                points: list[Point]) -> tuple[np.ndarray, int]:
    x = naive_activations(model, inputs, layer).numpy()
    N, T_in, _ = x.shape
    f_hat = x @ C_in  # (N, T_in, k_in)
    k_in, k_out = C_in.shape[1], C_out.shape[1]
    Cip, Co = torch.tensor(C_in_pinv, dtype=DT), torch.tensor(C_out, dtype=DT)

    def G(z):
        return model.run(z @ Cip, layer, nxt) @ Co

    E = np.zeros((k_out, k_in))
    for b in range(N):
        h = naive_integrated_grads(G, torch.tensor(f_hat[b]), points)
        assert h.shape[1] == k_out
        for t in range(h.shape[0]):
            for i in range(k_out):
                for j in range(k_in):
                    a = 0.0
                    for s in range(T_in):
                        a += f_hat[b, s, j] * h[t, i, s, j]
                    E[i, j] += a * a
    return E / (N * T_in), N * T_in


def random_matrix(rows: int, cols: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols))


# ---------------------------------------------------------------------------------------------
# ribray vs naive: M and edges on every section and rule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule,n", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("model_name,layer,target", SECTIONS, ids=SECTION_IDS)
def test_m_partial_matches_naive(model_name, layer, target, rule, n):
    model, inputs = MODELS[model_name]()
    points = integration_points(rule, n)
    d_t = model.width(target)
    C_target = random_matrix(d_t, d_t - 1, seed=11)
    want, count = naive_m(model, inputs, layer, target, C_target, points)
    assert want.shape == (model.width(layer),) * 2
    for batch_size in RIBRAY_BATCHES:
        s = m_partial(model, inputs, layer, target, C_target, points, batch_size)
        assert s.count == count
        err = rel_err(s.total / s.count, want)
        assert err < RTOL, f"M {model_name} {layer}->{target} {rule}: rel err {err:.3e}"


@pytest.mark.parametrize("rule,n", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("model_name,layer,nxt", SECTIONS, ids=SECTION_IDS)
def test_edge_partial_matches_naive(model_name, layer, nxt, rule, n):
    model, inputs = MODELS[model_name]()
    points = integration_points(rule, n)
    d_in, d_out = model.width(layer), model.width(nxt)
    C_in = random_matrix(d_in, d_in - 2, seed=21)
    C_in_pinv = np.linalg.pinv(C_in)
    C_out = random_matrix(d_out, d_out - 1, seed=31)
    want, count = naive_edges(model, inputs, layer, nxt, C_in, C_in_pinv, C_out, points)
    assert want.shape == (d_out - 1, d_in - 2)
    for batch_size in RIBRAY_BATCHES:
        s = edge_partial(model, inputs, layer, nxt, C_in, C_in_pinv, C_out, points, batch_size)
        assert s.count == count
        err = rel_err(s.total / s.count, want)
        assert err < RTOL, f"E {model_name} {layer}->{nxt} {rule}: rel err {err:.3e}"


def test_naive_reference_is_sensitive():
    """The comparison would notice a transposed C, and a change of integration rule."""
    model, inputs = MODELS["transformer-all"]()
    points = integration_points("gauss-legendre", 2)
    C = random_matrix(9, 9, seed=11)
    want, _ = naive_m(model, inputs, "ln1.0", "ln2.0", C, points)
    wrong, _ = naive_m(model, inputs, "ln1.0", "ln2.0", C.T, points)
    assert rel_err(wrong, want) > 1e-3
    s = m_partial(model, inputs, "ln1.0", "ln2.0", C, integration_points("gradient", 0), 4)
    assert rel_err(s.total / s.count, want) > 1e-3


# ---------------------------------------------------------------------------------------------
# End to end: pipeline.run with a SerialBackend
# ---------------------------------------------------------------------------------------------


class RecordingSink:
    def __init__(self):
        self.grams: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
        self.bases: dict[str, Basis] = {}
        self.edges_: dict[tuple[str, str], np.ndarray] = {}

    def gram(self, layer, mean, gram, count):
        self.grams[layer] = (np.array(mean), np.array(gram), count)

    def basis(self, layer, b):
        self.bases[layer] = b

    def edges(self, layer, next_layer, E, attrs):
        self.edges_[(layer, next_layer)] = np.array(E)


PIPE_LAYERS = ["ln1.0", "ln2.0", "unembed", "output"]


@pytest.fixture(scope="module", params=["lib", "gib"])
def pipeline_result(request):
    model = to_sequential(make_transformer(), last_pos_only=True)
    inputs = transformer_tokens(16, 8)
    settings = ComputeSettings(batch_size=4,
                               basis_points=integration_points("gauss-legendre", 2),
                               edge_points=integration_points("trapezoidal", 3))
    backend = SerialBackend(ShardComputer(model, inputs, settings), [(0, 5), (5, 11), (11, 16)])
    sink = RecordingSink()
    pipeline.run(backend, PIPE_LAYERS, {n: model.width(n) for n in PIPE_LAYERS},
                 pipeline.BasisSettings(kind=request.param, threshold=1e-12,
                                        threshold_mode="absolute", rotate_final=False,
                                        compute_edges=True),
                 sink)
    return request.param, model, inputs, settings, sink


def test_pipeline_feature_properties(pipeline_result):
    _, model, inputs, _, sink = pipeline_result
    assert set(sink.bases) == set(PIPE_LAYERS)
    for layer in PIPE_LAYERS[:-1]:
        b = sink.bases[layer]
        f = model.activations(inputs, [layer])[layer]
        rows = f.reshape(-1, f.shape[-1]).numpy()
        f_hat = rows @ b.C
        k = b.n_features
        assert b.C.shape == (model.width(layer), k) and b.C_pinv.shape == (k, model.width(layer))
        scale = float(np.max(np.abs(b.lambdas)))
        # (1) second moment over samples and positions is diag(Λ)
        second = f_hat.T @ f_hat / rows.shape[0]
        assert rel_err(second, np.diag(b.lambdas)) < 1e-8, layer
        # (2) feature 0 is the constant sqrt(Λ_0); the others have mean zero
        assert b.const_feature == 0
        np.testing.assert_allclose(f_hat[:, 0], math.sqrt(b.lambdas[0]), rtol=1e-9)
        assert np.max(np.abs(f_hat[:, 1:].mean(axis=0))) < 1e-9 * math.sqrt(scale), layer
        # (3) C_pinv is a left inverse of C on the kept features
        np.testing.assert_allclose(b.C_pinv @ b.C, np.eye(k), atol=1e-8)
        # the recorded statistics are those of the same rows
        mean, _, count = sink.grams[layer]
        assert count == rows.shape[0]
        np.testing.assert_allclose(mean, rows.mean(axis=0), atol=1e-12)


def test_pipeline_bases_diagonalise_naive_m(pipeline_result):
    """With the naive M_raw of each layer (target: next layer for LIB, final for GIB),
    sqrt(Λ) C_pinv M_raw C_pinvᵀ sqrt(Λ) = Vᵀ M V has Λ_0 at [0, 0] and diag(Λ') on the
    non-constant block (the constant direction is kept in place, so row/column 0 is free)."""
    kind, model, inputs, settings, sink = pipeline_result
    for i, layer in enumerate(PIPE_LAYERS[:-1]):
        target = PIPE_LAYERS[i + 1] if kind == "lib" else PIPE_LAYERS[-1]
        M_raw, _ = naive_m(model, inputs, layer, target, sink.bases[target].C,
                           settings.basis_points)
        b = sink.bases[layer]
        sq = np.sqrt(b.lambdas)
        Y = sq[:, None] * (b.C_pinv @ M_raw @ b.C_pinv.T) * sq[None, :]
        scale = float(np.max(b.lambdas))
        assert abs(Y[0, 0] - b.lambdas[0]) < 1e-8 * scale, layer
        assert np.max(np.abs(Y[1:, 1:] - np.diag(b.lambdas[1:]))) < 1e-8 * scale, layer


def test_pipeline_edges_match_naive(pipeline_result):
    _, model, inputs, settings, sink = pipeline_result
    assert set(sink.edges_) == set(zip(PIPE_LAYERS[:-1], PIPE_LAYERS[1:], strict=True))
    for layer, nxt in zip(PIPE_LAYERS[:-1], PIPE_LAYERS[1:], strict=True):
        b_in, b_out = sink.bases[layer], sink.bases[nxt]
        want, _ = naive_edges(model, inputs, layer, nxt, b_in.C, b_in.C_pinv, b_out.C,
                              settings.edge_points)
        err = rel_err(sink.edges_[(layer, nxt)], want)
        assert err < RTOL, f"pipeline edges {layer}->{nxt}: rel err {err:.3e}"
