"""``forces: false`` keeps its own evidence: how much worse the latent-only ranking detects new
structures of an alloy, measured here and stated by the run (mace_ood.select.stage.FORCES_OFF_NOTE).

The committed Cu-Au family (4 runs, tests/data/models) scores new in-distribution runs drawn like its
training runs against hot (1600 K), strained (+-6 %), vacancy, Au-rich (60 %) and surface cells.
``forces: false`` ranks by ``mahalanobis_max`` alone (the default ``combined`` less its force
component), which is what is measured for it.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from sklearn.metrics import roc_auc_score

from mace_ood.config import SelectConfig
from mace_ood.demo import md_frames
from mace_ood.select.stage import FORCES_OFF_NOTE, FORCES_OFF_ROC_AUC
from tests.trained import TRAINING_SETS, calibrated_tables, md_runs, score_family


def alloy(gold: float = 0.25, seed: int = 0, strain: float = 0.0):
    atoms = bulk("Cu", "fcc", a=3.70, cubic=True) * (2, 2, 2)
    numbers = np.full(len(atoms), 29)
    numbers[np.random.default_rng(seed).choice(len(atoms), int(round(gold * len(atoms))), replace=False)] = 79
    atoms.set_atomic_numbers(numbers)
    atoms.set_cell(atoms.cell * (1 + strain), scale_atoms=True)
    return atoms


def new_and_in_distribution() -> tuple[list, np.ndarray]:
    in_distribution = md_runs(TRAINING_SETS["CuAu"].draw, range(30000, 30008), 5)
    vacancy, surface = alloy(seed=4), alloy(seed=6)
    del vacancy[0]
    surface.center(vacuum=5.0, axis=2)
    new = [md_frames(alloy(seed=1), 1600, seed=1, n_frames=8),
           md_frames(alloy(seed=2, strain=0.06), 500, seed=2, n_frames=8),
           md_frames(alloy(seed=3, strain=-0.06), 500, seed=3, n_frames=8),
           md_frames(vacancy, 500, seed=4, n_frames=8),
           md_frames(alloy(gold=0.6, seed=5), 500, seed=5, n_frames=8),
           md_frames(surface, 400, seed=6, n_frames=8)]
    frames = in_distribution + [atoms for run in new for atoms in run]
    return frames, np.arange(len(frames)) >= len(in_distribution)


@pytest.fixture(scope="module")
def roc_auc(tmp_path_factory):
    frames, is_new = new_and_in_distribution()
    own, new, files = score_family(tmp_path_factory.mktemp("forces_off"), "CuAu", frames)
    out = {}
    for name, combine in (("forces", ["mahalanobis_max", "force_deviation_mean"]), ("latents only", ["mahalanobis_max"])):
        _, table = calibrated_tables(own, new, files, SelectConfig(combine=combine))
        out[name] = roc_auc_score(is_new, table["combined"].to_numpy())
    return out


def test_the_stated_gap_is_the_measured_one(roc_auc):
    print("ROC-AUC:", roc_auc)
    for name, stated in FORCES_OFF_ROC_AUC.items():
        assert roc_auc[name] == pytest.approx(stated, abs=0.02), name
    assert roc_auc["latents only"] < roc_auc["forces"] - 0.05  # worse, and the run says by how much
    assert f"ROC-AUC {FORCES_OFF_ROC_AUC['latents only']:.2f} against {FORCES_OFF_ROC_AUC['forces']:.2f}" in FORCES_OFF_NOTE


def test_a_run_without_forces_says_so_with_the_numbers(caplog):
    from mace_ood.records import EvaluationPlan
    from mace_ood.select.stage import _log_ranking

    delivered = {"components": ["mahalanobis_max"], "effective_alpha": 0.2, "alpha": 0.01, "n_calibration": 120,
                 "n_groups": 4, "delivered_rate": 0.2}
    with caplog.at_level("WARNING", logger="mace_ood.select.stage"):
        _log_ranking(EvaluationPlan("F", "D", False, ()), SelectConfig(), delivered)
    assert "combined leaves out force_deviation_mean" in caplog.text and FORCES_OFF_NOTE in caplog.text
