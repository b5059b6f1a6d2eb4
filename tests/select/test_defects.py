"""A defect among bulk-like candidates is picked: the descriptor carries the most unusual atom.

b37067b measured distances between structures' *mean* aligned latents: a vacancy moves the mean
of a cell little, so MaxDist saw a bulk cell next to the training set and none of 10 flagged
vacancy cells were among 15 picks. Here a random-weight Cu family is run end to end on strained
3x3x3 cells (eight strains, a cluster each) and vacancy cells (1 of 108 atoms missing), all
candidates; the pick must reach the vacancies before it has covered every strain, and the mean
alone (the first half of the descriptor) must not, or this test could not tell the two apart.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

from mace_ood.config import ExtractionSettings, ScoresConfig
from mace_ood.extract.stream import extract_to_netcdf
from mace_ood.records import EvaluationPlan
from mace_ood.score.evaluation import fit_family_reference, score_evaluation
from mace_ood.score.tables import read_descriptors
from mace_ood.select.diverse import select_diverse
from mace_ood.testing import save_tiny_family, write_dataset

STRAINS = (-0.04, -0.03, -0.02, -0.01, 0.01, 0.02, 0.03, 0.04)
PER_KIND = 8


def rattled(atoms, seed: int, amplitude: float = 0.04):
    atoms = atoms.copy()
    atoms.rattle(amplitude, seed=seed)
    return atoms


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("defects")
    models = save_tiny_family(root / "models", "Cu", 2, first_seed=3, atomic_numbers=(29,), max_l=0)
    cu = bulk("Cu", "fcc", a=3.61, cubic=True) * (3, 3, 3)
    training = [rattled(cu, seed) for seed in range(30)]
    candidates, kinds = [], []
    for strain in STRAINS:
        for _ in range(PER_KIND):
            atoms = cu.copy()
            atoms.set_cell(cu.cell * (1 + strain), scale_atoms=True)
            candidates.append(rattled(atoms, 1000 + len(candidates)))
            kinds.append(f"strain{strain:+.3f}")
    for k in range(PER_KIND):
        vacancy = cu.copy()
        del vacancy[k]
        candidates.append(rattled(vacancy, 2000 + k))
        kinds.append("vacancy")
    settings = ExtractionSettings(device="cpu", default_dtype="float64", batch_size=8, forces=False)
    files = {"train": write_dataset(root / "data", "train", training),
             "new": write_dataset(root / "data", "new", candidates)}
    latent_paths = {name: [] for name in files}
    for name, path in files.items():
        for s, model in enumerate(models):
            out = root / "latents" / name / f"seed-{s}.nc"
            out.parent.mkdir(parents=True, exist_ok=True)
            extract_to_netcdf(model, [str(path)], out, settings)
            latent_paths[name].append(str(out))
    own = EvaluationPlan("Cu", "train", True, tuple(latent_paths["train"]))
    new = EvaluationPlan("Cu", "new", False, tuple(latent_paths["new"]))
    reference = fit_family_reference(own, root, ScoresConfig())
    score_files = {e.dataset: score_evaluation(e, root, 4096, reference) for e in (own, new)}
    return read_descriptors(score_files["new"]), read_descriptors(score_files["train"]), np.array(kinds)


def test_vacancy_cells_are_picked_before_every_strain_is(scored):
    """Measured over model seeds 3-7: the first vacancy is pick 6-7 of 9 kinds with the descriptor,
    pick 9 (after all eight strains) with the mean alone."""
    descriptors, training, kinds = scored
    n_features = descriptors.shape[1] // 2
    scores = np.ones(len(kinds))  # all flagged alike: the descriptor alone decides coverage
    order = select_diverse(descriptors, scores, len(kinds), training).order
    mean_only = select_diverse(descriptors[:, :n_features], scores, len(kinds), training[:, :n_features]).order
    first = list(kinds[order]).index("vacancy")
    first_mean_only = list(kinds[mean_only]).index("vacancy")
    print("first vacancy pick:", first, "mean only:", first_mean_only)
    assert first < len(STRAINS) <= first_mean_only
