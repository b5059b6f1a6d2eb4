"""Run configuration: one pydantic model, read from YAML, unknown keys rejected.

Relative paths in a config file are resolved against the file's own folder, so a
config can travel with its data.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_SCORE = "combined"  # no single score wins everywhere (docs/how-it-works/scores.md)


class ConfigError(ValueError):
    """A configuration that cannot be run; the message is one line naming the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelFile(_Strict):
    """A model file with the SHA-256 it must have (checked before the pickle is loaded)."""

    path: str = Field(description="The `.model` file (no glob).")
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$",
                        description="Its SHA-256 (64 hex digits; quote it in YAML if all digits).")


class ModelFamily(_Strict):
    """A set of MACE models trained on one dataset with different random seeds."""

    trained_on: str = Field(description="Name of the dataset (key of `datasets`) the seeds were trained on.")
    models: list[str | ModelFile] = Field(
        min_length=1,
        description="MACE `.model` files or globs, one file per seed; or {path, sha256} to pin a file's content.",
    )
    head: str | None = Field(
        None,
        description="Readout head for forces and energies of multi-head models (fine-tuned foundation "
        "models); default: the model's `Default` head, else its last. The latents do not depend on it. "
        "`mace-ood validate` lists the heads.",
    )
    validation: str | None = Field(
        None,
        description="A labelled dataset (key of `datasets`) the models were not trained on, whose structures carry "
        "reference forces (`forces_key`): mace-ood measures the true force RMSE there and maps the ranking score "
        "to a predicted force RMSE and a conformal upper bound in eV/Angstrom for every scored structure.",
    )
    llpr_forces: bool | None = Field(
        None,
        description="A family of one model (no committee force deviation): store LLPR's force Jacobian at extraction "
        "and predict the force error from `llpr_force_std`, LLPR propagated to the forces. One backward pass per "
        "readout feature: 7.8x the extraction time and 1.9x the latent file on the demo's model "
        "(benchmarks/llpr_cost.py --jacobian). Default (null): on for a one-model family with `validation` and "
        "`forces: true`; false: the ranking score predicts the error.",
    )


class Evaluation(_Strict):
    """One (model family, dataset) pair to score."""

    family: str = Field(description="Key of `model_families`.")
    dataset: str = Field(description="Key of `datasets`.")


# Every score, named once: mace_ood.score takes its lists from these.
# Per-atom latent scores; per structure, <name> is the mean over atoms and <name>_max the max.
AtomLatentScoreName = Literal[
    "latent_variance", "aligned_latent_variance", "mahalanobis", "knn_distance", "gmm_nll", "llpr",
]
LatentScoreName = Literal[
    AtomLatentScoreName, "latent_variance_max", "aligned_latent_variance_max", "mahalanobis_max",
    "knn_distance_max", "gmm_nll_max", "llpr_max", "llpr_energy_std",
]
ForceScoreName = Literal["force_deviation_max", "force_deviation_mean", "energy_std_per_atom", "llpr_force_std",
                         "llpr_force_std_max"]
CombinedScoreName = Literal["combined"]
# need two or more models (a committee): a family of one model gets every other score
COMMITTEE_SCORES = ("latent_variance", "latent_variance_max", "aligned_latent_variance", "aligned_latent_variance_max",
                    "force_deviation_max", "force_deviation_mean", "energy_std_per_atom")
# LLPR propagated to the forces: a family of one model only (a committee has its force deviation)
ONE_MODEL_SCORES = ("llpr_force_std", "llpr_force_std_max")
ScoreName = Literal[LatentScoreName, ForceScoreName, CombinedScoreName]
SelectStrategy = Literal["diverse", "top"]
DEFAULT_COMBINED = ["mahalanobis_max", "force_deviation_mean"]  # docs/how-it-works/scores.md: why these two
Device = Literal["auto", "cpu", "cuda"]  # and cuda:N (a pattern, so not a Literal)
DefaultDtype = Literal["float32", "float64"]
Layers = Literal["last", "all"]
Compression = Literal["zstd", "zlib", "none"]


