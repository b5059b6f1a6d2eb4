"""ASE's EMT with every atom's terms computed at once (numpy over the pair list).

ASE's ``EMT.calculate`` loops over atoms in Python: ~3 ms per step of a 32-atom cell, and the
demo's and the tests' EMT molecular dynamics spent most of their time there. This subclass keeps
ASE's parameters, cutoff, neighbour list and formulas (``ase.calculators.emt``) and evaluates the
same per-pair and per-atom expressions as arrays; energies, forces and stress equal ASE's to
rounding (``tests/test_emt.py``).
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import PropertyNotImplementedError, all_changes
from ase.calculators.emt import EMT, beta


class VectorEMT(EMT):
    """Drop-in :class:`ase.calculators.emt.EMT` (same results), vectorised over atoms."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super(EMT, self).calculate(atoms, properties, system_changes)  # Calculator's: set self.atoms
        if "numbers" in system_changes:
            self.initialize(self.atoms)
        self.nl.update(self.atoms)
        i, j, d, r = self._pairs()
        n_atoms = len(self.atoms)
        par, iz = self.par, self.ia2iz
        zi, zj = iz[i], iz[j]

        w = 1.0 / (1.0 + np.exp(self.acut * (r - self.rc)))
        dwdroverw = self.acut * (w - 1.0)
        chi = self.chi[zi, zj]
        dsigma1s = np.exp(-par["eta2"][zj] * (r - beta * par["s0"][zj])) * chi * w
        dsigma1o = np.exp(-par["eta2"][zi] * (r - beta * par["s0"][zi])) / chi * w
        dsigma2s = np.exp(-par["kappa"][zj] * (r / beta - par["s0"][zj])) * chi * w
        dsigma2o = np.exp(-par["kappa"][zi] * (r / beta - par["s0"][zi])) / chi * w

        # E_c and the second term of E_AS, per atom with neighbours (ASE skips the others)
        has = np.bincount(i, minlength=n_atoms) > 0
        sigma1 = np.bincount(i, dsigma1s, minlength=n_atoms)[has]
        e0s, v0s, eta2s = par["E0"][iz[has]], par["V0"][iz[has]], par["eta2"][iz[has]]
        lmds, kappas = par["lambda"][iz[has]], par["kappa"][iz[has]]
        ds = -np.log(sigma1 * par["inv12gamma1"][iz[has]]) / (beta * eta2s)
        lmdsds = lmds * ds
        expneglmdds = np.exp(-lmdsds)
        sixv0expnegkppds = 6.0 * v0s * np.exp(-kappas * ds)
        energies = np.zeros(n_atoms)
        deds = np.zeros(n_atoms)
        energies[has] = e0s * (1.0 + lmdsds) * expneglmdds + sixv0expnegkppds
        deds[has] = (-e0s * lmds * lmdsds * expneglmdds - kappas * sixv0expnegkppds) / (-beta * eta2s * sigma1)

        # forces and stress of those terms, and the first term of E_AS with its derivatives
        dedr_c = (deds[i] * dsigma1s * (dwdroverw - par["eta2"][zj])
                  + deds[j] * dsigma1o * (dwdroverw - par["eta2"][zi]))
        es = par["neghalfv0overgamma2"][zi] * dsigma2s
        eo = par["neghalfv0overgamma2"][zj] * dsigma2o
        energies += 0.5 * np.bincount(i, es + eo, minlength=n_atoms)
        dedr_as = es * (dwdroverw - par["kappa"][zj] / beta) + eo * (dwdroverw - par["kappa"][zi] / beta)
        f = ((dedr_c + dedr_as) / r)[:, None] * d
        forces = np.stack([np.bincount(i, f[:, k], minlength=n_atoms) for k in range(3)], axis=1)

        energies -= par["E0"][iz]  # ASAP convention
        self.energies, self.forces, self.deds = energies, forces, deds
        energy = np.add.reduce(energies, axis=0)
        self.results["energy"] = self.results["free_energy"] = energy
        self.results["energies"] = energies
        self.results["forces"] = forces
        if self.atoms.cell.rank == 3:
            stress = 0.5 * (d.T @ f)  # half: each pair is counted from both ends
            stress = (stress + stress.T) * 0.5 / self.atoms.get_volume()
            self.stress = stress
            self.results["stress"] = stress.flat[[0, 4, 8, 5, 2, 1]]
        elif "stress" in properties:
            raise PropertyNotImplementedError

    def _pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every (atom, neighbour) pair within ``rc_list``, both ways, as ASE's ``_get_neighbors``
        gives them atom by atom: indices, vectors from atom to neighbour, and lengths."""
        positions, cell = self.atoms.positions, np.asarray(self.atoms.cell)
        primitive = self.nl.nl  # ASE's PrimitiveNeighborList: what get_neighbors(a) returns, per atom
        neighbours, offsets = primitive.neighbors, primitive.displacements
        counts = np.array([len(a) for a in neighbours])
        i = np.repeat(np.arange(len(self.atoms)), counts)
        j = np.concatenate(neighbours).astype(int) if counts.sum() else np.zeros(0, int)
        shift = np.concatenate(offsets) @ cell if counts.sum() else np.zeros((0, 3))
        d = positions[j] + shift - positions[i]
        r = np.sqrt(np.add.reduce(d**2, axis=1))
        keep = r < self.rc_list
        return i[keep], j[keep], d[keep], r[keep]
