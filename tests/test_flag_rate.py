"""The ``ood`` flag on new in-distribution MD runs, with trained models, on training files of the
shape users have (README, "The ood flag").

The committed models (``tests/data/models``, trained with mace's CLI: ``python -m
tests.data.make_models``) were trained on one extxyz file per family, its runs concatenated, each
run at its own temperature and strain (and, for the alloy, its own ordering): ``tests.trained``.

- ``CuAu``: 4 runs of 30 frames (the usual training file), at the default alpha (0.01). 4 runs
  cannot deliver it: the run must say so and state what it can deliver (1/5), and new runs must
  be flagged at most at twice that. (The per-frame rule before it stated 1/41 and flagged 0.10 of new runs.)
- ``Pd``: 32 runs of 4 frames, at alpha = 0.1 (32 runs can deliver it). New runs must be flagged
  at most at 2 alpha.

New runs are drawn the same way with other seeds, in repeats, and scored through the Python API
against one finished run (no second flow). The per-frame rule fails it (CHANGELOG, 2026-12-04).
"""

from __future__ import annotations

import json

import ase.io
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import mace_ood
from mace_ood.cli import app
from mace_ood.score.conformal import delivered_rate
from tests.trained import TRAINING_SETS, md_runs, model_paths, write_training_file

ALPHA = 0.1  # Pd's; CuAu runs at the default
REPEATS = 4
NEW_RUNS = {"CuAu": (12, 5), "Pd": (10, 4)}  # per repeat: runs, frames per run


@pytest.fixture(scope="module")
def flag_run(prefect_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("flag_rate")
    data = root / "data"
    datasets, families, evaluations = {}, {}, []
    for family, spec in TRAINING_SETS.items():
        train = write_training_file(family, data)
        runs, frames = NEW_RUNS[family]
        new = data / f"{family}_new.extxyz"
        ase.io.write(new, md_runs(spec.draw, range(7000, 7000 + runs), frames), format="extxyz")
        datasets |= {f"{family}_train": [str(train)], f"{family}_new": [str(new)]}
        families[family] = {"trained_on": f"{family}_train", "models": [str(p) for p in model_paths(family)]}
        evaluations.append({"family": family, "dataset": f"{family}_new"})
    config = {
        "output_dir": str(root / "run"), "device": "cpu", "batch_size": 8, "datasets": datasets,
        "model_families": families, "evaluations": evaluations, "reference": True,
        "select": {"top_k": 5}, "dask": {"n_workers": 2},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(root / "config.yaml")])
    assert result.exit_code == 0, result.output
    return root / "run", result.output


def summary_of(run_dir, family: str) -> dict:
    return json.loads((run_dir / "selection" / f"{family}__{family}_train.json").read_text())


def new_run_rates(run_dir, family: str, alpha: float | None = None) -> list[float]:
    """The flagged share of new in-distribution runs, per repeat (each repeat its own MD seeds)."""
    run = mace_ood.open_run(run_dir)
    if alpha is not None:
        run.config.select = run.config.select.model_copy(update={"alpha": alpha})
    spec, (runs, frames) = TRAINING_SETS[family], NEW_RUNS[family]
    rates = []
    for repeat in range(REPEATS):
        first = 20_000 + 1000 * repeat
        table = run.score(md_runs(spec.draw, range(first, first + runs), frames), family=family, batch_size=16)
        rates.append(float(table["ood"].mean()))
    return rates


def test_groups_are_the_runs_of_the_training_file(flag_run):
    run_dir, output = flag_run
    scores = pd.read_csv(run_dir / "scores.csv")
    for family, spec in TRAINING_SETS.items():
        own = scores[(scores.family == family) & (scores.dataset == f"{family}_train")]
        assert own["group"].nunique() == spec.runs and own["group"].value_counts().eq(spec.frames_per_run).all()
        assert (own["split"] == "out-of-fold").all()
        assert own.groupby("group")["fold"].nunique().eq(1).all()  # a run never straddles folds
        assert summary_of(run_dir, family)["n_groups"] == spec.runs
    assert "4 independent runs are too few" in output  # CuAu: alpha cannot be delivered, and it says so


def test_few_runs_state_what_they_deliver_and_new_runs_keep_it(flag_run):
    run_dir, _ = flag_run
    stated = summary_of(run_dir, "CuAu")["delivered_rate"]
    rates = new_run_rates(run_dir, "CuAu")
    print(f"CuAu (4 runs): stated {stated:.3f}; new runs flagged per repeat {rates}")
    assert sum(rates) / len(rates) <= 2 * stated
    assert stated == pytest.approx(1 / (TRAINING_SETS["CuAu"].runs + 1))


def test_many_runs_keep_alpha_on_new_runs(flag_run):
    run_dir, _ = flag_run
    assert delivered_rate(ALPHA, summary_of(run_dir, "Pd")["n_groups"]) <= ALPHA
    rates = new_run_rates(run_dir, "Pd", ALPHA)
    print(f"Pd (32 runs): alpha {ALPHA}; new runs flagged per repeat {rates}")
    assert sum(rates) / len(rates) <= 2 * ALPHA