class SelectConfig(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "ood_percentile" in data:
            raise ValueError(
                f"select.ood_percentile was replaced by select.alpha, the false-flag rate "
                f"(ood_percentile {data['ood_percentile']} -> alpha {1 - float(data['ood_percentile']) / 100:g})"
            )
        return data

    top_k: int = Field(30, ge=1, description="Structures selected per evaluation.")
    score: ScoreName = Field(DEFAULT_SCORE, description="Score used for ranking and the `ood` flag.")
    alpha: float = Field(
        0.01, gt=0, lt=1,
        description="False-flag rate of `ood`: a structure is flagged when its conformal p-value against the "
        "calibration part of the family's own training set is at most alpha (docs/how-it-works/ood-flag.md).",
    )
    strategy: SelectStrategy = Field(
        "diverse",
        description="`diverse`: farthest-point picks among the OOD candidates, far from the training set "
        "and from each other; `top`: the K highest scores.",
    )
    score_weight: float = Field(
        0.5, ge=0, le=1,
        description="diverse: how much the score weighs against novelty (0: pure farthest-point; "
        "1: distance times the score's rank fraction).",
    )
    density_weight: float = Field(
        0.0, ge=0,
        description="diverse: exponent of the candidate's local density in its priority (information density). 0 by "
        "default: it multiplies an isolated candidate (one interstitial among many hot frames) by its tiny density, "
        "and such a kind was never picked (tests/select/test_defects.py).",
    )
    trust_max: float | None = Field(
        None,
        description="diverse: candidates whose ranking score is above this are dropped as broken geometries "
        "(like DP-GEN's trust_hi); in the units of `score`.",
    )
    trust_max_force_rmse: float | None = Field(
        None, gt=0,
        description="diverse: candidates whose predicted force RMSE (eV/Angstrom) is above this are dropped, as "
        "DP-GEN's trust_hi; needs a family `validation` dataset.",
    )
    error_level: float = Field(
        0.9, gt=0, lt=1,
        description="Coverage of `force_rmse_upper`: the share of new in-distribution structures whose true force "
        "RMSE it bounds (split conformal on the validation dataset).",
    )
    combine: list[Literal[LatentScoreName, ForceScoreName]] = Field(
        default_factory=lambda: list(DEFAULT_COMBINED),
        min_length=1,
        description="Scores the `combined` score takes the most surprising of, each as its p-value against the "
        "calibration structures (a `_max` against their atoms, size-aware); those not computed in a run "
        "(force scores without `forces: true`) are left out, and the run says so.",
    )


class ScoresConfig(_Strict):
    knn_k: int = Field(10, ge=1, description="Neighbours of the k-NN distance.")
    reference_max_atoms: int = Field(
        20000, ge=10, description="Reference atoms sampled for fitting (alignment, covariance, GMM, k-NN)."
    )
    gmm_components: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8], description="Mixture sizes tried; BIC picks one. [] disables."
    )
    gmm_max_atoms: int = Field(5000, ge=10, description="Reference atoms the GMM is fitted on.")
    ridge: float = Field(1e-3, ge=0, description="Covariance ridge, relative to the mean variance.")
    group_by: str = Field(
        "auto", min_length=1,
        description="The training set's independent units, what the ood flag is calibrated over: `auto` (MD runs "
        "found in each file where the atom count, species order, periodicity or cell changes, the atoms jump or "
        "an MD step counter restarts), `file`, `blocks` (`split_block_frames` consecutive frames), or an "
        "`atoms.info` key naming each frame's run (mace's `config_type`, a trajectory id).",
    )
    folds: int = Field(
        10, ge=2,
        description="Cross-conformal folds of whole groups: every training structure is scored by the reference "
        "fitted without its fold (each group its own fold when there are at most this many).",
    )
    split_seed: int = Field(0, description="Salt of the hash that deals the groups into folds.")
    split_block_frames: int = Field(
        10, ge=1,
        description="Frames per block where groups are blocks (`group_by: blocks`, or `auto` finding a single run).",
    )

    @model_validator(mode="before")
    @classmethod
    def _replaced(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old in ("calibration_fraction", "split_gap_frames"):
                if old in data:
                    raise ValueError(f"scores.{old} is gone: every training structure is now calibrated out of fold "
                                     "(scores.folds, scores.group_by; docs/how-it-works/ood-flag.md)")
        return data


class MetadataConfig(_Strict):
    patterns: list[str] = Field(
        default_factory=list,
        description="Extra regexes with named groups, matched against each structure's name; "
        "every named group becomes a report column.",
    )

    @field_validator("patterns")
    @classmethod
    def _compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"metadata pattern {pattern!r} is not a valid regex: {exc}") from None
            if not compiled.groupindex:
                raise ValueError(f"metadata pattern {pattern!r} has no named group (?P<name>...)")
        return patterns


