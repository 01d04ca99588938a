"""The job file: YAML validated with pydantic; unknown fields are errors.

Relative paths in a job file are resolved against the working directory the command runs in (the
repository root for the shipped jobs; the Ray Jobs ``working_dir`` on a cluster). See
docs/jobs.md for every field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    path: str = Field(description="checkpoint file; for format hf a model folder or hub name")
    format: Literal["ribray", "tlens", "reference-mlp", "hf"] = "ribray"
    trust_remote_code: bool = Field(False, description="hf: let transformers run the model "
                                                       "repository's own code")
    config: str | None = Field(None, description="config.yaml for tlens/reference-mlp; default: "
                                                 "beside the checkpoint")
    dtype: Literal["float32", "float64"] = "float64"
    last_pos_only: bool = Field(True, description="transformers: only the last position leaves "
                                                  "the last attention (modular addition)")


class ModAddData(Strict):
    kind: Literal["modular-addition"] = "modular-addition"
    modulus: Annotated[int, Field(ge=2)] = 113
    frac_train: Annotated[float, Field(gt=0, lt=1)] = 0.3
    seed: int = 0
    split: Literal["train", "test", "all"] = "train"
    n_samples: Annotated[int | None, Field(ge=1)] = None


class DigitsData(Strict):
    kind: Literal["digits"] = "digits"
    frac_train: Annotated[float, Field(gt=0, lt=1)] = 0.8
    seed: int = 0
    split: Literal["train", "test", "all"] = "train"
    n_samples: Annotated[int | None, Field(ge=1)] = None


class NpzData(Strict):
    """Inputs and labels from a ``.npz`` file (arrays ``inputs`` and ``labels``; no pickles)."""

    kind: Literal["npz"] = "npz"
    path: str = Field(description=".npz file with arrays `inputs` and `labels`")
    n_samples: Annotated[int | None, Field(ge=1)] = None


class TextData(Strict):
    """Text for a language model: a ``datasets`` hub name, or a local text/json/jsonl/parquet
    file or ``save_to_disk`` folder; tokenised with the model's tokenizer (or read as token
    ids from ``tokens_column``), documents joined with the end-of-text token and cut into
    sequences of ``n_ctx`` tokens (docs/jobs.md, *Text data*)."""

    kind: Literal["text"] = "text"
    path: str = Field(description="hub name, local file or folder")
    name: str | None = Field(None, description="the data set's configuration name (hub)")
    split: str = "train"
    column: str = Field("text", description="the text column")
    tokens_column: str | None = Field(None, description="a column of token ids instead of "
                                                        "text (no tokenizer)")
    tokenizer: str | None = Field(None, description="tokenizer folder or hub name; default: "
                                                    "the model's")
    n_ctx: Annotated[int, Field(ge=2, description="tokens per sequence")]
    documents: Annotated[int | None, Field(ge=1, description="documents read (after "
                                                             "shuffling); default all")] = None
    shuffle: bool = Field(False, description="shuffle the documents (seeded) before reading")
    seed: int = 0
    n_samples: Annotated[int | None, Field(ge=1, description="sequences for the statistics "
                                                             "(Gram/PCA); default all")] = None
    jacobian_samples: Annotated[int | None, Field(ge=1, description=(
        "the first this many sequences are used for M and the edges; default all"))] = None
    cache_dir: str | None = Field(None, description="token cache; default "
                                                    "~/.cache/ribray/tokens")


DataSpec = Annotated[ModAddData | DigitsData | NpzData | TextData,
                     Field(discriminator="kind")]


class Integration(Strict):
    rule: Literal["gradient", "trapezoidal", "gauss-legendre"] = "gradient"
    n: Annotated[int, Field(ge=0, description="intervals (trapezoidal) or nodes - 1 "
                                              "(gauss-legendre); 0 for gradient")] = 0

    @model_validator(mode="after")
    def _gradient_has_no_points(self) -> Integration:
        if self.rule == "gradient" and self.n != 0:
            raise ValueError("rule 'gradient' takes n = 0 (one point at alpha = 1)")
        return self


class BasisSpec(Strict):
    kind: Literal["lib", "gib", "pca", "neuron"] = "lib"
    node_layers: Annotated[list[str], Field(min_length=2)]
    truncation_threshold: Annotated[float, Field(ge=0)] = 1e-15
    threshold_mode: Literal["absolute", "relative"] = "absolute"
    rotate_final: bool = False
    integration: Integration = Integration()

    @model_validator(mode="after")
    def _distinct(self) -> BasisSpec:
        if len(set(self.node_layers)) != len(self.node_layers):
            raise ValueError("node_layers must be distinct")
        if "output" in self.node_layers[:-1]:
            raise ValueError("'output' can only be the last node layer")
        return self


class EdgesSpec(Strict):
    enabled: bool = True
    integration: Integration = Integration()


class FeaturesSpec(Strict):
    """Examples for feature visualisation (paper figures 11-12), per LIB feature of the
    listed node layers (docs/jobs.md, *features*)."""

    layers: Annotated[list[str], Field(min_length=1, description="node layers of the job")]
    top_k: Annotated[int, Field(ge=1, le=1000)] = 10
    context: Annotated[int, Field(ge=1, le=1024, description="tokens kept up to and "
                                                             "including each example's")] = 8
    intervals: Annotated[int, Field(ge=1, le=100)] = 6
    per_interval: Annotated[int, Field(ge=1, le=100)] = 3
    pool_every: Annotated[int, Field(ge=1, description="about one (sample, position) in this "
                                                       "many is pooled for the intervals")] = 64


class SourcesSpec(Strict):
    """Stochastic sources over output positions (paper appendix C, eqs. 23-25)."""

    r: Annotated[int, Field(ge=1, description="draws per sample (the paper's R)")] = 1
    seed: int = Field(0, description="with each sample's index, seeds its draws")


class RaySpec(Strict):
    num_workers: Annotated[int | None, Field(ge=1, description="default: cluster GPUs / "
                                                               "gpus_per_worker, else cluster "
                                                               "CPUs / cpus_per_worker")] = None
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1
    gpus_per_worker: Annotated[float | None, Field(ge=0, description="default: 1 when the "
                                                                      "cluster has GPUs, else 0"
                                                   )] = None
    shard_size: Annotated[int, Field(ge=1, description="samples per shard")] = 512
    batch_size: Annotated[int, Field(ge=1, description="samples per forward pass")] = 256
    memory_budget_gb: Annotated[float | None, Field(gt=0, description=(
        "memory one worker may use for a batch of the exact Jacobian path (the batch is cut "
        "to fit); null: 80% of a GPU's memory, 4 GiB on a CPU"))] = None
    keep_partials_after_s: Annotated[float, Field(ge=0, description=(
        "a phase keeps its shards' partial sums in the store (for resuming) once it has run "
        "this long; shorter phases are cheaper to compute again"))] = 5.0
    autoscaling: bool = Field(False, description="the cluster adds nodes on demand: the worker "
                                                 "count and GPUs per worker are taken as given "
                                                 "and not checked against the nodes up now")

    @model_validator(mode="after")
    def _explicit_when_autoscaling(self) -> RaySpec:
        if self.autoscaling and (self.num_workers is None or self.gpus_per_worker is None):
            raise ValueError("ray.autoscaling needs ray.num_workers and ray.gpus_per_worker "
                             "(an autoscaling cluster's current size says nothing of what it "
                             "can hold)")
        return self


DEFAULT_EXCLUDES = [".git", ".venv", ".ci-venv", "results", "*.zarr", "__pycache__"]


class RuntimeEnvSpec(Strict):
    """How ``ribray submit --address http://...`` ships the job to a cluster (Ray Jobs
    ``runtime_env``); ignored by a direct run."""

    working_dir: str | None = Field(None, description="local folder (relative to the working "
                                                      "directory) or remote URI uploaded as the "
                                                      "job's working directory; null: no upload")
    env_vars: dict[str, str] = Field(default_factory=dict, description="environment of the "
                                                                       "driver and workers")
    excludes: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDES),
                                description="gitignore-style patterns left out of the upload")
    pip: list[str] = Field(default_factory=list, description="pip requirements installed on "
                                                             "the cluster for this job")

    @field_validator("env_vars")
    @classmethod
    def _no_ray_address(cls, v: dict[str, str]) -> dict[str, str]:
        if "RAY_ADDRESS" in v:
            raise ValueError("RAY_ADDRESS is set by Ray Jobs on the cluster; remove it")
        return v


class JobSpec(Strict):
    name: str
    model: ModelSpec
    data: DataSpec
    basis: BasisSpec
    edges: EdgesSpec = EdgesSpec()
    ray: RaySpec = RaySpec()
    runtime_env: RuntimeEnvSpec = RuntimeEnvSpec()
    features: FeaturesSpec | None = Field(None, description=(
        "top, bottom and interval examples of each LIB feature of some node layers; null: "
        "none"))
    sources: SourcesSpec | None = Field(None, description=(
        "stochastic ±1 sources over output positions for M and the edges; null: exact sums "
        "over every output position"))
    jacobians: Literal["auto", "exact"] = Field("auto", description=(
        "auto: closed forms for sections whose only nonlinearity is elementwise and the "
        "by-parts attention Jacobian where it fits in memory, the per-feature autograd path "
        "elsewhere; exact: the per-feature autograd path everywhere (the reference)"))
    out: str = Field(description="Zarr store to write")

    @model_validator(mode="after")
    def _feature_layers(self) -> JobSpec:
        if self.features is not None:
            missing = [n for n in self.features.layers if n not in self.basis.node_layers]
            if missing:
                raise ValueError(f"features.layers: {missing[0]!r} is not one of "
                                 f"basis.node_layers")
        return self

    def fingerprint(self) -> str:
        """sha256 of the resolved job (stable field order), without ``runtime_env``: how a job
        is shipped to a cluster does not change its results, and leaving it out keeps the
        ``config_hash`` of stores written before the field existed."""
        cfg = self.model_dump(exclude={"runtime_env"})
        return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


class JobFileError(ValueError):
    """One line: file, field and reason."""


def _loc(err: dict) -> str:
    parts = [str(p) for p in err.get("loc", ()) if p not in ("modular-addition", "digits", "npz")]
    return ".".join(parts) or "(top level)"


def _load(path: str | Path, model: type[BaseModel]):
    path = Path(path)
    if not path.is_file():
        raise JobFileError(f"{path}: job file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise JobFileError(f"{path}: {where}: not valid YAML ({getattr(exc, 'problem', exc)})"
                           ) from None
    if raw is None and model is AnalysisSpec:
        raw = {}
    if not isinstance(raw, dict):
        raise JobFileError(f"{path}: (top level): expected a mapping of fields")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        msg = err["msg"].removeprefix("Value error, ")
        raise JobFileError(f"{path}: field {_loc(err)}: {msg}{more}") from None


def load_job(path: str | Path) -> JobSpec:
    """Read and validate a job file; raises :class:`JobFileError` with one clear line."""
    return _load(path, JobSpec)


# --- the analysis job (``ribray analyze``) -------------------------------------------------


class ScoreSpec(Strict):
    kind: Literal["accuracy", "ce_loss"] = Field(
        "accuracy", description="accuracy (classifiers) or ce_loss (cross-entropy, nats)")
    tolerance: Annotated[float | None, Field(ge=0, description=(
        "allowed change from the unablated score: accuracy may drop by this fraction "
        "(0.001 = 0.1 percentage point), ce_loss may rise by this many nats; default 0.001 "
        "for accuracy, 0.1 for ce_loss (the paper's targets)"))] = None

    @property
    def resolved_tolerance(self) -> float:
        if self.tolerance is not None:
            return self.tolerance
        return 0.001 if self.kind == "accuracy" else 0.1


class EdgeAblationSpec(Strict):
    enabled: bool = True
    probes_per_round: Annotated[int, Field(ge=1, le=64, description=(
        "counts evaluated per round of the search for each layer pair (1: bisection); the "
        "result depends on this, never on the number of workers"))] = 1


class NodeAblationSpec(Strict):
    enabled: bool = True
    points: Annotated[int | None, Field(ge=2, description=(
        "kept-feature counts per layer, log-spaced from 1 to all; default: every count"))] = None


class ModularitySpec(Strict):
    enabled: bool = True
    resolutions: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] = [1.0, 0.5]
    seed: int = 0

    @model_validator(mode="after")
    def _distinct(self) -> ModularitySpec:
        names = [f"{g:g}" for g in self.resolutions]
        if len(set(names)) != len(names):
            raise ValueError("resolutions must be distinct (as printed with 6 significant "
                             "digits: they name the store's groups)")
        return self


class LabelsSpec(Strict):
    fourier: Literal["auto", "on", "off"] = Field(
        "auto", description="Fourier labels of appendix F; auto: for modular-addition data")
    top: Annotated[int, Field(ge=1, le=10)] = 3

    @field_validator("fourier", mode="before")
    @classmethod
    def _yaml_bool(cls, v):
        """YAML reads unquoted on/off as booleans."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class PlotsSpec(Strict):
    enabled: bool = True
    formats: Annotated[list[Literal["png", "svg"]], Field(min_length=1)] = ["png", "svg"]
    edge_width: Literal["sqrt", "squared"] = Field(
        "sqrt", description="edge line width proportional to sqrt(E) or E^2")
    merge_output: bool = Field(False, description="draw the last node layer as one node")
    max_nodes_per_layer: Annotated[int, Field(ge=1)] = 60


