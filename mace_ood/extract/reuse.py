"""What is already on disk: content hashes, the reuse key, and earlier latents to copy from."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from ase import Atoms

from mace_ood.extract.models import sha256_of


def inputs_fingerprint(files: Iterable[str]) -> str:
    """Content hash of a dataset's files (order-sensitive)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(Path(path).name.encode())
        digest.update(sha256_of(path).encode())
    return digest.hexdigest()


def structure_hash(atoms: Atoms) -> str:
    """Content hash of what the model sees: species, positions, cell, periodicity."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(atoms.numbers, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(atoms.positions, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(atoms.cell.array, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(atoms.pbc, dtype=np.int8).tobytes())
    return digest.hexdigest()[:32]


class PreviousLatents:
    """Latents of an earlier file made by the same model and settings, found by structure content."""

    def __init__(self, path: Path) -> None:
        import netCDF4

        self._ds = netCDF4.Dataset(path)
        self._ds.set_auto_mask(False)
        hashes = self._ds["structure_hash"][:]
        self._index = {
            h: (int(o), int(n), i)
            for i, (h, o, n) in enumerate(zip(hashes, self._ds["atom_offset"][:], self._ds["n_atoms"][:], strict=True))
        }
        self.with_forces = "forces" in self._ds.variables
        self.with_layer_energy = "layer_energy" in self._ds.variables
        self.with_jacobian = "llpr_force_jacobian" in self._ds.variables

    def has(self, key: str) -> bool:
        return key in self._index

    def get(self, key: str) -> dict | None:
        found = self._index.get(key)
        if found is None:
            return None
        offset, n, row = found
        item = {"latent": self._ds["latent"][offset : offset + n]}
        if self.with_forces:
            item["forces"] = self._ds["forces"][offset : offset + n]
            item["node_energy"] = self._ds["node_energy"][offset : offset + n]
            item["energy"] = float(self._ds["energy"][row])
        if self.with_layer_energy:
            item["layer_energy"] = self._ds["layer_energy"][offset : offset + n]
        if self.with_jacobian:
            item["llpr_force_jacobian"] = self._ds["llpr_force_jacobian"][offset : offset + n]
        return item

    def close(self) -> None:
        self._ds.close()