class JobQueueConfig(_Strict):
    """A batch-queue cluster (dask-jobqueue): each job starts `processes` Dask workers."""

    queue: str | None = Field(None, description="Partition / queue.")
    account: str | None = Field(None, description="Account / project to charge.")
    walltime: str = Field("02:00:00", description="Walltime of each job.")
    cores: int = Field(8, ge=1, description="Cores per job.")
    memory: str = Field("32GB", description="Memory per job.")
    processes: int = Field(1, ge=1, description="Dask workers per job (one per GPU with GPUs).")
    gpus_per_job: int = Field(0, ge=0, description="GPUs per job; each worker then declares GPU=gpus/processes.")
    job_script_prologue: list[str] = Field(
        default_factory=list, description="Shell lines run before the workers start, e.g. `module load cuda`."
    )
    job_extra_directives: list[str] = Field(default_factory=list, description="Extra #SBATCH / #PBS lines.")
    min_jobs: int = Field(0, ge=0, description="Adaptive scaling: fewest jobs.")
    max_jobs: int = Field(4, ge=1, description="Adaptive scaling: most jobs.")
    interface: str | None = Field(None, description="Network interface of the workers (e.g. ib0).")
    log_directory: str | None = Field(None, description="Where the jobs' logs go; default `<output_dir>/jobs`.")
    worker_start_timeout: float = Field(
        3600, gt=0, description="Seconds from the first job's submission to the first Dask worker before the run "
        "stops, naming the jobs and squeue's reason (a job that ends before its worker starts stops it at once)."
    )


class TLSFiles(_Strict):
    """The client's TLS files for an existing cluster started with ``--tls-ca-file/--tls-cert/--tls-key``."""

    ca_file: str = Field(description="The cluster's certificate authority (PEM).")
    cert: str = Field(description="This client's certificate (PEM).")
    key: str = Field(description="This client's private key (PEM).")


class DaskConfig(_Strict):
    cluster: Literal["local", "slurm", "pbs"] = Field(
        "local", description="local: a cluster on this machine; slurm/pbs: dask-jobqueue (see `jobqueue`)."
    )
    jobqueue: JobQueueConfig | None = Field(None, description="Batch-queue settings for cluster slurm/pbs.")
    n_workers: int | None = Field(
        None, ge=1, description="Workers of the local cluster; default: one per GPU, else min(4, CPU cores)."
    )
    address: str | None = Field(
        None, description="Address of an existing Dask scheduler, e.g. tcp://host:8786."
    )
    security: bool | TLSFiles = Field(
        True, description="local and slurm/pbs: true, the scheduler and workers talk TLS with credentials made for "
        "the run, so no one else who reaches their ports gets in; false: plain TCP (the run log says so). With "
        "`address`: the `{ca_file, cert, key}` of a tls:// cluster."
    )

    @model_validator(mode="after")
    def _one_of(self) -> DaskConfig:
        if self.address and self.n_workers:
            raise ValueError("dask: give either `address` or `n_workers`, not both")
        if self.address and self.cluster != "local":
            raise ValueError("dask: give either `address` or `cluster`, not both")
        if self.cluster != "local" and self.jobqueue is None:
            self.jobqueue = JobQueueConfig()
        if isinstance(self.security, TLSFiles) and not self.address:
            raise ValueError("dask.security: TLS files are for an existing cluster (`address`); a local or "
                             "slurm/pbs cluster makes its own credentials (security: true)")
        return self


