"""Reading and writing model checkpoints. Every load uses ``torch.load(weights_only=True)``.

Formats read:

* ``ribray``: ``{"format": "ribray", "version": 1, "kind": "transformer" | "mlp", "config": {...},
  "state_dict": {...}, "meta": {...}}``, written by ``ribray train``. Transformer parameters use
  TransformerLens names; MLP parameters ``layers.{i}.W`` (in, out) and ``layers.{i}.b``.
* ``tlens``: a bare TransformerLens ``HookedTransformer`` state dict plus the reference
  implementation's ``config.yaml`` (its ``model`` section) beside it or given explicitly.
* ``reference-mlp``: the reference implementation's MLP state dict (``layers.{i}.W``,
  ``layers.{i}.b``) plus its ``config.yaml`` (``model.activation_fn``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml

from ribray.math.models import MLP, Transformer, TransformerConfig

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of the wrong shape; the message says which."""


def _torch_load(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is one clear message
        raise CheckpointError(f"{path}: not a readable torch checkpoint "
                              f"({exc.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def save_transformer(path: Path, model: Transformer, meta: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "ribray", "version": FORMAT_VERSION, "kind": "transformer",
                "config": model.cfg.to_dict(),
                "state_dict": {k: v.float() for k, v in model.tl_state_dict().items()},
                "meta": meta or {}}, path)


def save_mlp(path: Path, model: MLP, meta: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    torch.save({"format": "ribray", "version": FORMAT_VERSION, "kind": "mlp",
                "config": {"sizes": model.sizes, "act_fn": model.act_fn},
                "state_dict": sd, "meta": meta or {}}, path)


def _read_yaml(path: Path, explicit: bool) -> dict:
    if not path.is_file():
        where = "" if explicit else " beside the checkpoint"
        raise CheckpointError(f"{path}: config.yaml not found{where}")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path}: not valid YAML ({getattr(exc, 'problem', exc)})"
                              ) from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointError(f"{path}: expected a mapping with a 'model' section")
    return cfg


def _tensors(sd: dict, path: Path) -> dict[str, torch.Tensor]:
    """The tensor entries of a state dict (TransformerLens keeps a few buffers beside them)."""
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: the state dict is a {type(sd).__name__}, not a mapping")
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}


# Parameters of models ribray cannot yet put in sequential form: loading such a checkpoint as a
# transformer without layer norm would silently analyse a different model.
_UNSUPPORTED_TL = re.compile(r"(^|\.)(ln\d*|ln_final)\.(w|b)$|rotary|mlp\.b_gate|W_gate")


def _build_transformer(cfg: TransformerConfig, sd: dict, path: Path,
                       dtype: torch.dtype) -> Transformer:
    tensors = _tensors(sd, path)
    odd = sorted(k for k in tensors if _UNSUPPORTED_TL.search(k))
    if odd:
        raise CheckpointError(f"{path}: parameters {odd[:3]} belong to layer norm or another "
                              f"component ribray does not support yet (transformers without "
                              f"layer norm only)")
    try:
        model = Transformer(cfg, dtype=dtype)
        model.load_tl_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return model.eval()


def _build_mlp(sizes: list[int], act_fn: str, sd: dict, path: Path, dtype: torch.dtype) -> MLP:
    try:
        model = MLP(sizes, act_fn=act_fn, dtype=dtype)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    own = model.state_dict()
    for k, ref in own.items():
        if k not in sd:
            raise CheckpointError(f"{path}: missing parameter {k}")
        if tuple(sd[k].shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: parameter {k} has shape {tuple(sd[k].shape)}, "
                                  f"expected {tuple(ref.shape)}")
    model.load_state_dict({k: sd[k].to(dtype) for k in own})
    return model.eval()


