"""The ``ood`` flag on new in-distribution MD runs, at the default config a user gets.

Data are made the way the demo makes them (EMT Langevin MD, ``mace_ood.demo.md_frames``), two
frames kept per run, each run its own file, so frames of one run are correlated as MD frames
are and the split must keep them together. Random-weight families (a fixed feature map gives
exchangeable scores on data drawn alike) in one ``mace-ood run`` with ``forces`` unset (on), the
``combined`` score, and alpha = 0.1 so a rate is measurable on a few hundred structures:

- ``CuAu``, a Cu3Au-like random alloy, trained on 2x2x2 runs; new runs of the same alloy and size
  (the b37067b case: 30 % of such runs flagged at a nominal 1 %).
- ``Pd``, elemental, trained on 2x2x2 runs (32 atoms); new 4x4x4 runs (256 atoms: size alone must not flag). An alloy
  would not do here: its bigger cells hold local arrangements the small cells rarely show (per-atom
  Mahalanobis above the calibration atoms' 99th percentile: 2.0 % of 3x3x3 atoms, 0.7 % of 2x2x2),
  which is new data, not drift.

The bound is one-sided, alpha + 3 sigma: flagging less than alpha wastes nothing, more wastes DFT.
sigma counts each run once (its frames may be fully correlated) on both sides: the calibration
runs that set the threshold and the new runs it is measured on (README, "The ood flag").
"""

from __future__ import annotations

import math
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
FRAMES_PER_RUN = 2
SEED = int(os.environ.get("MACE_OOD_FLAG_RATE_SEED", "0"))  # other data, for measuring the spread


def cell(system: str, repeat: int, seed: int):
    if system == "Pd":
        return bulk("Pd", "fcc", a=3.89, cubic=True) * (repeat, repeat, repeat)
    atoms = bulk("Cu", "fcc", a=3.70, cubic=True) * (repeat, repeat, repeat)
    numbers = np.full(len(atoms), 29)
    numbers[np.random.default_rng(seed).choice(len(atoms), len(atoms) // 4, replace=False)] = 79
    atoms.set_atomic_numbers(numbers)
    return atoms


def write_runs(folder, system: str, repeat: int, seeds: range) -> None:
    folder.mkdir(parents=True)
    for seed in seeds:
        frames = md_frames(cell(system, repeat, seed), 400, seed=seed, n_frames=FRAMES_PER_RUN + 1)[1:]
        ase.io.write(folder / f"md_{system}_{len(frames[0])}atoms_T400K_run{seed}.extxyz", frames, format="extxyz")


@pytest.fixture(scope="module")
def flag_run(prefect_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("flag_rate")
    save_tiny_family(root / "models", "CuAu", 2, first_seed=7, atomic_numbers=(29, 79), channels=8, max_l=0)
    save_tiny_family(root / "models", "Pd", 2, first_seed=17, atomic_numbers=(46,), channels=8, max_l=0)
    base = 10_000 * SEED
    data = root / "data"
    write_runs(data / "CuAu_train", "CuAu", 2, range(base, base + 200))
    write_runs(data / "CuAu_new", "CuAu", 2, range(base + 1000, base + 1080))
    write_runs(data / "Pd_train", "Pd", 2, range(base, base + 200))
    write_runs(data / "Pd_new_4x4x4", "Pd", 4, range(base + 1000, base + 1030))
    config = {
        "output_dir": "run", "device": "cpu", "batch_size": 8,
        "datasets": {name: [f"data/{name}/*.extxyz"] for name in ("CuAu_train", "CuAu_new", "Pd_train", "Pd_new_4x4x4")},
        "model_families": {
            "CuAu": {"trained_on": "CuAu_train", "models": ["models/CuAu_seed*.model"]},
            "Pd": {"trained_on": "Pd_train", "models": ["models/Pd_seed*.model"]},
        },
        "evaluations": [{"family": "CuAu", "dataset": "CuAu_new"}, {"family": "Pd", "dataset": "Pd_new_4x4x4"}],
        "reference": True, "scores": {"calibration_fraction": 0.5}, "select": {"alpha": ALPHA, "top_k": 5},
        "dask": {"n_workers": 2},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(root / "config.yaml")])
    assert result.exit_code == 0, result.output
    return pd.read_csv(root / "run" / "scores.csv"), result.output


def runs(table: pd.DataFrame) -> int:
    return table["source_file"].nunique()


@pytest.mark.parametrize(("family", "new"), [("CuAu", "CuAu_new"), ("Pd", "Pd_new_4x4x4")])
def test_new_in_distribution_runs_are_flagged_at_most_at_alpha(flag_run, family, new):
    scores, output = flag_run
    assert "force_deviation_mean" in output  # the default: forces on, both components combined
    own = scores[(scores.family == family) & (scores.dataset == f"{family}_train")]
    calibration = own[own.split == "calibration"]
    assert not (own[own.split == "fit"].source_file.isin(calibration.source_file)).any()  # runs never straddle
    fresh = scores[(scores.family == family) & (scores.dataset == new)]
    rate = fresh["ood"].mean()
    sigma = math.sqrt(ALPHA * (1 - ALPHA) * (1 / runs(calibration) + 1 / runs(fresh)))
    print(f"{family} on {new}: {rate:.3f} flagged at alpha {ALPHA} ({runs(calibration)} calibration runs, "
          f"{runs(fresh)} new runs, bound {ALPHA + 3 * sigma:.3f})")
    assert rate <= ALPHA + 3 * sigma


def test_the_raw_max_would_flag_bigger_cells(flag_run):
    """Tells size-aware from not: b37067b combined the raw per-structure max, which grows with the
    number of atoms; a conformal flag on it flags about half of the 4x4x4 cells."""
    scores, _ = flag_run
    own = scores[(scores.family == "Pd") & (scores.dataset == "Pd_train") & (scores.split == "calibration")]
    large = scores[scores.dataset == "Pd_new_4x4x4"]
    assert (large["n_atoms"] == 256).all() and (own["n_atoms"] == 32).all()
    raw = (conformal_pvalue(large["mahalanobis_max"], own["mahalanobis_max"]) <= ALPHA).mean()
    print("4x4x4 cells flagged on the raw mahalanobis_max:", raw, "size-aware:", large["ood"].mean())
    # for independent atoms: 1 - (1 - alpha) ** (256 / 32) = 0.57
    assert raw > 4 * ALPHA
