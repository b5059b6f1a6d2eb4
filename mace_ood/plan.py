"""The plan of a run: files and models resolved and checked, one job per (family, seed, dataset)."""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mace_ood.config import ModelFile, RunConfig
from mace_ood.extract.models import ModelError, check_family, describe_model, sha256_of
from mace_ood.paths import RunPaths
from mace_ood.records import EvaluationPlan, ExtractionJob, own_evaluation, validation_evaluations
from mace_ood.structures import InputError, count_structures, resolve_files

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """Everything a run will do, found before any of it is done: made once (by the CLI,
    ``mace_ood.run`` or a deployment's flow) and handed to the flow, which does not make it again."""

    output_dir: str
    jobs: list[ExtractionJob] = field(default_factory=list)
    evaluations: list[EvaluationPlan] = field(default_factory=list)
    models: dict[str, list[dict]] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.output_dir)

    def own(self, family: str) -> EvaluationPlan:
        """``family`` on its own training set."""
        return own_evaluation(self.evaluations, family)

    def validation(self) -> dict[str, EvaluationPlan]:
        """Each family's evaluation on its labelled validation set, where it has one."""
        return validation_evaluations(self.evaluations)


def resolve_models(family: str, entries: list[str | ModelFile]) -> list[str]:
    """Model files of a family, globs expanded; pinned SHA-256s are checked before any load."""
    paths: list[str] = []
    for entry in entries:
        pattern = entry.path if isinstance(entry, ModelFile) else entry
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise ModelError(f"family {family!r}: {pattern}: matches no model file")
        if isinstance(entry, ModelFile):
            for match in matches:
                actual = sha256_of(match)
                if actual != entry.sha256.lower():
                    raise ModelError(f"{match}: SHA-256 is {actual}, the config pins {entry.sha256.lower()}; not loading it")
        paths.extend(str(Path(m).resolve()) for m in matches)
    return list(dict.fromkeys(paths))


def check_labelled(files: list[str], dataset: str, family: str, forces_key: str) -> None:
    """A validation dataset's first structure must carry reference forces; refused in one line."""
    import ase.io

    from mace_ood.score.errors import reference_forces

    first = ase.io.read(files[0], index=0, do_not_split_by_at_sign=True)
    if reference_forces(first, forces_key) is None:
        raise InputError(f"{files[0]}: family {family!r} validation dataset {dataset!r} has no reference forces "
                         f"({forces_key!r} in atoms.arrays, or a calculator's forces); set `forces_key`")


def check_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"{output_dir}: output directory is not writable ({exc.strerror})") from None


def family_scores(config: RunConfig, n_models: int, llpr_unsupported: str | None = None,
                  llpr_forces: bool = False) -> tuple[list[str], str]:
    """The per-structure scores a family of ``n_models`` gets with ``config``, and what it lacks, in words
    (``llpr_unsupported``: why its models cannot give LLPR, from ``ModelInfo``; ``llpr_forces``: whether its
    extractions store the LLPR force Jacobian, :func:`stores_llpr_forces`)."""
    from typing import get_args

    from mace_ood.config import COMMITTEE_SCORES, ONE_MODEL_SCORES, ForceScoreName, LatentScoreName

    names = [*get_args(LatentScoreName), *(get_args(ForceScoreName) if config.forces else ())]
    if not config.scores.gmm_components:
        names = [n for n in names if not n.startswith("gmm_nll")]
    missing = []
    if not llpr_forces:
        names = [n for n in names if n not in ONE_MODEL_SCORES]
    if n_models < 2:
        names = [n for n in names if n not in COMMITTEE_SCORES]
        missing.append("the seed-variance" + (" and committee (force, energy)" if config.forces else "")
                       + " scores need 2 or more models")
    if not config.forces:
        missing.append("force scores need `forces: true`")
    if llpr_unsupported:
        names = [n for n in names if not n.startswith("llpr")]
        missing.append(f"LLPR: {llpr_unsupported}")
    return [*names, "combined"], "; ".join(missing)


