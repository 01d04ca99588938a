"""Hugging Face causal language models in sequential form: GPT-2, GPT-Neo, GPT-NeoX.

:func:`load_hf` reads a model (a local folder, or a hub name where the network allows) with
``from_pretrained`` and never runs remote code unless asked; :func:`hf_to_sequential` turns the
module into a :class:`ribray.math.sequential.SequentialModel` with the node layers of
:mod:`ribray.math.lm`. Both raise :class:`ribray.checkpoints.CheckpointError` with one line.

Parameter layouts (row vectors, ``x @ W``):

* GPT-2: ``c_attn`` (Conv1D, (d, 3d)) splits into q, k, v along its output, each (d, heads,
  d_head); ``c_proj`` (d, d) reads the heads' outputs in order. Scores scaled by 1/√d_head
  (``scale_attn_weights``), and by 1/(layer + 1) with ``scale_attn_by_inverse_layer_idx``.
* GPT-Neo: separate q/k/v ``Linear`` layers without bias, scores not scaled, every layer of
  type ``local`` masked to a window of ``window_size`` keys.
* GPT-NeoX: ``query_key_value`` output laid out (heads, 3, d_head); rotary embeddings on the
  first ``partial_rotary_factor · d_head`` dims; attention and MLP in parallel when
  ``use_parallel_residual``; no position embedding.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ribray.checkpoints import CheckpointError
from ribray.math.lm import LmAttention, LmMlpIn, LnIn, LnOut, rotary_tables
from ribray.math.sequential import Affine, MlpOut, SequentialModel, Step, TokenEmbed

SUPPORTED = ("gpt2", "gpt_neo", "gpt_neox")

#: Hugging Face activation names -> ribray.math.models.ACTIVATIONS
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                  "relu": "relu", "gelu_fast": "gelu_tanh"}


def load_hf(path: str, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` in ``dtype``, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one-line logs; the job has its own progress

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a Hugging Face model folder or hub name "
                              f"({_first_line(exc)})") from None
    if config.model_type not in SUPPORTED:
        raise CheckpointError(f"{path}: architecture {config.model_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED)})")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: could not load the weights ({_first_line(exc)})") from None
    return model.eval()


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def hf_to_sequential(model: nn.Module) -> SequentialModel:
    """The sequential form of a GPT-2, GPT-Neo or GPT-NeoX causal LM (weights copied, in the
    model's dtype)."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    build = {"gpt2": _gpt2, "gpt_neo": _gpt_neo, "gpt_neox": _gpt_neox}.get(kind)
    if build is None:
        raise CheckpointError(f"architecture {kind!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED)})")
    with torch.no_grad():
        embed, blocks, final = build(model)
        steps: list[Step] = []
        for b, blk in enumerate(blocks):
            steps += _block(b, blk)
        steps += _final(final)
    return SequentialModel(embed, steps).eval()


def _act(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise CheckpointError(f"activation {name!r} is not supported "
                              f"(supported: {', '.join(sorted(HF_ACTIVATIONS))})")
    return HF_ACTIVATIONS[name]


def _fold(W: Tensor, b: Tensor | None, heads: int) -> Tensor:
    """(d, heads·dh) and its bias -> (heads, d + 1, dh), the bias in the last row."""
    d = W.shape[0]
    b = torch.zeros(W.shape[1], dtype=W.dtype, device=W.device) if b is None else b
    return torch.cat([W, b.unsqueeze(0)], dim=0).reshape(d + 1, heads, -1).permute(1, 0, 2)


def _block(b: int, p: dict[str, Any]) -> list[Step]:
    """The seven steps of one block from its plain parameters (see the builders)."""
    d, par = p["d"], p["parallel"]
    att = LmAttention(f"attn_in.{b}", d, p["W_Q"], p["W_K"], p["W_V"], p["W_O"], p["b_O"],
                      p["scale"], p["window"], p["rotary"], par)
    return [LnIn(f"ln1.{b}", d + 1, d, p["eps1"]),
            LnOut(f"ln1_out.{b}", d + 2, d, p["ln1_w"], p["ln1_b"]),
            att,
            LnIn(f"ln2.{b}", att.d_out, d, p["eps2"]),
            LnOut(f"ln2_out.{b}", att.d_out + 1, d, p["ln2_w"], p["ln2_b"]),
            LmMlpIn(f"mlp_in.{b}", d, p["W_in"], p["b_in"], p["act"], par),
            MlpOut(f"mlp_out.{b}", p["W_out"], p["b_out"])]


def _final(p: dict[str, Any]) -> list[Step]:
    d = p["d"]
    b_U = p["b_U"] if p["b_U"] is not None else torch.zeros(p["W_U"].shape[1],
                                                            dtype=p["W_U"].dtype)
    return [LnIn("ln_final", d + 1, d, p["eps"]),
            LnOut("ln_final_out", d + 2, d, p["w"], p["b"], keep=False),
            Affine("unembed", p["W_U"], b_U, act_fn=None)]


def _norms(ln1: nn.LayerNorm, ln2: nn.LayerNorm) -> dict[str, Any]:
    """A block's two layer norms as the entries of :func:`_block`."""
    return {"ln1_w": ln1.weight, "ln1_b": ln1.bias, "eps1": float(ln1.eps),
            "ln2_w": ln2.weight, "ln2_b": ln2.bias, "eps2": float(ln2.eps)}


def _mlp(W_in: Tensor, b_in: Tensor, W_out: Tensor, b_out: Tensor, act: str) -> dict[str, Any]:
    """A block's MLP (row-vector weights: (d, m) and (m, d)) as the entries of :func:`_block`."""
    return {"W_in": W_in, "b_in": b_in, "W_out": W_out, "b_out": b_out, "act": _act(act)}


def _head(model: nn.Module, d: int, ln_f: nn.LayerNorm) -> dict[str, Any]:
    """The final layer norm and the unembedding, as :func:`_final` takes them."""
    head = model.get_output_embeddings()
    return {"d": d, "w": ln_f.weight, "b": ln_f.bias, "eps": float(ln_f.eps),
            "W_U": head.weight.T, "b_U": getattr(head, "bias", None)}


def _gpt2(model: nn.Module):
    cfg, tr = model.config, model.transformer
    d, H = cfg.n_embd, cfg.n_head
    dh = d // H
    blocks = []
    for i, blk in enumerate(tr.h):
        W, bias = blk.attn.c_attn.weight, blk.attn.c_attn.bias
        scale = 1.0 / math.sqrt(dh) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(i + 1)
        blocks.append({
            "d": d, "parallel": False, "scale": scale, "window": None, "rotary": None,
            "W_Q": _fold(W[:, :d], bias[:d], H), "W_K": _fold(W[:, d:2 * d], bias[d:2 * d], H),
            "W_V": _fold(W[:, 2 * d:], bias[2 * d:], H),
            "W_O": blk.attn.c_proj.weight.reshape(H, dh, d), "b_O": blk.attn.c_proj.bias,
            **_norms(blk.ln_1, blk.ln_2),
            **_mlp(blk.mlp.c_fc.weight, blk.mlp.c_fc.bias, blk.mlp.c_proj.weight,
                   blk.mlp.c_proj.bias, cfg.activation_function)})
    return TokenEmbed(tr.wte.weight, tr.wpe.weight), blocks, _head(model, d, tr.ln_f)


def _gpt_neo(model: nn.Module):
    cfg, tr = model.config, model.transformer
    d, H = cfg.hidden_size, cfg.num_heads
    dh = d // H
    blocks = []
    for i, blk in enumerate(tr.h):
        at = blk.attn.attention
        local = cfg.attention_layers[i] == "local"
        blocks.append({
            "d": d, "parallel": False, "scale": 1.0, "rotary": None,
            "window": cfg.window_size if local else None,
            "W_Q": _fold(at.q_proj.weight.T, at.q_proj.bias, H),
            "W_K": _fold(at.k_proj.weight.T, at.k_proj.bias, H),
            "W_V": _fold(at.v_proj.weight.T, at.v_proj.bias, H),
            "W_O": at.out_proj.weight.T.reshape(H, dh, d), "b_O": at.out_proj.bias,
            **_norms(blk.ln_1, blk.ln_2),
            **_mlp(blk.mlp.c_fc.weight.T, blk.mlp.c_fc.bias, blk.mlp.c_proj.weight.T,
                   blk.mlp.c_proj.bias, cfg.activation_function)})
    return TokenEmbed(tr.wte.weight, tr.wpe.weight), blocks, _head(model, d, tr.ln_f)


def _neox_rotary(cfg: Any, dh: int) -> tuple[int, float]:
    rope = getattr(cfg, "rope_parameters", None) or {}
    pct = rope.get("partial_rotary_factor", getattr(cfg, "rotary_pct", 1.0))
    base = rope.get("rope_theta", getattr(cfg, "rotary_emb_base", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"rotary scaling {rope.get('rope_type')!r} is not supported")
    return int(dh * pct), float(base)


def _gpt_neox(model: nn.Module):
    cfg, tr = model.config, model.gpt_neox
    d, H = cfg.hidden_size, cfg.num_attention_heads
    dh = d // H
    dims, base = _neox_rotary(cfg, dh)
    dtype = tr.embed_in.weight.dtype
    rotary = rotary_tables(cfg.max_position_embeddings, dims, base, dtype) if dims else None
    blocks = []
    for blk in tr.layers:
        at = blk.attention
        W = at.query_key_value.weight.T.reshape(d, H, 3, dh)
        bias = at.query_key_value.bias.reshape(H, 3, dh)

        def part(j: int, W=W, bias=bias) -> Tensor:
            return torch.cat([W[:, :, j], bias[:, j].unsqueeze(0)], dim=0).permute(1, 0, 2)

        blocks.append({
            "d": d, "parallel": bool(cfg.use_parallel_residual), "scale": dh ** -0.5,
            "window": None, "rotary": rotary, "W_Q": part(0), "W_K": part(1), "W_V": part(2),
            "W_O": at.dense.weight.T.reshape(H, dh, d), "b_O": at.dense.bias,
            **_norms(blk.input_layernorm, blk.post_attention_layernorm),
            **_mlp(blk.mlp.dense_h_to_4h.weight.T, blk.mlp.dense_h_to_4h.bias,
                   blk.mlp.dense_4h_to_h.weight.T, blk.mlp.dense_4h_to_h.bias,
                   cfg.hidden_act)})
    pos = torch.zeros(cfg.max_position_embeddings, d, dtype=dtype)
    return TokenEmbed(tr.embed_in.weight, pos), blocks, _head(model, d, tr.final_layer_norm)


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~"))


def cached(name: str) -> bool:
    """Whether a hub model's config is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    hit = try_to_load_from_cache(name, "config.json")
    return isinstance(hit, str)


def remote_parts(job: Any) -> list[str]:
    """The job's hub model and data set that are not on this machine (``model NAME``,
    ``data NAME``): checking them would download them."""
    out = []
    if job.model.format == "hf" and not is_local(job.model.path) and not cached(job.model.path):
        out.append(f"model {job.model.path}")
    path = getattr(job.data, "path", None)
    if getattr(job.data, "kind", "") == "text" and path and not is_local(path):
        out.append(f"data {path}")
    return out
