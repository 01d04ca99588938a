"""Sequential form (paper appendix A.4-A.5) against the ordinary models, in float64.

Tolerance: relative 1e-10 on the logits. The two forms do the same float64 arithmetic in a
different order (folded biases, concatenated constant), so they differ by round-off of ~1e-15;
any wiring mistake (a missing bias, a wrong head split, a position cut in the wrong place)
changes the logits at O(1).
"""

from __future__ import annotations

import pytest
import torch

from conftest import SHIPPED_MODADD, reference
from ribray.checkpoints import CheckpointError, load_model
from ribray.data import modular_addition
from ribray.math.models import MLP, Transformer, TransformerConfig
from ribray.math.sequential import append_const, fold_bias, to_sequential

TOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def random_transformer(seed: int, act_fn: str = "relu", n_layers: int = 1) -> Transformer:
    gen = torch.Generator().manual_seed(seed)
    m = Transformer(TransformerConfig(d_vocab=10, n_ctx=4, d_model=8, n_heads=2, d_head=4,
                                      d_mlp=16, n_layers=n_layers, act_fn=act_fn),
                    dtype=torch.float64)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return m


def test_fold_bias_equals_affine():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(3, generator=gen, dtype=torch.float64)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    assert rel_err(append_const(x) @ fold_bias(W, b), x @ W + b) < TOL


