"""The ``ood`` flag on new in-distribution MD runs of a second system, bigger cells included.

Data are made the way the demo makes them (EMT Langevin MD, ``mace_ood.demo.md_frames``) but for
a Cu-Au alloy: a random-weight family (any fixed feature map gives exchangeable scores on data
drawn alike) trained on 2x2x2 cells, then new MD runs never seen, of 2x2x2 and of 3x3x3 cells.
The run uses the default config a user gets (``forces`` unset, ``combined``), with alpha = 0.1
so the rate is measurable on a few hundred frames.
"""

from __future__ import annotations

import os

import ase.io
import numpy as np
import pandas as pd
import pytest
import yaml
from ase.build import bulk
from typer.testing import CliRunner

from mace_ood.cli import app
from mace_ood.demo import md_frames
from mace_ood.score.conformal import conformal_pvalue
from mace_ood.testing import save_tiny_family

ALPHA = 0.1
# Tolerance of the false-flag rate: the frames of one trajectory are correlated, so a rate on
# 120-160 frames from 12-16 runs is noisier than a binomial one (README, "The ood flag": the spread
# measured over data seeds).
TOLERANCE = 0.07
SEED = int(os.environ.get("MACE_OOD_FLAG_RATE_SEED", "0"))  # other data, for measuring the spread


def alloy(repeat: int, seed: int):
    atoms = bulk("Cu", "fcc", a=3.70, cubic=True) * (repeat, repeat, repeat)
    rng = np.random.default_rng(seed)
    numbers = np.full(len(atoms), 29)
    numbers[rng.choice(len(atoms), len(atoms) // 4, replace=False)] = 79
    atoms.set_atomic_numbers(numbers)
    return atoms


def write_runs(folder, runs: list[tuple[int, int, int]]) -> None:
    folder.mkdir(parents=True)
    for repeat, seed, n_frames in runs:
        frames = md_frames(alloy(repeat, seed), 400, seed=seed, n_frames=n_frames)
        ase.io.write(folder / f"md_CuAu_{len(frames[0])}atoms_T400K_run{seed}.extxyz", frames, format="extxyz")


@pytest.fixture(scope="module")
def alloy_run(prefect_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("alloy")
    save_tiny_family(root / "models", "CuAu", 2, first_seed=7, atomic_numbers=(29, 79), channels=8, max_l=0)
    base = 1000 * SEED
    # many short runs: each run is one random arrangement of the alloy (a random effect shared by its
    # frames), so the number of runs, not of frames, sets how well a rate is measured
    write_runs(root / "data" / "train", [(2, base + seed, 10) for seed in range(30)])
    write_runs(root / "data" / "new_small", [(2, base + 100 + seed, 10) for seed in range(16)])
    write_runs(root / "data" / "new_large", [(3, base + 200 + seed, 10) for seed in range(12)])
    config = {
        "output_dir": "run", "device": "cpu", "batch_size": 8,
        "datasets": {"train": ["data/train/*.extxyz"], "new_small": ["data/new_small/*.extxyz"],
                     "new_large": ["data/new_large/*.extxyz"]},
        "model_families": {"CuAu": {"trained_on": "train", "models": ["models/CuAu_seed*.model"]}},
        "evaluations": [{"family": "CuAu", "dataset": "new_small"}, {"family": "CuAu", "dataset": "new_large"}],
        "reference": True, "scores": {"calibration_fraction": 0.3}, "select": {"alpha": ALPHA, "top_k": 5},
        "dask": {"n_workers": 2},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(root / "config.yaml")])
    assert result.exit_code == 0, result.output
    return pd.read_csv(root / "run" / "scores.csv"), result.output


def test_new_in_distribution_runs_are_flagged_at_alpha_whatever_their_size(alloy_run):
    scores, output = alloy_run
    calibration = scores[(scores.dataset == "train") & (scores.split == "calibration")]
    assert len(calibration) >= 40 and "force_deviation_mean" in output  # the default: forces on, both components
    rates = {name: scores[scores.dataset == name]["ood"].mean() for name in ("new_small", "new_large")}
    print("false-flag rates at alpha", ALPHA, rates, "n_calibration", len(calibration))
    for name, rate in rates.items():
        assert abs(rate - ALPHA) <= TOLERANCE, (name, rate)
    large = scores[scores.dataset == "new_large"]
    assert (large["n_atoms"] == 108).all()
    # the raw per-structure max drifts with size (b37067b combined it as it is): a conformal flag on it
    # would flag the bigger cells far above alpha, so this test tells size-aware from not
    raw = (conformal_pvalue(large["mahalanobis_max"], calibration["mahalanobis_max"]) <= ALPHA).mean()
    print("3x3x3 cells flagged on the raw mahalanobis_max:", raw)
    assert raw > ALPHA + TOLERANCE