def _mlp_sizes(sd: dict, path: Path) -> list[int]:
    sd = _tensors(sd, path)
    n = 0
    while f"layers.{n}.W" in sd:
        n += 1
    if n == 0:
        raise CheckpointError(f"{path}: no tensor named layers.0.W; not an MLP checkpoint")
    sizes = [int(sd["layers.0.W"].shape[0])]
    for i in range(n):
        w = sd[f"layers.{i}.W"]
        if w.ndim != 2 or int(w.shape[0]) != sizes[-1]:
            raise CheckpointError(f"{path}: layers.{i}.W has shape {tuple(w.shape)}, which does "
                                  f"not follow a layer of width {sizes[-1]}")
        sizes.append(int(w.shape[1]))
    return sizes


def _tlens_config(mcfg: dict, cfg_path: Path) -> TransformerConfig:
    """TransformerConfig from a reference ``config.yaml`` ``model`` section.

    TransformerLens defaults to layer norm when ``normalization_type`` is absent, and supports
    options ribray does not (rotary or shortformer positions, parallel attention and MLP,
    attention-only models); all of these are refused rather than silently ignored.
    """
    if mcfg.get("normalization_type", "LN") not in (None, "none", "None"):
        raise CheckpointError(f"{cfg_path}: normalization_type "
                              f"{mcfg.get('normalization_type', 'LN (the default)')!r} is not "
                              f"supported yet (transformers without layer norm only)")
    unsupported = {"positional_embedding_type": "standard", "parallel_attn_mlp": False,
                   "attn_only": False, "gated_mlp": False}
    for key, ok in unsupported.items():
        if key in mcfg and mcfg[key] != ok:
            raise CheckpointError(f"{cfg_path}: {key}: {mcfg[key]!r} is not supported")
    fields = TransformerConfig.__dataclass_fields__
    try:
        return TransformerConfig(**{k: mcfg[k] for k in fields if k in mcfg})
    except TypeError as exc:
        raise CheckpointError(f"{cfg_path}: bad model section ({exc})") from None


def load_model(path: Path, fmt: str, dtype: torch.dtype,
               config_path: Path | None = None) -> tuple[Transformer | MLP, dict]:
    """Load a checkpoint as an ordinary model in ``dtype``; returns (model, metadata).

    Every problem (missing file, wrong format, wrong shapes, unsupported architecture) raises
    :class:`CheckpointError` with one line naming the file.
    """
    path = Path(path)
    obj = _torch_load(path)
    if fmt == "ribray":
        if obj.get("format") != "ribray" or "state_dict" not in obj:
            raise CheckpointError(f"{path}: not a ribray checkpoint (use format tlens or "
                                  f"reference-mlp for the reference implementation's files)")
        cfg, sd, meta = obj.get("config", {}), obj["state_dict"], dict(obj.get("meta", {}))
        if obj.get("kind") == "transformer":
            try:
                tcfg = TransformerConfig(**cfg)
            except TypeError as exc:
                raise CheckpointError(f"{path}: bad transformer config ({exc})") from None
            return _build_transformer(tcfg, sd, path, dtype), meta
        if obj.get("kind") == "mlp":
            return _build_mlp(_mlp_sizes(sd, path), cfg.get("act_fn", "relu"), sd, path,
                              dtype), meta
        raise CheckpointError(f"{path}: unknown model kind {obj.get('kind')!r}")
    cfg_path = Path(config_path) if config_path else path.parent / "config.yaml"
    if fmt == "tlens":
        tcfg = _tlens_config(_read_yaml(cfg_path, config_path is not None)["model"], cfg_path)
        return _build_transformer(tcfg, obj, path, dtype), {"config_yaml": str(cfg_path)}
    if fmt == "reference-mlp":
        mcfg = _read_yaml(cfg_path, config_path is not None)["model"]
        act = mcfg.get("activation_fn", "relu")
        return _build_mlp(_mlp_sizes(obj, path), act, _tensors(obj, path), path, dtype), {
            "config_yaml": str(cfg_path)}
    raise CheckpointError(f"{path}: unknown checkpoint format {fmt!r}")