class ExtractionSettings(_Strict):
    """What changes the latents (or how they are stored); recorded in every latent file."""

    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto | cpu | cuda | cuda:N. auto and cuda: each Dask worker takes its own GPU "
        "(mace_ood.extract.devices); cuda:N pins every worker to GPU N.",
    )
    default_dtype: DefaultDtype = Field(
        "float64", description="dtype the models are run in (always explicit)."
    )
    batch_size: int | None = Field(
        None, ge=1, description="Maximum structures per forward pass; unset (the default): as many as "
        "`max_atoms_per_batch` holds, so many small structures share one pass.",
    )
    max_atoms_per_batch: int = Field(
        4096, ge=1, description="Atom budget of one forward pass; a larger structure runs alone."
    )
    layers: Layers = Field(
        "last",
        description="`last`: the invariants the readout sees (last layer); `all`: every layer's invariants.",
    )
    forces: bool = Field(
        True,
        description="Also store each seed's forces and energies (same forward pass, needs autograd: about 2x "
        "the latent-only pass on the demo); the default `combined` score uses the force deviation, and "
        "`mace-ood evaluate` the errors. `false`: latents only, and `combined` is then Mahalanobis alone.",
    )
    refresh: bool = Field(
        False, description="Recompute every latent file: no reuse of finished files, no resume, no copies."
    )
    chunk_atoms: int = Field(16384, ge=64, description="netCDF chunk length along atoms.")
    compression: Compression = Field(
        "zstd",
        description="netCDF compression of latents; zstd wrote 7x faster than zlib for 7% larger files "
        "(benchmarks/scoring.py). netCDF4/xarray read it as is; h5py needs hdf5plugin.",
    )


class RunConfig(ExtractionSettings):
    """Everything one mace-ood run needs. Flow parameter and YAML file alike."""

    output_dir: Path = Field(description="Where latents, scores and reports go.")
    datasets: dict[str, list[str]] = Field(
        description="Dataset name -> structure files or globs (anything ase.io.read reads)."
    )
    model_families: dict[str, ModelFamily] = Field(description="Family name -> seeds + training set.")
    evaluations: Literal["cross"] | list[Evaluation] = Field(
        "cross", description="`cross`: each family scores every dataset it was not trained on."
    )
    reference: bool = Field(
        True,
        description="Report each family's own training set as an evaluation too. Its latents are "
        "always extracted: the reference-based scores and percentiles are fitted on them.",
    )
    ood_labels: dict[str, bool] = Field(
        default_factory=dict,
        description="For `mace-ood evaluate`: dataset -> true (out of distribution) / false (in). "
        "Unlabelled datasets take the cross-evaluation's natural label (own training set: in; others: out).",
    )
    energy_key: str = Field(
        "REF_energy", description="atoms.info key of the reference energy (eV) that calibrates LLPR's alpha on "
        "the `validation` dataset, else on the held-out training structures (a calculator's energy is taken "
        "when the key is absent).",
    )
    forces_key: str = Field(
        "REF_forces", description="atoms.arrays key of the reference forces of a `validation` dataset "
        "(a calculator's forces are taken when the key is absent).",
    )
    select: SelectConfig = Field(default_factory=SelectConfig,
                                 description="The ranking score, the `ood` flag and the batch sent to DFT.")
    scores: ScoresConfig = Field(default_factory=ScoresConfig,
                                 description="The reference fits and the out-of-fold calibration of the scores.")
    metadata: MetadataConfig = Field(default_factory=MetadataConfig,
                                     description="Report columns parsed from structure names.")
    dask: DaskConfig = Field(default_factory=DaskConfig,
                             description="Where the tasks run: a local cluster, an existing scheduler or SLURM/PBS.")

    @field_validator("datasets")
    @classmethod
    def _non_empty_datasets(cls, datasets: dict[str, list[str]]) -> dict[str, list[str]]:
        if not datasets:
            raise ValueError("datasets: at least one dataset is needed")
        for name, patterns in datasets.items():
            if not patterns:
                raise ValueError(f"datasets.{name}: no files given")
        return datasets

    @model_validator(mode="after")
    def _forces_for_force_scores(self) -> RunConfig:
        """A ranking score this config cannot compute fails here, before any work, not at report time."""
        force_scores, gmm_scores = get_args(ForceScoreName), ("gmm_nll", "gmm_nll_max")
        if self.select.score in force_scores and not self.forces:
            raise ValueError(f"select.score: {self.select.score} needs `forces: true`")
        if self.select.score in gmm_scores and not self.scores.gmm_components:
            raise ValueError(f"select.score: {self.select.score} needs a mixture (`scores.gmm_components` is empty)")
        if self.select.score == "combined":
            usable = [c for c in self.select.combine if (self.forces or c not in force_scores)
                      and (self.scores.gmm_components or c not in gmm_scores)]
            if not usable:
                raise ValueError(
                    f"select.combine: none of {', '.join(self.select.combine)} is computed with this config "
                    "(force scores need `forces: true`, gmm_nll needs `scores.gmm_components`); add a latent "
                    "score such as mahalanobis_max"
                )
        return self

    @model_validator(mode="after")
    def _names_exist(self) -> RunConfig:
        for family_name, family in self.model_families.items():
            if family.trained_on not in self.datasets:
                raise ValueError(
                    f"model_families.{family_name}.trained_on: unknown dataset {family.trained_on!r} "
                    f"(datasets: {', '.join(self.datasets)})"
                )
        if isinstance(self.evaluations, list):
            for evaluation in self.evaluations:
                if evaluation.family not in self.model_families:
                    raise ValueError(f"evaluations: unknown family {evaluation.family!r}")
                if evaluation.dataset not in self.datasets:
                    raise ValueError(f"evaluations: unknown dataset {evaluation.dataset!r}")
        for dataset in self.ood_labels:
            if dataset not in self.datasets:
                raise ValueError(f"ood_labels: unknown dataset {dataset!r}")
        for family_name, family in self.model_families.items():
            if family.validation is None:
                continue
            where = f"model_families.{family_name}.validation"
            if family.validation not in self.datasets:
                raise ValueError(f"{where}: unknown dataset {family.validation!r}")
            if family.validation == family.trained_on:
                raise ValueError(f"{where}: {family.validation!r} is the training set; name a labelled dataset the "
                                 "models were not trained on")
            if not self.forces:
                raise ValueError(f"{where}: a predicted force error needs the models' forces (`forces: true`)")
        if self.select.trust_max_force_rmse is not None and not any(
                f.validation for f in self.model_families.values()):
            raise ValueError("select.trust_max_force_rmse: needs a family with a `validation` dataset")
        return self

    def extraction_settings(self) -> ExtractionSettings:
        return ExtractionSettings(**{k: getattr(self, k) for k in ExtractionSettings.model_fields})

    def evaluation_pairs(self) -> list[tuple[str, str, bool]]:
        """(family, dataset, is_reference) for every evaluation to run, in a stable order."""
        pairs: list[tuple[str, str, bool]] = []
        if self.evaluations == "cross":
            for family_name, family in self.model_families.items():
                for dataset in self.datasets:
                    if dataset != family.trained_on:
                        pairs.append((family_name, dataset, False))
        else:
            for evaluation in self.evaluations:
                trained_on = self.model_families[evaluation.family].trained_on
                pairs.append((evaluation.family, evaluation.dataset, evaluation.dataset == trained_on))
        if self.reference:
            for family_name, family in self.model_families.items():
                if (family_name, family.trained_on, True) not in pairs:
                    pairs.append((family_name, family.trained_on, True))
        return pairs