class AnalysisRaySpec(Strict):
    num_workers: Annotated[int | None, Field(ge=1)] = None
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1
    gpus_per_worker: Annotated[float | None, Field(ge=0)] = None
    batch_size: Annotated[int, Field(ge=1, description="samples per forward pass")] = 2048


class AnalysisSpec(Strict):
    """``ribray analyze`` settings; every field has a default (an empty file is valid)."""

    name: str | None = None
    node_layers: Annotated[list[str] | None, Field(min_length=2, description=(
        "consecutive node layers of the store to analyse; default: all of them"))] = None
    data: dict = Field(default_factory=dict, description=(
        "fields merged over the store's data spec; default: split test where there is one"))
    score: ScoreSpec = ScoreSpec()
    edge_ablation: EdgeAblationSpec = EdgeAblationSpec()
    node_ablation: NodeAblationSpec = NodeAblationSpec()
    modularity: ModularitySpec = ModularitySpec()
    labels: LabelsSpec = LabelsSpec()
    plots: PlotsSpec = PlotsSpec()
    ray: AnalysisRaySpec = AnalysisRaySpec()
    report: str | None = Field(None, description="folder for plots and report.html; default: "
                                                 "beside the store, STORE_NAME-report")


def load_analysis(path: str | Path) -> AnalysisSpec:
    """Read and validate an analysis job file (one clear line on error)."""
    return _load(path, AnalysisSpec)
