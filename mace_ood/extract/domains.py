"""Spatial domain decomposition for structures whose graph does not fit on the device.

A MACE model's last-layer features of an atom depend only on atoms within
``num_interactions * r_max`` of it (its receptive field). So a structure can be cut into
domains: each domain's *core* atoms plus a *halo* of every atom (periodic images included)
within that distance of the core region form a small non-periodic cluster, and the core
atoms' latents computed on the cluster equal those of the whole structure. Forces need
twice the halo (a force on atom i involves the energies of every atom within the receptive
field of i).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from ase import Atoms


@dataclass
class Domain:
    """One domain: the cluster to run, and which of its atoms are the core atoms."""

    cluster: Atoms
    core_in_cluster: np.ndarray  # indices into cluster
    core_in_structure: np.ndarray  # the same atoms' indices in the original structure


def _box(atoms: Atoms) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell, periodicity and fractional coordinates (wrapped along periodic axes)."""
    if atoms.cell.rank == 3:
        cell = atoms.cell.array.copy()
        pbc = atoms.pbc.copy()
        scaled = np.linalg.solve(cell.T, atoms.positions.T).T
    else:  # no cell: a bounding box, nothing periodic
        lo = atoms.positions.min(axis=0) - 1.0
        cell = np.diag(atoms.positions.max(axis=0) + 1.0 - lo)
        pbc = np.zeros(3, dtype=bool)
        scaled = np.linalg.solve(cell.T, (atoms.positions - lo).T).T
    scaled[:, pbc] -= np.floor(scaled[:, pbc])
    return cell, pbc, scaled


def heights(cell: np.ndarray) -> np.ndarray:
    """Perpendicular distances between opposite faces of the cell."""
    volume = abs(np.linalg.det(cell))
    return np.array([volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)])


def decompose(atoms: Atoms, grid: tuple[int, int, int], halo: float) -> Iterator[Domain]:
    """Split ``atoms`` into ``grid`` domains (along the cell vectors) with a halo of ``halo`` Å."""
    cell, pbc, scaled = _box(atoms)
    margin = halo / heights(cell)  # halo in fractional units, per axis
    n_images = [int(np.ceil(m)) if p else 0 for m, p in zip(margin, pbc, strict=True)]
    lower = scaled.min(axis=0)
    upper = scaled.max(axis=0)
    lower[pbc], upper[pbc] = 0.0, 1.0
    edges = [np.linspace(lower[k], upper[k], grid[k] + 1) for k in range(3)]
    base = scaled @ cell if atoms.cell.rank == 3 else atoms.positions
    shifts = np.array(list(itertools.product(*(range(-n, n + 1) for n in n_images))), dtype=float)
    for cell_index in itertools.product(*(range(g) for g in grid)):
        lo = np.array([edges[k][cell_index[k]] for k in range(3)])
        hi = np.array([edges[k][cell_index[k] + 1] for k in range(3)])
        last = np.array([cell_index[k] == grid[k] - 1 for k in range(3)])
        inside = (scaled >= lo) & ((scaled < hi) | (last & (scaled <= hi)))
        core = np.flatnonzero(inside.all(axis=1))
        if core.size == 0:
            continue
        indices, positions, is_core = [], [], []
        for shift in shifts:
            moved = scaled + shift
            keep = np.flatnonzero(((moved >= lo - margin) & (moved <= hi + margin)).all(axis=1))
            indices.append(keep)
            positions.append(base[keep] + shift @ cell)
            is_core.append(np.isin(keep, core) if not shift.any() else np.zeros(len(keep), dtype=bool))
        indices = np.concatenate(indices)
        is_core = np.concatenate(is_core)
        cluster = Atoms(numbers=atoms.numbers[indices], positions=np.concatenate(positions), pbc=False)
        core_in_cluster = np.flatnonzero(is_core)
        yield Domain(cluster, core_in_cluster, indices[core_in_cluster])


def grids(atoms: Atoms) -> Iterator[tuple[int, int, int]]:
    """Ever finer grids, splitting the longest perpendicular extent first."""
    cell, _, _ = _box(atoms)
    extent = heights(cell)
    grid = np.ones(3, dtype=int)
    for _ in range(30):
        k = int(np.argmax(extent / grid))
        grid[k] += 1
        yield tuple(int(g) for g in grid)
