"""Structure ids come from file labels: short, unique, and built in O(files)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from mace_ood.structures import file_labels


def quadratic_labels(files: list[str]) -> dict[str, str]:
    """The first implementation (list.count in a loop), kept as the reference."""
    stems = [Path(f).stem for f in files]
    clashing = {s for s in stems if stems.count(s) > 1}
    if not clashing:
        return dict(zip(files, stems, strict=True))
    common = Path(os.path.commonpath([os.path.dirname(f) for f in files]))

    def longer(path: str, keep_suffix: bool) -> str:
        relative = Path(path).relative_to(common)
        return str(relative if keep_suffix else relative.with_suffix("")).replace(os.sep, "__")

    labels = {f: (longer(f, False) if s in clashing else s) for f, s in zip(files, stems, strict=True)}
    values = list(labels.values())
    return {f: longer(f, True) if values.count(label) > 1 else label for f, label in labels.items()}


def test_labels_equal_the_reference_and_are_unique():
    rng = np.random.default_rng(0)
    files = sorted({
        f"/data/{rng.choice(['md', 'relax', 'md/hot'])}/{rng.choice(['a', 'b', 'c', 'cell_' + str(i)])}"
        f".{rng.choice(['xyz', 'cif'])}"
        for i in range(300)
    })
    labels = file_labels(files)
    assert labels == quadratic_labels(files)
    assert len(set(labels.values())) == len(files)
    assert file_labels(["/x/a.xyz", "/x/b.xyz"]) == {"/x/a.xyz": "a", "/x/b.xyz": "b"}
    assert file_labels(["/x/p/a.xyz", "/x/q/a.xyz"]) == {"/x/p/a.xyz": "p__a", "/x/q/a.xyz": "q__a"}


def test_frames_read_back_equal_ase_frame_by_frame(tmp_path):
    """Only the wanted frames of an (ext)xyz file are parsed; each equals ASE's own read of it."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from mace_ood.structures import InputError, read_structures
    from mace_ood.testing import random_structures

    frames = random_structures(12, seed=3, sizes=(1, 2))
    for i, atoms in enumerate(frames):
        atoms.info["step"] = i
        atoms.arrays["REF_forces"] = np.full((len(atoms), 3), float(i))
        atoms.calc = SinglePointCalculator(atoms, energy=-float(i), forces=np.ones((len(atoms), 3)) * i)
    ase.io.write(tmp_path / "md@1.extxyz", frames)
    ase.io.write(tmp_path / "plain.xyz", frames, format="xyz")
    ase.io.write(tmp_path / "one.vasp", frames[0], format="vasp")
    refs = [(str(tmp_path / "md@1.extxyz"), i) for i in (7, 0, 11, 7)] + [(str(tmp_path / "plain.xyz"), 5),
                                                                         (str(tmp_path / "one.vasp"), 0)]
    got = read_structures(refs)
    for position, ((path, index), atoms) in enumerate(zip(refs, got, strict=True)):
        expected = ase.io.read(path, index=index, do_not_split_by_at_sign=True)
        np.testing.assert_array_equal(atoms.positions, expected.positions)
        np.testing.assert_array_equal(atoms.numbers, expected.numbers)
        np.testing.assert_array_equal(atoms.cell, expected.cell)
        assert atoms.info == expected.info
        for key in expected.arrays:
            np.testing.assert_array_equal(atoms.arrays[key], expected.arrays[key])
        if expected.calc is not None and position != 3:  # a repeat is a copy, without the calculator
            assert atoms.get_potential_energy() == expected.get_potential_energy()
            np.testing.assert_array_equal(atoms.get_forces(), expected.get_forces())
    assert got[0] is not got[3] and got[0].info["step"] == 7
    with pytest.raises(InputError, match="frame 12 not found"):
        read_structures([(str(tmp_path / "md@1.extxyz"), 12)])
