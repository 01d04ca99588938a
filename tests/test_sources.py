"""Stochastic sources over output positions (paper appendix C): exact where they change
nothing, converging to the exact sums as R grows, and independent of sharding."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from ribray import pipeline
from ribray.math import basis as bases
from ribray.math import jacobian as jac
from ribray.math import lib, stability
from ribray.math.jacobian import integration_points
from ribray.math.lib import Sources
from ribray.math.models import Transformer, TransformerConfig
from ribray.math.sequential import to_sequential
from ribray.math.stability import ONE_SOURCE
from ribray.shards import ComputeSettings, SerialBackend, ShardComputer

PTS = integration_points("gradient", 0)


def _model(last_pos_only: bool):
    cfg = TransformerConfig(d_vocab=11, n_ctx=5, d_model=8, n_heads=2, d_head=4, d_mlp=12,
                            n_layers=1, act_fn="relu")
    model = Transformer(cfg, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    tokens = torch.randint(0, 11, (24, 5), generator=torch.Generator().manual_seed(4))
    return to_sequential(model, last_pos_only=last_pos_only), tokens


def _bases(seq, a, b):
    rng = np.random.default_rng(0)
    C_a = rng.standard_normal((seq.width(a), seq.width(a) - 1))
    return C_a, np.linalg.pinv(C_a), rng.standard_normal((seq.width(b), seq.width(b) - 1))


def _both(seq, tokens, a, b, sources, method="exact"):
    C_a, C_a_pinv, C_b = _bases(seq, a, b)
    m = lib.m_partial(seq, tokens, a, b, C_b, PTS, 8, method=method, sources=sources)
    e = lib.edge_partial(seq, tokens, a, b, C_a, C_a_pinv, C_b, PTS, 8, method=method,
                         sources=sources)
    return m.total, e.total


def test_one_output_position_or_a_positionwise_section_is_exact():
    seq, tokens = _model(last_pos_only=True)  # the attention keeps only the last position
    exact = _both(seq, tokens, "ln1.0", "ln2.0", None)
    stoch = _both(seq, tokens, "ln1.0", "ln2.0", Sources(3, 1))
    for x, y in zip(exact, stoch):
        assert np.array_equal(x, y)
    seq, tokens = _model(last_pos_only=False)  # every position, but an MLP mixes none
    exact = _both(seq, tokens, "ln2.0", "unembed", None, method="auto")
    stoch = _both(seq, tokens, "ln2.0", "unembed", Sources(1, 1), method="auto")
    for x, y in zip(exact, stoch):
        assert np.array_equal(x, y)


def test_sources_converge_to_the_exact_sums():
    """Attention over 5 positions: the relative error of M and the edges falls with R (like
    1/√R), and averaged over seeds the estimate is unbiased."""
    seq, tokens = _model(last_pos_only=False)
    M0, E0 = _both(seq, tokens, "ln1.0", "ln2.0", None)

    def err(r, seed):
        M, E = _both(seq, tokens, "ln1.0", "ln2.0", Sources(r, seed))
        return (np.linalg.norm(M - M0) / np.linalg.norm(M0),
                np.linalg.norm(E - E0) / np.linalg.norm(E0))

    small = np.array([err(1, s) for s in range(4)]).mean(0)
    large = np.array([err(32, s) for s in range(4)]).mean(0)
    assert (large < 0.35 * small).all(), (small, large)  # 1/√32 ≈ 0.18
    mean_M = np.mean([_both(seq, tokens, "ln1.0", "ln2.0", Sources(4, s))[0]
                      for s in range(40)], axis=0)
    assert np.linalg.norm(mean_M - M0) / np.linalg.norm(M0) < 0.6 * small[0] / np.sqrt(4)


def test_sources_do_not_depend_on_sharding():
    """Each sample's draws are seeded by its index in the data set: two shards (with their
    offsets) sum to the one-shard result."""
    seq, tokens = _model(last_pos_only=False)
    _, _, C_b = _bases(seq, "ln1.0", "ln2.0")
    src = Sources(2, 7)
    whole = lib.m_partial(seq, tokens, "ln1.0", "ln2.0", C_b, PTS, 8, sources=src)
    parts = [lib.m_partial(seq, tokens[a:b], "ln1.0", "ln2.0", C_b, PTS, 5, sources=src,
                           offset=a) for a, b in ((0, 11), (11, 24))]
    total = parts[0].total + parts[1].total
    np.testing.assert_allclose(total, whole.total, rtol=0, atol=1e-12 * np.abs(whole.total).max())
    other = lib.m_partial(seq, tokens, "ln1.0", "ln2.0", C_b, PTS, 8, sources=Sources(2, 8))
    assert not np.allclose(other.total, whole.total)


def test_a_memory_budget_cuts_the_batch_not_the_result():
    """The exact path takes fewer samples at a time under a small budget; the sums agree to
    round-off (float64, a different order of additions)."""
    seq, tokens = _model(last_pos_only=False)
    _, _, C_b = _bases(seq, "ln1.0", "ln2.0")
    per = lib.exact_bytes_per_sample(seq, "ln1.0", "ln2.0", 5, 1)
    assert lib._sub_batch(seq, "ln1.0", "ln2.0", tokens, 8, 1, 3 * per) == 3
    whole = lib.m_partial(seq, tokens, "ln1.0", "ln2.0", C_b, PTS, 8, method="exact")
    small = lib.m_partial(seq, tokens, "ln1.0", "ln2.0", C_b, PTS, 8, method="exact",
                          budget=3 * per)
    assert small.count == whole.count
    np.testing.assert_allclose(small.total, whole.total, rtol=0,
                               atol=1e-12 * np.abs(whole.total).max())


# --- the sources' own error estimate (paper appendix C): each source alone is unbiased -------

def test_the_per_source_streams_leave_the_totals_unchanged():
    """M and the edges from directions r outer, i inner: the edges' total is the plain
    stream's bits, M's (the sum of the sources', one GEMM per row) equal to round-off; each
    source's sum is the plain stream of its own k_out directions (M in small GEMM chunks, so
    the groups straddle chunk boundaries)."""
    gen = torch.Generator().manual_seed(0)
    r, k_out = 3, 4
    grads = [torch.randn(5, 2, 6, generator=gen, dtype=torch.float64) for _ in range(r * k_out)]
    f_hat = torch.randn(5, 2, 6, generator=gen, dtype=torch.float64)
    M, per = jac.m_stream_by_source(iter(grads), r, k_out, chunk_rows=25)
    plain = jac.m_stream(iter(grads), chunk_rows=25)
    np.testing.assert_allclose(M, plain, rtol=0, atol=1e-14 * np.abs(plain).max())
    assert per.shape == (r, 6, 6)
    for q in range(r):
        np.testing.assert_allclose(per[q], jac.m_stream(grads[q * k_out: (q + 1) * k_out]),
                                   rtol=1e-13)
    E, per_e = jac.edges_stream_by_source(iter(grads), f_hat, r, k_out)
    assert np.array_equal(E, jac.edges_stream(iter(grads), f_hat, k_out))
    for q in range(r):
        assert np.array_equal(per_e[q], jac.edges_stream(grads[q * k_out: (q + 1) * k_out],
                                                         f_hat, k_out))
    with pytest.raises(ValueError, match="expected 2 sources"):
        jac.m_stream_by_source(iter(grads), 2, k_out)


def _sums(seq, tokens, a, b, sources, method="exact", batch=8):
    C_a, C_a_pinv, C_b = _bases(seq, a, b)
    return (lib.m_partial(seq, tokens, a, b, C_b, PTS, batch, method=method, sources=sources),
            lib.edge_partial(seq, tokens, a, b, C_a, C_a_pinv, C_b, PTS, batch, method=method,
                             sources=sources))


def test_per_source_sums_average_to_the_total():
    """Attention over 5 positions with R = 3: M's per-source sums (R, d, d) and the edges'
    (R, k_out, k_in) average to the stored totals; with R = 1 an empty marker (the one
    source's sum is the total); without sources in effect (none, one output position, a
    closed form) there are none."""
    seq, tokens = _model(last_pos_only=False)
    for s in _sums(seq, tokens, "ln1.0", "ln2.0", Sources(3, 1)):
        assert s.n_sources == 3 and s.per_source.shape == (3, *s.total.shape)
        np.testing.assert_allclose(s.per_source.mean(0), s.total, rtol=0,
                                   atol=1e-12 * np.abs(s.total).max())
        assert not np.allclose(s.per_source[0], s.per_source[1])  # they do differ
    for s in _sums(seq, tokens, "ln1.0", "ln2.0", Sources(1, 1)):
        assert s.n_sources == 1 and s.per_source.size == 0  # a marker, not the total again
    for s in _sums(seq, tokens, "ln1.0", "ln2.0", None):
        assert s.per_source is None and s.n_sources is None
    for s in _sums(seq, tokens, "ln2.0", "unembed", Sources(3, 1), method="auto"):
        assert s.per_source is None  # the MLP's closed form
    seq1, tokens1 = _model(last_pos_only=True)
    for s in _sums(seq1, tokens1, "ln1.0", "ln2.0", Sources(3, 1)):
        assert s.per_source is None  # one output position


def test_per_source_sums_do_not_depend_on_sharding():
    """Two shards (with their offsets) merge to the one-shard per-source sums."""
    seq, tokens = _model(last_pos_only=False)
    C_a, C_a_pinv, C_b = _bases(seq, "ln1.0", "ln2.0")
    src = Sources(3, 7)
    for fn, args in ((lib.m_partial, (C_b,)), (lib.edge_partial, (C_a, C_a_pinv, C_b))):
        whole = fn(seq, tokens, "ln1.0", "ln2.0", *args, PTS, 8, sources=src)
        parts = [fn(seq, tokens[a:b], "ln1.0", "ln2.0", *args, PTS, 5, sources=src, offset=a)
                 for a, b in ((0, 11), (11, 24))]
        merged = parts[0].merge(parts[1])
        assert merged.count == whole.count
        np.testing.assert_allclose(merged.per_source, whole.per_source, rtol=0,
                                   atol=1e-12 * np.abs(whole.per_source).max())


def _layer_pca(seq, tokens, layer):
    mom = lib.gram_partial(seq, tokens, [layer], 24)[layer]
    const = seq.const_index(layer, seq.width(layer))
    return bases.pca(mom.covariance(), mom.mean, const, 1e-12, "relative")


@functools.cache
def _stochastic_m(r: int, seed: int):
    """M of the attention section with R = ``r`` sources (one batch), cached: the calibration
    and the 1/R test share the R = 2 runs."""
    seq, tokens = _model(last_pos_only=False)
    _, _, C_b = _bases(seq, "ln1.0", "ln2.0")
    return lib.m_partial(seq, tokens, "ln1.0", "ln2.0", C_b, PTS, 24, sources=Sources(r, seed))


def test_the_error_estimate_is_calibrated():
    """Over 160 seeds of R = 2 sources, the estimated variance of M̂ (Σ s²/R, per-count units)
    averages to the actual squared error ‖M̂ − M‖²_F against the exact sum, and the estimated
    standard errors of the top Λ to their actual RMS error. Both averages are unbiased for the
    same number (the R draws are independent given the data, each unbiased); their seed-to-
    seed spread makes each mean good to about ±9% (one standard error, measured), the ratio
    to about ±12%, so [0.7, 1.4] is 2.5 standard errors below 1 and over 3 above, while a
    missing 1/R (×2) or a biased ddof = 0 variance (×1/2) falls outside it."""
    seq, tokens = _model(last_pos_only=False)
    _, _, C_b = _bases(seq, "ln1.0", "ln2.0")
    p = _layer_pca(seq, tokens, "ln1.0")
    exact = lib.m_partial(seq, tokens, "ln1.0", "ln2.0", C_b, PTS, 24)
    lam0 = stability._rotation(p, exact.mean())[0][:4]
    actual, est, lam_err, lam_se = [], [], [], []
    for seed in range(160):
        m = _stochastic_m(2, seed)
        actual.append(((m.mean() - exact.mean()) ** 2).sum())
        est.append(stability.source_variance(m))
        err = stability.source_error(p, m, n_keep=4)
        assert err is not None and err.r == 2
        assert err.m_rel_error == pytest.approx(np.sqrt(est[-1]) / np.linalg.norm(m.mean()))
        lam_err.append(stability._rotation(p, m.mean())[0][:4] - lam0)
        lam_se.append(err.lambda_se)
    ratio = np.mean(est) / np.mean(actual)
    assert 0.7 < ratio < 1.4, ratio  # 1.007
    lam_ratio = np.sqrt(np.mean(np.square(lam_se), 0) / np.mean(np.square(lam_err), 0))
    assert ((0.7 < lam_ratio) & (lam_ratio < 1.4)).all(), lam_ratio  # 0.95 to 1.06


def test_the_error_estimate_shrinks_like_one_over_r():
    """The estimated variance at R = 8 is about a quarter of that at R = 2 (means over 160
    and 48 seeds, good to about ±9% and ±7%: the ratio to about ±11%)."""
    def mean_var(r: int, seeds: int) -> float:
        return float(np.mean([stability.source_variance(_stochastic_m(r, seed))
                              for seed in range(seeds)]))

    ratio = mean_var(2, 160) / mean_var(8, 48)
    assert 4 * 0.7 < ratio < 4 * 1.4, ratio  # 3.71


LAYERS = ["ln1.0", "ln2.0", "unembed", "output"]


def _pipeline(sources, shards, sink=None):
    """The recursion over ln1.0 (attention, 5 positions), ln2.0 (the MLP's closed form) and
    unembed, in this process, into ``sink`` (default: memory)."""
    seq, tokens = _model(last_pos_only=False)
    layers = LAYERS
    settings = ComputeSettings(batch_size=8, basis_points=PTS, edge_points=PTS,
                               sources=sources)
    sink = sink if sink is not None else pipeline.MemorySink()
    pipeline.run(SerialBackend(ShardComputer(seq, tokens, settings), shards), layers,
                 {n: seq.width(n) for n in layers},
                 pipeline.BasisSettings(kind="lib", threshold=1e-10, threshold_mode="relative",
                                        rotate_final=False, compute_edges=True), sink)
    return sink


def test_the_recursion_reports_the_error_where_sources_are_in_effect():
    """With R = 3: the attention layer and its edges get the sources' error, the same for one
    shard or three (each sample's sources are its own; the sums differ only in round-off);
    the MLP's closed form none. R = 1: the reason. No sources: nothing."""
    one = _pipeline(Sources(3, 2), [(0, 24)])
    three = _pipeline(Sources(3, 2), [(0, 5), (5, 11), (11, 24)])
    for sink in (one, three):
        assert sink.bases["ln2.0"].stochastic_error is None
        assert sink.bases["unembed"].stochastic_error is None
        assert sink.edge_attrs[("ln2.0", "unembed")] == {}
    a, b = one.bases["ln1.0"].stochastic_error, three.bases["ln1.0"].stochastic_error
    assert a["r"] == 3 and 0 < a["m_rel_error"] < 1 and len(a["top_lambda_rel_se"]) > 0
    assert b["r"] == 3 and b["m_rel_error"] == pytest.approx(a["m_rel_error"], rel=1e-9)
    np.testing.assert_allclose(b["top_lambda_rel_se"], a["top_lambda_rel_se"], rtol=1e-8)
    ea, eb = one.edge_attrs[("ln1.0", "ln2.0")], three.edge_attrs[("ln1.0", "ln2.0")]
    assert ea["sources_r"] == 3 and 0 < ea["edges_rel_error"] < 1
    assert eb["edges_rel_error"] == pytest.approx(ea["edges_rel_error"], rel=1e-9)
    single = _pipeline(Sources(1, 2), [(0, 11), (11, 24)])
    assert single.bases["ln1.0"].stochastic_error == {"r": 1, "reason": ONE_SOURCE}
    assert single.edge_attrs[("ln1.0", "ln2.0")] == {}
    exact = _pipeline(None, [(0, 11), (11, 24)])
    assert all(b.stochastic_error is None for b in exact.bases.values())
    assert all(a == {} for a in exact.edge_attrs.values())


def test_show_says_why_one_source_has_no_estimate(tmp_path):
    """A store written with R = 1: ``show`` lists the layer with the stored reason."""
    from typer.testing import CliRunner

    from ribray.cli import app
    from ribray.store import StoreWriter

    w = StoreWriter(tmp_path / "s.zarr", {"config": {"name": "t"}, "node_layers": LAYERS,
                                          "basis": "lib"})
    _pipeline(Sources(1, 0), [(0, 24)], sink=w)
    w.finish({})
    res = CliRunner().invoke(app, ["show", str(tmp_path / "s.zarr")])
    assert res.exit_code == 0, res.output
    assert "Stochastic sources" in res.output and "needs r >= 2" in res.output
    assert "rel. error (sources)" not in res.output