def check_scores(config: RunConfig, family: str, n_models: int) -> None:
    """A ranking score that a family cannot have is refused before any work, in one line."""
    from mace_ood.config import COMMITTEE_SCORES, ONE_MODEL_SCORES

    if n_models >= 2:
        if config.select.score in ONE_MODEL_SCORES:
            raise ModelError(f"family {family!r}: {n_models} models; select.score {config.select.score!r} is LLPR "
                             "propagated to the forces of a family of one model: use force_deviation_mean (a committee's)")
        return
    if config.select.score in COMMITTEE_SCORES:
        raise ModelError(f"family {family!r}: 1 model; select.score {config.select.score!r} needs 2 or more "
                         "(a committee): use combined, mahalanobis_max, knn_distance_max or gmm_nll_max")
    usable = [c for c in config.select.combine if c not in COMMITTEE_SCORES]
    if config.select.score == "combined" and not usable:
        raise ModelError(f"family {family!r}: 1 model; none of select.combine ({', '.join(config.select.combine)}) "
                         "can be computed without a committee: add mahalanobis_max")


def stores_llpr_forces(config: RunConfig, family: str, n_models: int) -> bool:
    """Whether ``family``'s extractions store the LLPR force Jacobian (``llpr_forces``; by default a family of
    one model with a validation dataset, whose force error it predicts)."""
    spec = config.model_families[family]
    wanted = spec.llpr_forces if spec.llpr_forces is not None else spec.validation is not None
    return bool(config.forces and n_models == 1 and wanted)


def plan_run(config: RunConfig, count: bool = True) -> RunPlan:
    """Resolve globs, check every model family and the output folder, list the jobs.

    Everything that would stop the run is found here, before any extraction. ``count``:
    also count the structures of each dataset (for progress reports).
    """
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir)
    shown = config.evaluation_pairs()
    pairs = [(family, dataset, reference, True) for family, dataset, reference in shown]
    for family in dict.fromkeys(family for family, _, _ in shown):
        own = config.model_families[family].trained_on
        if not any(f == family and d == own for f, d, _, _ in pairs):
            pairs.append((family, own, True, False))
        validation = config.model_families[family].validation
        if validation and not any(f == family and d == validation for f, d, _, _ in pairs):
            pairs.append((family, validation, False, False))
    plan = RunPlan(str(output_dir))
    counts = {}
    for dataset in dict.fromkeys(dataset for _, dataset, _, _ in pairs):
        plan.files[dataset] = resolve_files(config.datasets[dataset], dataset)
        counts[dataset] = count_structures(plan.files[dataset]) if count else 0
    for family in dict.fromkeys(family for family, _, _, _ in pairs):
        validation = config.model_families[family].validation
        if validation:
            check_labelled(plan.files[validation], validation, family, config.forces_key)
        paths = resolve_models(family, config.model_families[family].models)
        infos = [describe_model(p, config.layers) for p in paths]
        check_family(family, infos, config.model_families[family].head)
        check_scores(config, family, len(infos))
        plan.models[family] = [info.as_dict() for info in infos]
    for family, dataset, reference, is_shown in pairs:
        outputs = []
        for seed, info in enumerate(plan.models[family]):
            out = RunPaths(output_dir).latent(family, dataset, seed)
            plan.jobs.append(
                ExtractionJob(family, seed, info["path"], dataset, tuple(plan.files[dataset]), str(out), counts[dataset],
                              info["sha256"], config.model_families[family].head,
                              llpr_forces=stores_llpr_forces(config, family, len(plan.models[family])))
            )
            outputs.append(str(out))
        validation = config.model_families[family].validation == dataset and not reference
        plan.evaluations.append(EvaluationPlan(family, dataset, reference, tuple(outputs), is_shown, validation))
    return plan


def write_manifest(config: RunConfig, plan: RunPlan) -> None:
    """The run's manifest, written when its work starts: ``run_config.json`` (the config the run
    resumes and ``mace_ood.open_run`` reads) and ``run.json`` (every evaluation with its role, and
    ``status: running`` until :func:`mark_complete`)."""
    import json
    from dataclasses import asdict

    from mace_ood.files import write_text

    write_text(config.model_dump_json(indent=2), plan.paths.manifest)
    status = {"status": "running", "evaluations": [asdict(e) for e in plan.evaluations]}
    write_text(json.dumps(status, indent=1), plan.paths.status)


def mark_complete(plan: RunPlan) -> None:
    """Record in ``run.json`` that every stage of the run finished."""
    import json

    from mace_ood.files import write_text

    status = json.loads(plan.paths.status.read_text())
    write_text(json.dumps({**status, "status": "complete"}, indent=1), plan.paths.status)


def run_status(output_dir: str | Path) -> str | None:
    """``running`` or ``complete`` from a run's ``run.json``; None where there is none."""
    import json

    path = RunPaths(output_dir).status
    return json.loads(path.read_text())["status"] if path.is_file() else None