@pytest.mark.parametrize("act_fn", ["relu", "gelu"])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_random_transformer_sequential_equals_model(act_fn, n_layers):
    model = random_transformer(3, act_fn, n_layers)
    tokens = torch.randint(0, 10, (7, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        seq_all = to_sequential(model, last_pos_only=False)(tokens)
        seq_last = to_sequential(model, last_pos_only=True)(tokens)
    assert seq_all.shape == full.shape
    assert rel_err(seq_all, full) < TOL
    assert seq_last.shape == (7, 1, 10)
    assert rel_err(seq_last[:, 0], full[:, -1]) < TOL


def test_folded_biases_matter():
    """Zeroing the biases of the ordinary model changes the logits: the sequential form's
    agreement above really exercises the folded constant coordinate."""
    model = random_transformer(4)
    tokens = torch.randint(0, 10, (5, 4), generator=torch.Generator().manual_seed(2))
    seq = to_sequential(model, last_pos_only=False)
    with torch.no_grad():
        ref = seq(tokens)
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                p.zero_()
        assert rel_err(model(tokens), ref) > 1e-3


@pytest.mark.parametrize("act_fn", ["relu", "gelu", "linear"])
def test_mlp_sequential_equals_model(act_fn):
    gen = torch.Generator().manual_seed(5)
    model = MLP([6, 9, 7, 4], act_fn=act_fn, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    seq = to_sequential(model)
    assert seq.names == ["layers.0", "layers.1", "layers.2", "output"]
    assert [seq.width(n) for n in seq.names] == [7, 10, 8, 4]
    with torch.no_grad():
        assert rel_err(seq(x)[:, 0], model(x)) < TOL


@pytest.mark.parametrize("seed", range(5))
def test_reference_modadd_checkpoints(seed):
    """The reference checkpoints load, the sequential form reproduces them, and the data split
    matches the one they were trained on (100% train accuracy; test errors only on held-out
    pairs)."""
    folder = reference(f"modadd-seed{seed}")
    model, _ = load_model(folder / "model_epoch_60000.pt", "tlens", torch.float64)
    seq = to_sequential(model, last_pos_only=True)
    train = modular_addition(113, 0.3, 0, "train")
    test = modular_addition(113, 0.3, 0, "test")
    with torch.no_grad():
        full = model(train.inputs)[:, -1]
        assert rel_err(seq(train.inputs)[:, 0], full) < TOL
        assert float((full.argmax(-1) == train.labels).double().mean()) == 1.0
        test_acc = float((seq(test.inputs)[:, 0].argmax(-1) == test.labels).double().mean())
    assert test_acc > 0.998


def test_reference_mlp_checkpoint():
    folder = reference("mnist-mlp")
    model, _ = load_model(folder / "model_epoch_12.pt", "reference-mlp", torch.float64)
    assert model.sizes == [784, 100, 100, 10]
    seq = to_sequential(model)
    x = torch.rand(16, 784, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(seq(x)[:, 0], model(x)) < TOL


def test_shipped_modadd_checkpoint_grokked():
    """The checkpoint the embedded default job runs on was trained by `ribray train modadd`."""
    if not SHIPPED_MODADD.is_file():
        pytest.fail(f"{SHIPPED_MODADD} is missing from the repository")
    model, meta = load_model(SHIPPED_MODADD, "ribray", torch.float64)
    test = modular_addition(113, 0.3, 0, "test")
    seq = to_sequential(model, last_pos_only=True)
    with torch.no_grad():
        logits = seq(test.inputs)[:, 0]
        assert rel_err(logits, model(test.inputs)[:, -1]) < TOL
    assert float((logits.argmax(-1) == test.labels).double().mean()) >= 0.999
    assert meta["test_acc"] >= 0.999


def test_wrong_shaped_checkpoint(tmp_path):
    from ribray.checkpoints import save_mlp

    path = tmp_path / "mlp.pt"
    save_mlp(path, MLP([3, 4, 2]))
    with pytest.raises(CheckpointError, match="not a ribray checkpoint|unknown model kind|shape"):
        load_model(path, "tlens", torch.float64, config_path=tmp_path / "missing.yaml")
    sd = torch.load(path, weights_only=True)
    sd["state_dict"]["layers.1.W"] = torch.zeros(5, 2)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"layers.1.W has shape \(5, 2\)"):
        load_model(path, "ribray", torch.float64)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt", "ribray", torch.float64)


def _tl_files(tmp_path, model: Transformer, **model_cfg) -> tuple:
    """A TransformerLens-format state dict and reference-style config.yaml in tmp_path."""
    import yaml

    path = tmp_path / "model.pt"
    torch.save(model.tl_state_dict(), path)
    cfg = {**model.cfg.to_dict(), "normalization_type": None, **model_cfg}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": cfg}))
    return path, tmp_path / "config.yaml"


def test_tlens_loader_round_trip_and_refusals(tmp_path):
    """The TransformerLens path a user takes with the reference checkpoints, without them:
    a round trip reproduces the logits; layer norm, other TL options and bad activations are
    refused with a CheckpointError instead of being analysed as a different model."""
    model = random_transformer(9)
    path, _ = _tl_files(tmp_path, model)
    loaded, _ = load_model(path, "tlens", torch.float64)
    tokens = torch.randint(0, 10, (5, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(loaded(tokens), model(tokens)) < TOL
    # TransformerLens's default normalization_type (absent key) is layer norm
    import yaml

    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del cfg["model"]["normalization_type"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="normalization_type"):
        load_model(path, "tlens", torch.float64)
    _tl_files(tmp_path, model, positional_embedding_type="rotary")
    with pytest.raises(CheckpointError, match="positional_embedding_type"):
        load_model(path, "tlens", torch.float64)
    _tl_files(tmp_path, model)  # a valid config again, but layer-norm weights in the file
    sd = model.tl_state_dict()
    sd["blocks.0.ln1.w"] = torch.ones(8)
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="layer norm"):
        load_model(path, "tlens", torch.float64)
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        load_model(path, "tlens", torch.float64)


def test_unsupported_activation_is_a_checkpoint_error(tmp_path):
    from ribray.checkpoints import save_mlp

    path = tmp_path / "mlp.pt"
    save_mlp(path, MLP([3, 4, 2]))
    obj = torch.load(path, weights_only=True)
    obj["config"]["act_fn"] = "tanh"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="act_fn"):
        load_model(path, "ribray", torch.float64)


def test_reference_mlp_format_round_trip(tmp_path):
    import yaml

    gen = torch.Generator().manual_seed(4)
    model = MLP([5, 6, 3], act_fn="gelu", dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"activation_fn": "gelu"}}))
    loaded, _ = load_model(tmp_path / "m.pt", "reference-mlp", torch.float64)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(loaded(x), model(x)) < TOL and loaded.act_fn == "gelu"
