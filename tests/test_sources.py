"""Stochastic sources over output positions (paper appendix C): exact where they change
nothing, converging to the exact sums as R grows, and independent of sharding."""

from __future__ import annotations

import numpy as np
import torch

from ribray.math import lib
from ribray.math.jacobian import integration_points
from ribray.math.lib import Sources
from ribray.math.models import Transformer, TransformerConfig
from ribray.math.sequential import to_sequential

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
