"""The vectorised EMT the demo and the flag-rate data use gives ASE's EMT results."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT

from mace_ood.demo import md_frames
from mace_ood.emt import VectorEMT


def alloy() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.70, cubic=True) * (2, 2, 2)
    numbers = atoms.numbers.copy()
    numbers[np.random.default_rng(0).choice(len(atoms), 8, replace=False)] = 79
    atoms.numbers = numbers
    return atoms


def vacancy() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
    del atoms[0]
    return atoms


CASES = {
    "CuAu-alloy": alloy,
    "Pd-108": lambda: bulk("Pd", "fcc", a=3.89, cubic=True) * (3, 3, 3),
    "Cu-slab": lambda: fcc111("Cu", size=(3, 3, 4), a=3.61, vacuum=7.0, periodic=True),
    "Cu-vacancy": vacancy,
    "AlNiPt-triclinic": lambda: Atoms("AlNiPt", scaled_positions=[[0, 0, 0], [0.4, 0.5, 0.45], [0.7, 0.2, 0.8]],
                                      cell=[[4.1, 0, 0], [0.8, 3.9, 0], [0.5, 0.7, 4.3]], pbc=True),
    "isolated-atom": lambda: Atoms("Cu2Al", positions=[[0, 0, 0], [2.5, 0, 0], [20, 20, 20]], cell=[30] * 3),
}


@pytest.mark.parametrize("make", CASES.values(), ids=CASES.keys())
def test_energies_forces_and_stress_equal_ase(make):
    atoms = make()
    atoms.rattle(0.1, seed=1)
    reference, vector = atoms.copy(), atoms.copy()
    reference.calc, vector.calc = EMT(), VectorEMT()
    assert vector.get_potential_energy() == pytest.approx(reference.get_potential_energy(), rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(vector.get_potential_energies(), reference.get_potential_energies(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(vector.get_forces(), reference.get_forces(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(vector.get_stress(), reference.get_stress(), rtol=1e-10, atol=1e-14)
    assert np.abs(reference.get_forces()).max() > 0.1  # the comparison is not of zeros


def test_md_follows_ase_emt(monkeypatch):
    """The demo's MD with ASE's own EMT in its place: the same frames and labels."""
    import mace_ood.demo as demo

    ours = md_frames(alloy(), 400, seed=3, n_frames=3)
    monkeypatch.setattr(demo, "VectorEMT", EMT)
    theirs = md_frames(alloy(), 400, seed=3, n_frames=3)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a.positions, b.positions, rtol=0, atol=1e-10)
        assert a.info["REF_energy"] == pytest.approx(b.info["REF_energy"], abs=1e-10)
        np.testing.assert_allclose(a.arrays["REF_forces"], b.arrays["REF_forces"], atol=1e-9)
