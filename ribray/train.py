"""``ribray train``: the small models of the paper, trained here so a fresh clone needs no download.

* Modular addition (paper section 3.1): AdamW, lr 1e-3, weight decay 1, betas (0.9, 0.98), full
  batch on the 30% training split, cross-entropy on the last position (no learning-rate warm-up),
  until test accuracy reaches the target (default 99.9%, i.e. the model grokked).
* An MLP on scikit-learn's digits: AdamW full batch until the epoch budget.

Checkpoints are ribray's own format (see :mod:`ribray.checkpoints`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from ribray.checkpoints import save_mlp, save_transformer
from ribray.data import digits, modular_addition
from ribray.math.models import MLP, Transformer, TransformerConfig


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).double().mean())


def train_modadd(out: Path, p: int = 113, frac_train: float = 0.3, data_seed: int = 0,
                 seed: int = 0, target_test_acc: float = 0.999, max_epochs: int = 60000,
                 log: Callable[[str], None] = print, log_every: int = 500) -> dict:
    """Train a 1-block modular-addition transformer until it groks; save to ``out``."""
    cfg = TransformerConfig(d_vocab=p + 1)
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    train = modular_addition(p, frac_train, data_seed, "train")
    test = modular_addition(p, frac_train, data_seed, "test")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    t0, epoch, test_acc = time.time(), 0, 0.0
    for epoch in range(1, max_epochs + 1):
        logits = model(train.inputs, last_pos_only=True)[:, -1].double()
        loss = torch.nn.functional.cross_entropy(logits, train.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if epoch % 100 == 0 or epoch == max_epochs:
            with torch.no_grad():
                test_acc = _accuracy(model(test.inputs, last_pos_only=True)[:, -1], test.labels)
            if epoch % log_every == 0:
                log(f"epoch {epoch}: train loss {loss.item():.3e}, test acc {test_acc:.4%}, "
                    f"{time.time() - t0:.0f}s")
            if test_acc >= target_test_acc:
                break
    with torch.no_grad():
        train_acc = _accuracy(model(train.inputs, last_pos_only=True)[:, -1], train.labels)
    meta = {"epochs": epoch, "train_acc": train_acc, "test_acc": test_acc,
            "data": {"kind": "modular_addition", "modulus": p, "frac_train": frac_train,
                     "seed": data_seed}, "seed": seed, "seconds": time.time() - t0}
    save_transformer(out, model, meta)
    log(f"saved {out}: {epoch} epochs, train acc {train_acc:.4%}, test acc {test_acc:.4%}")
    return meta


def train_digits_mlp(out: Path, hidden: tuple[int, ...] = (64, 64), act_fn: str = "relu",
                     frac_train: float = 0.8, data_seed: int = 0, seed: int = 0,
                     epochs: int = 2000, log: Callable[[str], None] = print) -> dict:
    """Train an MLP classifier on scikit-learn's digits; save to ``out``."""
    model = MLP([64, *hidden, 10], act_fn=act_fn)
    model.init_weights(torch.Generator().manual_seed(seed))
    train = digits(frac_train, data_seed, "train")
    test = digits(frac_train, data_seed, "test")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    x_tr, x_te = train.inputs.float(), test.inputs.float()
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        loss = torch.nn.functional.cross_entropy(model(x_tr), train.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if epoch % 500 == 0:
            log(f"epoch {epoch}: train loss {loss.item():.3e}")
    with torch.no_grad():
        train_acc, test_acc = _accuracy(model(x_tr), train.labels), _accuracy(model(x_te),
                                                                            test.labels)
    meta = {"epochs": epochs, "train_acc": train_acc, "test_acc": test_acc,
            "data": {"kind": "digits", "frac_train": frac_train, "seed": data_seed},
            "seed": seed, "seconds": time.time() - t0}
    save_mlp(out, model, meta)
    log(f"saved {out}: train acc {train_acc:.4%}, test acc {test_acc:.4%}")
    return meta


def make_lm_smoke(out: Path, text: Path, seed: int = 0, n_embd: int = 32, n_layer: int = 2,
                  n_head: int = 4, n_positions: int = 64) -> dict:
    """A tiny random GPT-2 and a word-level tokenizer fitted to ``text`` (one document per
    line), saved with ``save_pretrained`` into the folder ``out``: the model of
    ``jobs/lm-smoke.yaml``. Untrained: the smoke job checks the pipeline, not the features."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train([str(text)], trainers.WordLevelTrainer(special_tokens=[eos, "<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd,
                     n_layer=n_layer, n_head=n_head, bos_token_id=tok.eos_token_id,
                     eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"vocab": len(tok), "parameters": sum(p.numel() for p in model.parameters())}
