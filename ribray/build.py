"""From a validated job to the objects the math works on: sequential model, model inputs."""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

import torch

from ribray.checkpoints import load_model
from ribray.config import DigitsData, JobSpec, ModAddData, NpzData, TextData
from ribray.data import Dataset, digits, modular_addition, npz
from ribray.math.jacobian import integration_points
from ribray.math.lib import Sources, closed_sections, m_from_sums
from ribray.math.sequential import SequentialModel, to_sequential
from ribray.pipeline import BasisSettings, ClosedM, m_pairs
from ribray.shards import ComputeSettings

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def load_sequential(job: JobSpec) -> SequentialModel:
    """The job's model in sequential form (raises CheckpointError with one clear line)."""
    spec = job.model
    if spec.format == "hf":
        from ribray.hf import hf_to_sequential, load_hf

        return hf_to_sequential(load_hf(spec.path, DTYPES[spec.dtype], spec.trust_remote_code))
    model, _ = load_model(Path(spec.path), spec.format, DTYPES[spec.dtype],
                          Path(spec.config) if spec.config else None)
    return to_sequential(model, last_pos_only=spec.last_pos_only).eval()


def load_data(job: JobSpec, vocab: int | None = None) -> Dataset:
    """The job's data set; a text data set is tokenised with the model's tokenizer (an hf
    model's folder or hub name) and checked against the model's vocabulary ``vocab``."""
    tok = job.model.path if job.model.format == "hf" else None
    return load_dataset(job.data, tokenizer=tok, vocab=vocab,
                        trust_remote_code=job.model.trust_remote_code)


def load_dataset(d: ModAddData | DigitsData | NpzData | TextData, tokenizer: str | None = None,
                 vocab: int | None = None, trust_remote_code: bool = False) -> Dataset:
    """The samples a data spec selects (raises ValueError for an unreadable npz file or text
    data that cannot be read or does not fit the model)."""
    if isinstance(d, TextData):
        from ribray.text import text_dataset

        return text_dataset(d, tokenizer, trust_remote_code, vocab)
    if isinstance(d, ModAddData):
        ds = modular_addition(d.modulus, d.frac_train, d.seed, d.split)
    elif isinstance(d, DigitsData):
        ds = digits(d.frac_train, d.seed, d.split)
    elif isinstance(d, NpzData):
        ds = npz(d.path)
    else:  # pragma: no cover - pydantic guarantees one of the above
        raise TypeError(type(d))
    if d.n_samples is not None:
        ds = ds.slice(0, min(d.n_samples, len(ds)))
    return ds


def compute_settings(job: JobSpec) -> ComputeSettings:
    bi, ei = job.basis.integration, job.edges.integration
    return ComputeSettings(batch_size=job.ray.batch_size,
                           basis_points=integration_points(bi.rule, bi.n),
                           edge_points=integration_points(ei.rule, ei.n),
                           jacobians=job.jacobians,
                           sources=(Sources(job.sources.r, job.sources.seed)
                                    if job.sources is not None else None),
                           memory_budget=(int(job.ray.memory_budget_gb * 2**30)
                                          if job.ray.memory_budget_gb is not None else None))


def jacobian_samples(job: JobSpec, n_samples: int) -> int:
    """How many samples (the first ones) M and the edges use: ``data.jacobian_samples`` of a
    text data set, capped at the data set; every sample otherwise."""
    n = getattr(job.data, "jacobian_samples", None)
    return n_samples if n is None else min(n, n_samples)


#: the most memory the Gram pass's per-shard sums of closed-form sections may take (bytes)
SECTION_SUMS_BUDGET = 2**30


def closed_m(job: JobSpec, model: SequentialModel, n_samples: int, n_shards: int
             ) -> dict[tuple[str, str], ClosedM]:
    """The sections whose M the recursion takes from the Gram pass's
    :class:`~ribray.math.accumulators.ActSums` (``pipeline.run``'s ``closed``): the
    position-wise ones of the ``auto`` path, when M and the Gram use the same samples and
    their per-shard sums (Σ g gᵀ, m × m each) fit :data:`SECTION_SUMS_BUDGET`."""
    if jacobian_samples(job, n_samples) != n_samples:
        return {}
    settings = compute_settings(job)
    parts = closed_sections(model, m_pairs(list(job.basis.node_layers), job.basis.kind),
                            settings.jacobians)
    size = sum(8 * p.A.shape[1] ** 2 for p in parts.values() if p.A is not None) * n_shards
    if size > SECTION_SUMS_BUDGET:
        return {}
    return {pair: partial(m_from_sums, p, points=settings.basis_points)
            for pair, p in parts.items()}


def basis_settings(job: JobSpec) -> BasisSettings:
    b = job.basis
    return BasisSettings(kind=b.kind, threshold=b.truncation_threshold,
                         threshold_mode=b.threshold_mode, rotate_final=b.rotate_final,
                         compute_edges=job.edges.enabled)


def fingerprint_file(path: str | Path) -> str:
    """sha256 of a checkpoint file; of a model folder, over its files' names and contents in
    name order; a Hugging Face hub name that is not a local path is recorded as ``hf:NAME``
    (its files live in the hub cache)."""
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f.relative_to(p).as_posix().encode())
            h.update(_file_digest(f).encode())
        return h.hexdigest()
    if not p.exists() and not str(path).startswith((".", "/", "~")):
        return f"hf:{path}"
    return _file_digest(p)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
