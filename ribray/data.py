"""Data sets, generated deterministically from a seed (no downloads).

* Modular addition (paper section 3.1): inputs ``(x, y, =)`` with ``=`` the token ``p``, label
  ``(x + y) mod p``. Pairs are enumerated in row-major (x, y) order; the training set is the first
  ``int(frac_train * p**2)`` entries of ``torch.randperm(p*p)`` seeded with ``seed``, the test set
  the rest, in that permuted order. This matches the reference implementation's split, so its
  checkpoints reach 100% accuracy on both sets.
* Digits: scikit-learn's bundled ``load_digits`` (1797 images of 8x8, pixel values / 16), split by
  a seeded permutation.

A data set is a :class:`Dataset`: model inputs and labels, indexable by sample ranges, so a
worker can take its shard without materialising anyone else's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Dataset:
    """Model inputs (int64 tokens or float features) and integer labels, first axis = sample."""

    inputs: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def slice(self, start: int, stop: int) -> Dataset:
        return Dataset(self.inputs[start:stop], self.labels[start:stop])


def _split(data: Dataset, frac_train: float, seed: int, split: str) -> Dataset:
    """train: the first int(frac_train·n) samples of a permutation seeded with ``seed``; test:
    the rest, in that order; all: everything in the original order."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be train, test or all, got {split!r}")
    if split == "all":
        return data
    n = len(data)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(frac_train * n)
    idx = perm[:n_train] if split == "train" else perm[n_train:]
    return Dataset(data.inputs[idx], data.labels[idx])


def modular_addition(p: int, frac_train: float, seed: int, split: str) -> Dataset:
    """The modular-addition data set (see module docstring). split: train | test | all."""
    x = torch.arange(p).repeat_interleave(p)  # row-major: (0,0), (0,1), ...
    y = torch.arange(p).repeat(p)
    tokens = torch.stack([x, y, torch.full_like(x, p)], dim=1)
    return _split(Dataset(tokens, (x + y) % p), frac_train, seed, split)


def digits(frac_train: float, seed: int, split: str) -> Dataset:
    """scikit-learn's bundled digits (no download), pixels scaled to [0, 1], seeded split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    inputs = torch.tensor(bunch.data, dtype=torch.float64) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    return _split(Dataset(inputs, labels), frac_train, seed, split)


def npz(path: str) -> Dataset:
    """Arrays ``inputs`` (float features or int64 tokens) and ``labels`` (integers) of a
    ``.npz`` file, read without pickles."""
    f = np.load(path, allow_pickle=False)
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not an .npz archive (a single array: save with np.savez)")
    with f:
        missing = {"inputs", "labels"} - set(f.files)
        if missing:
            raise ValueError(f"{path}: no array {sorted(missing)[0]!r} (has {sorted(f.files)})")
        inputs, labels = torch.from_numpy(f["inputs"]), torch.from_numpy(f["labels"])
    if inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: {inputs.shape[0]} inputs but {labels.shape[0]} labels")
    if inputs.is_floating_point():
        inputs = inputs.double()
    return Dataset(inputs, labels.long())


def shard_ranges(n_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of at most ``shard_size`` samples, in order.

    The ranges depend only on the data set size and the shard size, never on the number of
    workers, so per-shard partial sums can be reduced in a fixed order.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    return [(s, min(s + shard_size, n_samples)) for s in range(0, n_samples, shard_size)]
