"""Text data for language models: read, tokenise, pack, cache.

Selection (``data`` of kind ``text``, docs/jobs.md):

1. the ``split`` of a ``datasets`` data set: a hub name (``name`` its configuration), a local
   ``.txt`` (one document per line), ``.json``/``.jsonl`` or ``.parquet`` file, or a folder
   written by ``save_to_disk``;
2. its documents, shuffled with ``seed`` when ``shuffle`` is on, the first ``documents`` kept;
3. each tokenised with the tokenizer (``tokens_column``: taken as token ids), followed by the
   end-of-text token, and all joined into one stream;
4. the stream cut into sequences of ``n_ctx`` tokens (the remainder dropped); the first
   ``n_samples`` sequences are the data set, and their label is the token that follows each
   sequence in the stream (end-of-text after the last). Documents are read lazily and only
   until those sequences are complete.

The sequences are cached as ``.npy`` files named by a hash of everything above (the
tokenizer's vocabulary included, and a local file's size and modification time), written
atomically; workers open them memory-mapped, so each reads only its own shards' rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ribray.data import Dataset

DEFAULT_CACHE = Path("~/.cache/ribray/tokens")
LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class TextDataError(ValueError):
    """Text data that cannot be read or does not fit the model (one line)."""


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TextDataError(f"{name}: no tokenizer could be loaded ({first})") from None


def _documents(spec: Any) -> Any:
    """The split of the data set as a ``datasets.Dataset``."""
    import datasets

    datasets.disable_progress_bars()
    p = Path(spec.path).expanduser()
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()
                           or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if spec.split not in ds:
                    raise TextDataError(f"{spec.path}: no split {spec.split!r} "
                                        f"(has {sorted(ds)})")
                ds = ds[spec.split]
            return ds
        if p.is_file():
            builder = LOCAL_BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise TextDataError(f"{spec.path}: unknown file type {p.suffix!r} (use "
                                    f"{', '.join(sorted(LOCAL_BUILDERS))} or a save_to_disk "
                                    f"folder)")
            return datasets.load_dataset(builder, data_files={spec.split: str(p)},
                                         split=spec.split)
        if p.exists() or spec.path.startswith((".", "/", "~")):
            if not p.exists():
                raise TextDataError(f"{spec.path}: no such file or folder")
            return datasets.load_dataset(str(p), split=spec.split)
        return datasets.load_dataset(spec.path, spec.name, split=spec.split)
    except TextDataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TextDataError(f"{spec.path}: could not read the data set ({first})") from None


def _tokenizer_id(tok: Any) -> str:
    """A fingerprint of a tokenizer's vocabulary and special tokens."""
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tok.eos_token_id]).encode()).hexdigest()


def cache_key(spec: Any, tokenizer_id: str) -> str:
    fields = spec.model_dump(exclude={"cache_dir", "jacobian_samples"})
    p = Path(spec.path).expanduser()
    stamp = [p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else None
    blob = json.dumps({"spec": fields, "tokenizer": tokenizer_id, "file": stamp},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _pack(spec: Any, tok: Any) -> tuple[np.ndarray, np.ndarray]:
    """All sequences of n_ctx tokens of the selection, and each one's next token."""
    ds = _documents(spec)
    col = spec.tokens_column or spec.column
    if col not in ds.column_names:
        raise TextDataError(f"{spec.path}: no column {col!r} (has {ds.column_names})")
    if spec.shuffle:
        ds = ds.shuffle(seed=spec.seed)
    if spec.documents is not None:
        ds = ds.select(range(min(spec.documents, len(ds))))
    eos = tok.eos_token_id if tok is not None else None
    # read documents lazily, and only until the sequences asked for (and the token after the
    # last of them) are there: a hub corpus is far longer than a job needs
    need = None if spec.n_samples is None else spec.n_samples * spec.n_ctx + 1
    stream: list[int] = []
    for rows in ds.iter(batch_size=256):
        for doc in rows[col]:
            stream.extend(list(doc) if spec.tokens_column else tok(doc)["input_ids"])
            if eos is not None:
                stream.append(eos)
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // spec.n_ctx
    arr = np.asarray(stream, dtype=np.int64)
    seqs = arr[: n * spec.n_ctx].reshape(n, spec.n_ctx)
    nxt = (np.arange(n) + 1) * spec.n_ctx  # where each sequence's next token sits
    fill = eos if eos is not None else 0
    labels = np.where(nxt < len(arr), arr[np.minimum(nxt, max(len(arr) - 1, 0))], fill)
    return seqs, labels.astype(np.int64)


def text_dataset(spec: Any, tokenizer: str | None, trust_remote_code: bool = False,
                 vocab: int | None = None) -> Dataset:
    """The selection of ``spec`` (see module docstring), from the cache when it is there.
    ``tokenizer``: the default tokenizer (the model's); ``vocab``: the model's vocabulary,
    which a tokenizer with more tokens than it does not fit."""
    name = spec.tokenizer or tokenizer
    if not spec.tokens_column and not name:
        raise TextDataError("no tokenizer: give data.tokenizer (or data.tokens_column)")
    tok = None if spec.tokens_column else load_tokenizer(name, trust_remote_code)
    if tok is not None and vocab is not None and len(tok) > vocab:
        raise TextDataError(f"the tokenizer {name} has {len(tok)} tokens, the model's "
                            f"vocabulary {vocab}: a tokenizer of another model?")
    key = cache_key(spec, _tokenizer_id(tok) if tok is not None else "pre-tokenised")
    folder = Path(spec.cache_dir or DEFAULT_CACHE).expanduser()
    tokens_f, labels_f = folder / f"{key}.tokens.npy", folder / f"{key}.labels.npy"
    if not (tokens_f.exists() and labels_f.exists()):
        seqs, labels = _pack(spec, tok)
        folder.mkdir(parents=True, exist_ok=True)
        for f, a in ((labels_f, labels), (tokens_f, seqs)):  # tokens last: they mark done
            tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp.npy")
            np.save(tmp, a)
            os.replace(tmp, f)
    tokens = np.load(tokens_f, mmap_mode="c")  # copy-on-write: writable views, nothing read
    labels = np.load(labels_f, mmap_mode="c")
    n = len(tokens) if spec.n_samples is None else spec.n_samples
    if n > len(tokens) or len(tokens) == 0:
        raise TextDataError(f"{spec.path}: {len(tokens)} sequences of {spec.n_ctx} tokens in the "
                            f"selection, {n} asked for (data.n_samples)")
    return Dataset(torch.from_numpy(tokens[:n]), torch.from_numpy(labels[:n]))
