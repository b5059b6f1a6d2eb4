"""One model: LLPR propagated to the forces (issue 35, item 5), on the committed Pd family's first
model alone, a family of one model as users have it (no committee, so no force deviation).

The same data as tests/test_force_errors.py: a validation file of 12 new MD runs, 4 repeats of 10
new runs drawn like the training runs, and novel structures (hot, strained and compressed MD,
vacancy and divacancy cells, a surface); true errors are the model's forces against EMT's. The
force error model (a power law and a run-level conformal factor, :mod:`mace_ood.score.errors`) is fitted
on the validation runs from each input in turn: ``llpr_force_std`` (what a run uses for a family of
one model), the energy-only LLPR (``llpr_energy_std``), and the Mahalanobis route (``mahalanobis_max``,
and the ranking score ``combined`` a one-model family used before). ``pytest -s`` prints the table
the README quotes: coverage of the upper bound on the new runs (mean, min, max over the repeats; the
share of new structures inside the validation range, where it is given), how
tight it is (median upper / true), Spearman with the true error over every structure, and on the
novel structures how often the reported lower bound holds and the median true / reported.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from mace_ood.config import ScoresConfig, SelectConfig
from mace_ood.score.errors import add_predicted_errors, fit_error_model, force_errors
from mace_ood.select.stage import fit_validation_errors, grouping_ids, groups_of_scores
from tests.test_force_errors import novel_structures
from tests.trained import TRAINING_SETS, calibrated_tables, md_runs, score_family

LEVEL = 0.9
REPEATS = 4
INPUTS = ("llpr_force_std", "llpr_energy_std", "mahalanobis_max", "combined")


@pytest.fixture(scope="module")
def one_model(tmp_path_factory):
    draw = TRAINING_SETS["Pd"].draw
    datasets = {"valid": md_runs(draw, range(40_000, 40_012), 4), "novel": novel_structures(),
                **{f"new{r}": md_runs(draw, range(50_000 + 100 * r, 50_010 + 100 * r), 4) for r in range(REPEATS)}}
    own, evaluations, files = score_family(tmp_path_factory.mktemp("llpr_forces"), "Pd", datasets, seeds=(0,))
    select = SelectConfig(error_level=LEVEL)
    tables = {name: calibrated_tables(own, e, files, select)[1] for name, e in evaluations.items()}
    for name, table in tables.items():
        table["force_rmse"] = table["structure_id"].map(force_errors(files[evaluations[name].label]))
    valid_file = files[evaluations["valid"].label]
    grouping = groups_of_scores(valid_file, ScoresConfig())
    groups = pd.Series(grouping.labels, index=grouping_ids(valid_file)).reindex(tables["valid"]["structure_id"])
    chosen, _ = fit_validation_errors(tables["valid"], valid_file, select.score, LEVEL, "REF_forces", ScoresConfig(),
                                      "valid")
    rows = {}
    for column in INPUTS:
        model = fit_error_model(tables["valid"][column].to_numpy(), tables["valid"]["force_rmse"].to_numpy(),
                                groups.to_numpy(), column, LEVEL)
        predicted = {name: table.copy() for name, table in tables.items()}
        for table in predicted.values():
            add_predicted_errors(table, model)
        new = [predicted[f"new{r}"] for r in range(REPEATS)]
        coverage = [float((t["force_rmse"] <= t["force_rmse_upper"])[t["force_rmse_upper"].notna()].mean()) for t in new]
        every = pd.concat(predicted.values())
        novel = predicted["novel"]
        floors = novel[novel["force_rmse_is_lower_bound"]]
        rows[column] = {
            "coverage": np.mean(coverage), "coverage_min": np.min(coverage), "coverage_max": np.max(coverage),
            "inside": float(np.mean([t["force_rmse_upper"].notna().mean() for t in new])),  # where a bound is given
            # how tight the bound is where it is given: the median of upper / true over the new runs
            "upper_over_true": float(np.median(pd.concat(
                [t["force_rmse_upper"] / t["force_rmse"] for t in new]).dropna())),
            "spearman": spearmanr(every[column], every["force_rmse"])[0],
            "novel_floors": len(floors), "novel_held": float((floors["force_rmse"] >= floors["force_rmse_lower"]).mean())
            if len(floors) else np.nan,
            "novel_ratio": float(np.median(floors["force_rmse"] / floors["force_rmse_lower"])) if len(floors) else np.nan,
            "exponent": model.exponent,
        }
    table = pd.DataFrame(rows).T
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.precision", 3):
        print(f"\none model (Pd seed 0), level {LEVEL}, {REPEATS} x 10 new runs, {len(tables['novel'])} novel\n{table}")
    return chosen, table


def test_a_family_of_one_model_predicts_its_force_error_from_llpr_forces(one_model):
    chosen, _ = one_model
    assert chosen.score == "llpr_force_std" and chosen.n_groups == 12


def test_llpr_forces_cover_new_runs_at_the_level(one_model):
    _, table = one_model
    assert abs(table.loc["llpr_force_std", "coverage"] - LEVEL) <= 0.05


def test_llpr_forces_rank_the_errors_no_worse_than_energy_only_llpr(one_model):
    _, table = one_model
    assert table.loc["llpr_force_std", "spearman"] >= table.loc["llpr_energy_std", "spearman"] - 0.02
