"""The training set's independent units (mace_ood.runs): MD runs found in one concatenated file,
or named by the user; blocks only as the said last resort."""

from __future__ import annotations

import json

import ase.io
import numpy as np
import pytest
from ase.build import bulk

from mace_ood.demo import md_frames
from mace_ood.runs import find_groups, run_starts
from mace_ood.structures import InputError


def run(seed: int, strain: float = 0.0, temperature: float = 300.0, n_frames: int = 5, symbol: str = "Cu",
        repeat: int = 2, order_seed: int | None = None):
    atoms = bulk(symbol, "fcc", a=3.61, cubic=True) * (repeat, repeat, repeat)
    if order_seed is not None:
        numbers = np.full(len(atoms), 29)
        numbers[np.random.default_rng(order_seed).choice(len(atoms), len(atoms) // 4, replace=False)] = 79
        atoms.set_atomic_numbers(numbers)
    atoms.set_cell(atoms.cell * (1 + strain), scale_atoms=True)
    return md_frames(atoms, temperature, seed=seed, n_frames=n_frames)


def boundaries(frames) -> list[int]:
    return np.flatnonzero(run_starts(frames)).tolist()


def without_counter(frames):
    for atoms in frames:
        atoms.info.pop("step", None)
    return frames


def test_a_new_run_starts_where_strain_ordering_size_or_the_step_counter_changes():
    frames = run(0, strain=-0.01) + run(1, strain=0.01) + run(2, order_seed=3) + run(3, order_seed=4) + run(4, repeat=3)
    assert boundaries(without_counter([a.copy() for a in frames])) == [0, 5, 10, 15, 20]
    # same cell, same species, same temperature: only the MD step counter restarting tells the runs apart
    same = run(5) + run(6) + run(7)
    assert boundaries(same) == [0, 5, 10]


def test_jumps_in_positions_split_runs_that_share_a_cell():
    """A hot run and a cold one from other starting points (one rattled far off the lattice): the atoms
    move farther between the runs than an MD step moves them."""
    hot = without_counter(run(8, temperature=600))
    far = without_counter(run(9, temperature=600))
    for atoms in far:
        atoms.positions += np.random.default_rng(0).normal(0, 0.8, atoms.positions.shape)
    assert boundaries(hot + far) == [0, 5]


def test_npt_cell_fluctuations_do_not_split_a_run():
    frames = without_counter(run(10, n_frames=12))
    rng = np.random.default_rng(1)
    for atoms in frames:  # NPT: the cell breathes by ~0.1 % from frame to frame
        atoms.set_cell(atoms.cell * (1 + 0.001 * rng.standard_normal()), scale_atoms=True)
    strained = without_counter(run(11, strain=0.03, n_frames=12))
    assert boundaries(frames + strained) == [0, 12]


def write(path, frames):
    ase.io.write(path, frames, format="extxyz")
    return [str(path)] * len(frames), list(range(len(frames)))


def test_find_groups_auto_file_info_key_and_the_block_fallback(tmp_path):
    files, index = write(tmp_path / "train.extxyz", run(0, strain=-0.01) + run(1, strain=0.02, n_frames=7))
    grouping = find_groups(np.array(files), np.array(index))
    assert grouping.method == "runs" and sorted(grouping.sizes) == [5, 7] and not grouping.notes
    assert grouping.describe() == "2 runs (found from the frames) of 5-7 frames"
    assert find_groups(np.array(files), np.array(index), "file").n_groups == 1
    # mace's config_type names the runs (here across the two runs: one group)
    info = np.array([json.dumps({"config_type": "bulk"})] * len(files))
    named = find_groups(np.array(files), np.array(index), "config_type", info_json=info)
    assert named.n_groups == 1 and named.method == "info:config_type"
    with pytest.raises(InputError, match=r"train.extxyz: frame 0 has no atoms.info\['run_id'\]"):
        find_groups(np.array(files), np.array(index), "run_id", info_json=info)
    # one long run and nothing else: blocks, and the run says they are not independent
    long_files, long_index = write(tmp_path / "long.extxyz", run(2, n_frames=25))
    blocks = find_groups(np.array(long_files), np.array(long_index), block_frames=10)
    assert blocks.method == "blocks" and blocks.sizes == [10, 10, 5]
    assert "not independent" in blocks.notes[0]


def test_a_file_that_is_gone_falls_back_to_atom_counts_and_formulas():
    grouping = find_groups(np.array(["/gone/a.xyz"] * 4), np.arange(4), n_atoms=np.array([4, 4, 5, 5]),
                           formula=np.array(["Cu4", "Cu4", "Cu5", "Cu5"]))
    assert grouping.labels.tolist() == ["a.xyz#run0", "a.xyz#run0", "a.xyz#run1", "a.xyz#run1"]
    assert "not readable now" in grouping.notes[0]


def test_validate_prints_each_dataset_s_runs_and_their_sizes(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from mace_ood.cli import app
    from tests.trained import TRAINING_SETS, model_paths, write_training_file

    train = write_training_file("Pd", tmp_path / "data")
    config = {"output_dir": str(tmp_path / "run"), "datasets": {"Pd_train": [str(train)]},
              "model_families": {"Pd": {"trained_on": "Pd_train", "models": [str(p) for p in model_paths("Pd")]}},
              "evaluations": []}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "config.yaml")])
    assert result.exit_code == 0, result.output
    runs, frames = TRAINING_SETS["Pd"].runs, TRAINING_SETS["Pd"].frames_per_run
    assert (f"dataset Pd_train: 1 file(s), {runs * frames} frames in {runs} runs (found from the frames) of "
            f"{frames} frames") in result.output