def _format_error(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key {location!r}"
    if error["type"] == "missing":
        return f"missing key {location!r}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{location}: {message}" if location else message


def config_from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a mapping into a RunConfig, raising ConfigError with a one-line message."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_format_error(error) for error in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None


def _resolve(path_or_glob: str, base_dir: Path) -> str:
    path = Path(os.path.expandvars(path_or_glob)).expanduser()
    return str(path if path.is_absolute() else base_dir / path)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config; ``$VARS`` and ``~`` in paths are expanded, relative paths are taken
    from the config file's folder.

    Parameters
    ----------
    path
        YAML file.
    overrides
        Top-level keys that replace the file's values (CLI flags); ``None`` values are ignored.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    base_dir = path.resolve().parent
    if isinstance(data.get("datasets"), dict):
        data["datasets"] = {
            name: [_resolve(p, base_dir) for p in ([files] if isinstance(files, str) else files or [])]
            for name, files in data["datasets"].items()
        }
    if isinstance(data.get("model_families"), dict):
        for family in data["model_families"].values():
            if isinstance(family, dict) and "models" in family:
                models = family["models"]
                family["models"] = [
                    {**p, "path": _resolve(str(p["path"]), base_dir)} if isinstance(p, dict) and "path" in p
                    else _resolve(p, base_dir) if isinstance(p, str) else p
                    for p in ([models] if isinstance(models, str) else models)
                ]
    if "output_dir" in data and data["output_dir"] is not None:
        data["output_dir"] = _resolve(str(data["output_dir"]), base_dir)
    return config_from_dict(data, source=str(path))

