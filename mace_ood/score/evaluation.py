"""The score stage, files in and files out: fit a family's reference, score one evaluation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import xarray as xr

from mace_ood.config import ScoresConfig
from mace_ood.files import atomic_path
from mace_ood.paths import reference_path, scores_path
from mace_ood.records import EvaluationPlan
from mace_ood.runtime import hdf5_in_this_thread
from mace_ood.score.compute import compute_scores
from mace_ood.score.latents import open_latents
from mace_ood.score.reference import (
    CALIBRATION,
    FIT,
    GAP,
    MIN_CALIBRATION_GROUPS,
    MIN_STRUCTURES_TO_SPLIT,
    FamilyReference,
    atom_rows,
    fit_reference,
    split_groups,
    split_structures,
)

log = logging.getLogger(__name__)


@hdf5_in_this_thread()
def fit_family_reference(
    evaluation: EvaluationPlan, output_dir: str | Path, scores: ScoresConfig,
    validation: EvaluationPlan | None = None, energy_key: str = "REF_energy",
) -> str:
    """Fit the family's reference (alignment, covariance, GMM, k-NN sample, LLPR) on the fit part of
    its own training set; the calibration part's structure ids are stored with it. LLPR's alpha is
    calibrated on ``validation`` (the family's labelled dataset) when given."""
    with open_latents(list(evaluation.latent_paths)) as latents:
        ids = latents["structure_id"].values.astype(str)
        side = split_structures(
            latents["source_file"].values.astype(str), latents["frame_index"].values, scores.calibration_fraction,
            scores.split_seed, scores.split_block_frames, scores.split_gap_frames,
        )
        held_out = side == CALIBRATION
        if not held_out.any():
            log.warning(
                "%s: %d training structures in %d groups of %d frames (a split needs %d structures and %d "
                "groups): the reference is calibrated on the data it was fitted on, so p-values and the ood "
                "flag are optimistic", evaluation.family, len(ids),
                len(set(split_groups(latents["source_file"].values.astype(str), latents["frame_index"].values,
                                     scores.split_block_frames))),
                scores.split_block_frames, MIN_STRUCTURES_TO_SPLIT, MIN_CALIBRATION_GROUPS + 1,
            )
        fit_rows = atom_rows(latents["atom_offset"].values[side == FIT], latents["n_atoms"].values[side == FIT])
        reference = fit_reference(
            latents["latent"], max_atoms=scores.reference_max_atoms, knn_k=scores.knn_k, ridge=scores.ridge,
            gmm_components=tuple(scores.gmm_components), gmm_max_atoms=scores.gmm_max_atoms, atoms=fit_rows,
        )
        reference.llpr = _fit_llpr(latents, side, validation, energy_key, evaluation.family)
    reference.calibration_ids = list(ids[held_out]) if held_out.any() else list(ids)
    reference.calibration_in_sample = not held_out.any()
    reference.gap_ids = list(ids[side == GAP])
    log.info(
        "%s: split of %d training structures by file and %d-frame block: %d fit, %d calibration, %d gap",
        evaluation.family, len(ids), scores.split_block_frames, int((side == FIT).sum()), int(held_out.sum()),
        int((side == GAP).sum()),
    )
    return str(reference.save(reference_path(output_dir, evaluation.family)))


def _fit_llpr(latents: xr.Dataset, side: np.ndarray, validation: EvaluationPlan | None, energy_key: str,
              family: str) -> list | None:
    from mace_ood.score.llpr import fit_family_llpr

    fit, calibration = side == FIT, side == CALIBRATION
    if not calibration.any():
        fit = calibration = np.ones(len(side), dtype=bool)
    opened = open_latents(list(validation.latent_paths)) if validation is not None else None
    try:
        fitted = fit_family_llpr(latents, fit, calibration, opened, energy_key,
                                 validation.dataset if validation is not None else "")
    finally:
        if opened is not None:
            opened.close()
    if fitted is None:
        log.info("%s: no LLPR (the models' readouts are not MACE's standard ones)", family)
    else:
        log.info("%s: LLPR alpha %s, calibrated on %s", family,
                 ", ".join(f"{s.alpha:.3g}" for s in fitted), fitted[0].calibrated_on)
    return fitted


def write_scores_netcdf(scores: xr.Dataset, path: str | Path) -> Path:
    """Compute the lazy scores once and store them (per atom and per structure)."""
    with atomic_path(path) as tmp:
        scores.to_netcdf(tmp, engine="netcdf4")
    return Path(path)


@hdf5_in_this_thread()
def score_evaluation(
    evaluation: EvaluationPlan, output_dir: str | Path, chunk_atoms: int, reference_file: str | None = None,
    device: str = "cpu",
) -> str:
    """Every score of one evaluation, computed once and stored to ``scores/<label>.nc``
    (the k-NN distances on ``device``)."""
    reference = FamilyReference.load(reference_file) if reference_file else None
    with open_latents(list(evaluation.latent_paths), chunk_atoms=chunk_atoms) as latents:
        scores = compute_scores(latents, reference, device)
        if evaluation.reference and reference is not None:
            ids = scores["structure_id"].values.astype(str)
            held_out, gap = set(reference.calibration_ids), set(getattr(reference, "gap_ids", []))
            split = [CALIBRATION if i in held_out else GAP if i in gap else FIT for i in ids]
            if reference.calibration_in_sample:
                split = ["fit+calibration"] * len(ids)
            scores["split"] = ("structure", np.array(split, dtype=object))
        scores.attrs.update({
            "family": evaluation.family, "dataset": evaluation.dataset,
            "reference": int(evaluation.reference), "seed_files": json.dumps(evaluation.latent_paths),
        })
        return str(write_scores_netcdf(scores, scores_path(output_dir, evaluation.label)))
