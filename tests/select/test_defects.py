"""A batch that covers every kind of novelty: a flagged defect among many loud candidates is picked.

The committed Pd family (``tests/data/models``, trained with mace's CLI on 32 MD runs of 2x2x2
cells at 250-650 K, +-1.5 % strain) scores a pool of many loud candidates of two kinds (20 frames
of 1400 K MD, 20 frames of MD in a cell compressed 5 %) and one cell of each of several point
defects whose novelty sits in one or two atoms. K = the number of kinds flagged; every kind must be
picked. The previous descriptor picked 2 of the 6 kinds (compressed and hot only): it measured distances on the
structure's mean beside its single most novel atom (a random thermal draw in a hot frame, so hot
frames were far from each other) and multiplied each candidate by its local density (an isolated
defect's is ~0.03 of the median).
"""

from __future__ import annotations

import pytest
from ase.build import bulk

from mace_ood.config import SelectConfig
from mace_ood.demo import md_frames
from mace_ood.score.tables import read_descriptors
from mace_ood.select.batch import select_structures
from tests.trained import calibrated_tables, score_family

A = 3.89  # Pd's lattice constant


def pool() -> tuple[list, list[str]]:
    cell = bulk("Pd", "fcc", a=A, cubic=True) * (2, 2, 2)
    compressed = cell.copy()
    compressed.set_cell(cell.cell * 0.95, scale_atoms=True)
    structures = {"hot": md_frames(cell, 1400, seed=1, n_frames=20),
                  "compressed": md_frames(compressed, 400, seed=2, n_frames=20)}
    octahedral, tetrahedral, dumbbell, displaced = cell.copy(), cell.copy(), cell.copy(), cell.copy()
    octahedral.append("Pd")
    octahedral.positions[-1] = [A / 2, A / 2, A / 2]
    tetrahedral.append("Pd")
    tetrahedral.positions[-1] = [A / 4, A / 4, A / 4]
    dumbbell.positions[0] += [0, 0, -0.7]
    dumbbell.append("Pd")
    dumbbell.positions[-1] = [0, 0, 0.7]
    displaced.positions[0] += [0, 0, 0.9]
    for seed, (kind, atoms) in enumerate({"octahedral": octahedral, "tetrahedral": tetrahedral,
                                          "dumbbell": dumbbell, "displaced": displaced}.items()):
        structures[kind] = md_frames(atoms, 300, seed=10 + seed, n_frames=1)
    frames = [atoms for group in structures.values() for atoms in group]
    kinds = [kind for kind, group in structures.items() for _ in group]
    return frames, kinds


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    frames, kinds = pool()
    own, new, files = score_family(tmp_path_factory.mktemp("defects"), "Pd", frames)
    training, table = calibrated_tables(own, new, files, SelectConfig())
    table["kind"] = kinds
    return table, read_descriptors(files[new.label]), training, read_descriptors(files[own.label])


def test_every_kind_of_flagged_novelty_is_in_a_batch_of_as_many(scored):
    table, descriptors, training, training_descriptors = scored
    flagged = table.loc[table["ood"], "kind"]
    assert {"octahedral", "tetrahedral", "dumbbell", "displaced"} <= set(flagged)  # the defects are flagged
    assert (flagged.value_counts()[["hot", "compressed"]] >= 10).all()  # among many loud candidates
    kinds = flagged.nunique()
    selection = select_structures(table, SelectConfig(top_k=kinds), descriptors, training_descriptors,
                                  training["structure_id"].to_numpy())
    picked = list(selection.rows["kind"])
    print("picks:", picked)
    assert selection.strategy == "diverse" and set(picked) == set(flagged)


def test_loud_kinds_still_fill_a_larger_batch(scored):
    """Coverage first, not defects only: with room for 20, both loud kinds get several picks."""
    table, descriptors, training, training_descriptors = scored
    selection = select_structures(table, SelectConfig(top_k=20), descriptors, training_descriptors,
                                  training["structure_id"].to_numpy())
    counts = selection.rows["kind"].value_counts()
    print(dict(counts))
    assert counts["hot"] >= 3 and counts["compressed"] >= 3 and counts.sum() == 20
