"""Language models through Hugging Face transformers: small random GPT-2, GPT-Neo and GPT-NeoX
configs saved with ``save_pretrained`` to a temporary folder and loaded back the way a user's
job loads them; their sequential form must give the model's logits.

Tolerances (relative to the largest logit): float32 1e-5, float64 1e-10: the sequential form
computes the same operations in another order (layer norm split in two, biases folded), so
they agree to a few ulps per layer. GPT-Neo is the exception in float64: its Hugging Face
attention casts queries and keys to float32 whatever the model's dtype, so it can only be
matched to float32 precision; there the float64 check is against 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ribray.checkpoints import CheckpointError
from ribray.hf import hf_to_sequential, load_hf
from ribray.math.lm import variance_index


def _gpt2(**kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=61, n_positions=16, n_embd=24, n_layer=2, n_head=3,
                     activation_function="gelu_new", **kw)
    return GPT2LMHeadModel(cfg)


def _gpt_neo(**kw):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    cfg = GPTNeoConfig(vocab_size=61, max_position_embeddings=16, hidden_size=24, num_layers=2,
                       num_heads=3, attention_types=[[["global", "local"], 1]], window_size=3,
                       intermediate_size=40, **kw)
    return GPTNeoForCausalLM(cfg)


def _gpt_neox(**kw):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=61, max_position_embeddings=16, hidden_size=24,
                        num_hidden_layers=2, num_attention_heads=3, intermediate_size=40,
                        rotary_pct=0.25, **kw)
    return GPTNeoXForCausalLM(cfg)


MODELS = {
    "gpt2": _gpt2,
    "gpt2-inverse-layer-scale": lambda: _gpt2(scale_attn_by_inverse_layer_idx=True),
    "gpt-neo": _gpt_neo,
    "gpt-neox-parallel": lambda: _gpt_neox(use_parallel_residual=True),
    "gpt-neox-serial": lambda: _gpt_neox(use_parallel_residual=False),
}


def _saved(name: str, tmp_path) -> str:
    """A random model with non-trivial layer norms and biases, saved and loaded back."""
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "ln" in pname or "norm" in pname:
                p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path / name
    model.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sequential_form_gives_the_models_logits(name, dtype, tmp_path):
    hf = load_hf(_saved(name, tmp_path), dtype)
    seq = hf_to_sequential(hf)
    tokens = torch.randint(0, 61, (5, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        got = seq(tokens)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 or name == "gpt-neo" else 1e-10
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < tol, err
    # the node layers of the issue, in order, each ending in the constant 1
    names = seq.names
    for b in range(2):
        want_names = [f"{n}.{b}" for n in ("ln1", "ln1_out", "attn_in", "ln2", "ln2_out",
                                           "mlp_in", "mlp_out")]
        i = names.index(want_names[0])
        assert names[i: i + 7] == want_names
    assert names[-4:] == ["ln_final", "ln_final_out", "unembed", "output"]
    acts = seq.activations(tokens, names[:-1])
    for n, a in acts.items():
        assert torch.all(a[..., -1] == 1.0), n


def test_the_variance_feature_is_the_layer_norms_variance(tmp_path):
    hf = load_hf(_saved("gpt2", tmp_path), torch.float64)
    seq = hf_to_sequential(hf)
    tokens = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(2))
    acts = seq.activations(tokens, ["ln1.1", "ln1_out.1"])
    x, out = acts["ln1.1"][..., :-1], acts["ln1_out.1"]
    v = variance_index("ln1_out.1", out.shape[-1])
    eps = hf.transformer.h[1].ln_1.eps
    np.testing.assert_allclose(out[..., v], x.var(-1, unbiased=False) + eps, rtol=1e-12)
    assert variance_index("ln1.1", 25) is None and variance_index("attn_in.0", 49) is None


def test_unknown_architectures_and_folders_are_one_line(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=12, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=20)
                    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="architecture 'bert' is not supported"):
        load_hf(str(tmp_path / "bert"), torch.float32)
    with pytest.raises(CheckpointError, match="not a Hugging Face model folder"):
        load_hf(str(tmp_path / "missing"), torch.float32)
