"""Latent files: one netCDF4 file per (family, seed, dataset), written as batches arrive.

Layout::

    latent(atom, feature)      float32/float64, chunked (chunk_atoms, n_feature), compressed
    atom_offset(structure)     first row of each structure in `latent`
    n_atoms(structure)
    structure_id(structure)    str
    source_file(structure)     str
    frame_index(structure)
    formula(structure)         str, e.g. Cu31
    info_json(structure)       str, the scalar entries of atoms.info as JSON
    structure_hash(structure)  str, content hash of species, positions, cell, pbc
    forces(atom, xyz), node_energy(atom), energy(structure)    only when forces are asked for
    layer_energy(atom, layer)  per-atom output of each earlier layer's linear readout for the
                               file's head (LLPR, mace_ood.score.llpr); L-1 columns, when L > 1
    llpr_force_jacobian(atom, llpr_jacobian)   the gradient by the atom's position of each of its
                               structure's summed LLPR features, (x, y, z) x feature: LLPR propagated
                               to the forces; only for a family of one model (``llpr_forces``)

The file is written under ``<name>.partial`` and renamed when closed complete, so a
file with the final name is always whole. netCDF4/HDF5 is not thread-safe: write from
one thread per process (the Dask workers run one thread each).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import netCDF4
import numpy as np

from mace_ood.paths import partial_path

STRUCTURE_CHUNK = 4096
# netCDF4 filter settings by name. blosc_lz4 wrote fastest in benchmarks/scoring.py but its
# HDF5 filter fails ("Buffer is uncompressible", then an HDF error) on incompressible chunks,
# e.g. random float64 mantissas: zstd is the default.
COMPRESSION = {
    "zstd": {"compression": "zstd", "complevel": 1, "shuffle": True},
    "zlib": {"compression": "zlib", "complevel": 1, "shuffle": True},
    "blosc_lz4": {"compression": "blosc_lz4", "complevel": 5, "blosc_shuffle": 1},
    "none": {},
}
STRING_FIELDS = ("structure_id", "source_file", "formula", "info_json", "structure_hash")
STRUCTURE_FIELDS = (*STRING_FIELDS, "frame_index", "atom_offset", "n_atoms")


class LatentWriter:
    """Stream per-structure latents into a netCDF file, with aligned, buffered chunk writes.

    Parameters
    ----------
    path
        Final file name; data go to ``path.partial`` until :meth:`close`.
    n_features
        Latent width.
    dtype
        numpy dtype of the stored latents.
    attrs
        Global attributes (model hash, versions, settings).
    chunk_atoms
        Chunk length along atoms; writes are buffered to whole chunks.
    compression
        A key of ``COMPRESSION``: ``zstd`` (default, level 1), ``zlib`` (level 1) or ``none``.
    """

    def __init__(
        self,
        path: str | Path,
        n_features: int,
        dtype: str | np.dtype = "float32",
        attrs: Mapping[str, Any] | None = None,
        chunk_atoms: int = 16384,
        compression: str = "zstd",
        with_forces: bool = False,
        on_durable: Callable[[int, int, Any], None] | None = None,
        resume_from: tuple[int, int] | None = None,
        n_layer_energies: int = 0,
        n_llpr_jacobian: int = 0,
    ) -> None:
        self.path = Path(path)
        self.tmp_path = partial_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.chunk_atoms = int(chunk_atoms)
        self.n_features = int(n_features)
        self.dtype = np.dtype(dtype)
        self.with_forces = with_forces
        self.n_layer_energies = int(n_layer_energies)
        self.n_llpr_jacobian = int(n_llpr_jacobian)
        self.on_durable = on_durable
        self._buffer: dict[str, list[np.ndarray]] = {}
        self._buffered = 0
        self._durable_atoms, self._durable_tag, self._reported = 0, None, -1
        self._meta: list[dict[str, Any]] = []
        if resume_from is not None:
            self._open_for_resume(*resume_from)
            return
        ds = netCDF4.Dataset(self.tmp_path, "w", format="NETCDF4")
        ds.set_auto_mask(False)
        ds.createDimension("atom", None)
        ds.createDimension("feature", self.n_features)
        ds.createDimension("structure", None)
        compress = COMPRESSION[compression]
        ds.createVariable(
            "latent", self.dtype, ("atom", "feature"),
            chunksizes=(self.chunk_atoms, self.n_features), **compress,
        )
        ds["latent"].long_name = "invariant (0e) node features before the readout"
        self._atom_vars = {"latent": (self.n_features,)}
        if with_forces:
            ds.createDimension("xyz", 3)
            ds.createVariable("forces", self.dtype, ("atom", "xyz"), chunksizes=(self.chunk_atoms, 3), **compress)
            ds["forces"].units = "eV/A"
            ds.createVariable("node_energy", self.dtype, ("atom",), chunksizes=(self.chunk_atoms,), **compress)
            ds["node_energy"].units = "eV"
            ds.createVariable("energy", "f8", ("structure",), chunksizes=(STRUCTURE_CHUNK,))
            ds["energy"].units = "eV"
            self._atom_vars.update({"forces": (3,), "node_energy": ()})
        if self.n_layer_energies:
            ds.createDimension("layer", self.n_layer_energies)
            ds.createVariable(
                "layer_energy", self.dtype, ("atom", "layer"),
                chunksizes=(self.chunk_atoms, self.n_layer_energies), **compress,
            )
            ds["layer_energy"].long_name = "per-atom output of each earlier layer's linear readout (head of the file)"
            self._atom_vars["layer_energy"] = (self.n_layer_energies,)
        if self.n_llpr_jacobian:
            ds.createDimension("llpr_jacobian", self.n_llpr_jacobian)
            ds.createVariable(
                "llpr_force_jacobian", self.dtype, ("atom", "llpr_jacobian"),
                chunksizes=(self.chunk_atoms, self.n_llpr_jacobian), **compress,
            )
            ds["llpr_force_jacobian"].long_name = (
                "gradient by the atom's position of its structure's summed LLPR features, (x, y, z) x feature")
            self._atom_vars["llpr_force_jacobian"] = (self.n_llpr_jacobian,)
        for name, kind in (("atom_offset", "i8"), ("n_atoms", "i4"), ("frame_index", "i4")):
            ds.createVariable(name, kind, ("structure",), chunksizes=(STRUCTURE_CHUNK,))
        for name in STRING_FIELDS:
            ds.createVariable(name, str, ("structure",), chunksizes=(STRUCTURE_CHUNK,))
        ds.setncatts({k: _attr(v) for k, v in (attrs or {}).items()})
        self._ds = ds
        self._buffer = {name: [] for name in self._atom_vars}
        self._written_atoms = 0
        self._written_structures = 0
        self.n_atoms_total = 0

    def _open_for_resume(self, n_structures: int, n_atoms: int) -> None:
        """Continue a ``.partial`` file after its first ``n_structures`` (``n_atoms`` atoms),
        which a previous, killed writer made durable; anything after them is overwritten."""
        ds = netCDF4.Dataset(self.tmp_path, "a")
        ds.set_auto_mask(False)
        self._atom_vars = {"latent": (self.n_features,)}
        if "forces" in ds.variables:
            self._atom_vars.update({"forces": (3,), "node_energy": ()})
        stored_layers = ds["layer_energy"].shape[1] if "layer_energy" in ds.variables else 0
        if stored_layers:
            self._atom_vars["layer_energy"] = (stored_layers,)
        stored_jacobian = ds["llpr_force_jacobian"].shape[1] if "llpr_force_jacobian" in ds.variables else 0
        if stored_jacobian:
            self._atom_vars["llpr_force_jacobian"] = (stored_jacobian,)
        if (ds["latent"].shape[1] != self.n_features or ("forces" in ds.variables) != self.with_forces
                or stored_layers != self.n_layer_energies or stored_jacobian != self.n_llpr_jacobian):
            ds.close()
            raise ValueError(f"{self.tmp_path}: does not match the settings of this extraction")
        self._ds = ds
        self._buffer = {name: [] for name in self._atom_vars}
        self._written_atoms = self.n_atoms_total = int(n_atoms)
        self._written_structures = int(n_structures)

    @property
    def n_structures(self) -> int:
        return self._written_structures + len(self._meta)

    def written_ids(self) -> list[str]:
        """Structure ids already in the file or its buffer (what a resumed run has done)."""
        on_disk = [str(i) for i in self._ds["structure_id"][: self._written_structures]] if self._written_structures else []
        return on_disk + [m["structure_id"] for m in self._meta]

    def append(
        self,
        structure_id: str,
        source_file: str,
        frame_index: int,
        latents: np.ndarray,
        formula: str = "",
        info_json: str = "{}",
        structure_hash: str = "",
        forces: np.ndarray | None = None,
        node_energy: np.ndarray | None = None,
        energy: float | None = None,
        tag: Any = None,
        layer_energy: np.ndarray | None = None,
        llpr_force_jacobian: np.ndarray | None = None,
    ) -> None:
        """Add one structure's latents, shape (n_atoms, n_features), and its description.

        With ``with_forces``, its predicted forces (n_atoms, 3), per-atom energies and energy too.
        With ``n_layer_energies``, its ``layer_energy`` (n_atoms, n_layer_energies); with
        ``n_llpr_jacobian``, its ``llpr_force_jacobian`` (n_atoms, n_llpr_jacobian).
        ``tag`` is handed back to ``on_durable`` once this structure is durable.
        """
        if latents.ndim != 2 or latents.shape[1] != self.n_features:
            raise ValueError(f"latents of {structure_id} have shape {latents.shape}, expected (n, {self.n_features})")
        if self.with_forces and (forces is None or node_energy is None or energy is None):
            raise ValueError(f"{structure_id}: this file stores forces and energies; none given")
        if self.n_layer_energies and layer_energy is None:
            raise ValueError(f"{structure_id}: this file stores layer energies (LLPR); none given")
        if self.n_llpr_jacobian and llpr_force_jacobian is None:
            raise ValueError(f"{structure_id}: this file stores the LLPR force Jacobian; none given")
        meta = {
            "structure_id": structure_id, "source_file": source_file, "formula": formula,
            "info_json": info_json, "frame_index": int(frame_index), "n_atoms": latents.shape[0],
            "atom_offset": self.n_atoms_total, "structure_hash": structure_hash, "tag": tag,
        }
        self._buffer["latent"].append(np.asarray(latents, dtype=self.dtype))
        if self.with_forces:
            meta["energy"] = float(energy)
            self._buffer["forces"].append(np.asarray(forces, dtype=self.dtype).reshape(-1, 3))
            self._buffer["node_energy"].append(np.asarray(node_energy, dtype=self.dtype).reshape(-1))
        if self.n_layer_energies:
            self._buffer["layer_energy"].append(
                np.asarray(layer_energy, dtype=self.dtype).reshape(-1, self.n_layer_energies)
            )
        if self.n_llpr_jacobian:
            self._buffer["llpr_force_jacobian"].append(
                np.asarray(llpr_force_jacobian, dtype=self.dtype).reshape(-1, self.n_llpr_jacobian)
            )
        self._meta.append(meta)
        self._buffered += latents.shape[0]
        self.n_atoms_total += latents.shape[0]
        if self._buffered >= self.chunk_atoms:
            self._flush(whole_chunks_only=True)
            self._make_durable()

    def checkpoint(self) -> None:
        """Write everything appended so far (a partial chunk too) and make it durable."""
        self._flush()
        self._report_durable()

    def _make_durable(self) -> None:
        """Write the tables of the structures whose atoms are all on disk, sync, and report."""
        n_whole = 0
        for meta in self._meta:
            if meta["atom_offset"] + meta["n_atoms"] > self._written_atoms:
                break
            n_whole += 1
        if n_whole:
            self._write_meta(n_whole)
            self._report_durable()

    def _report_durable(self) -> None:
        """Sync, then tell ``on_durable`` how far the file is whole (once per new structure written)."""
        if self.on_durable is not None and self._durable_tag is not None and self._reported != self._written_structures:
            self._ds.sync()
            self.on_durable(self._written_structures, self._durable_atoms, self._durable_tag)
            self._reported = self._written_structures

    def _flush(self, whole_chunks_only: bool = False) -> None:
        if self._buffered:
            n_write = (self._buffered // self.chunk_atoms) * self.chunk_atoms if whole_chunks_only else self._buffered
            start = self._written_atoms
            for name, parts in self._buffer.items():
                block = np.concatenate(parts) if len(parts) > 1 else parts[0]
                if n_write:
                    self._ds[name][start : start + n_write, ...] = block[:n_write]
                rest = block[n_write:]
                self._buffer[name] = [rest] if len(rest) else []
            self._written_atoms += n_write
            self._buffered -= n_write
        if self._meta and not whole_chunks_only:
            self._write_meta(len(self._meta))

    def _write_meta(self, n: int) -> None:
        metas, self._meta = self._meta[:n], self._meta[n:]
        start = self._written_structures
        stop = start + len(metas)
        ds = self._ds
        ds["atom_offset"][start:stop] = np.array([m["atom_offset"] for m in metas], dtype=np.int64)
        ds["n_atoms"][start:stop] = np.array([m["n_atoms"] for m in metas], dtype=np.int32)
        ds["frame_index"][start:stop] = np.array([m["frame_index"] for m in metas], dtype=np.int32)
        for name in STRING_FIELDS:
            ds[name][start:stop] = np.array([m[name] for m in metas], dtype=object)
        if self.with_forces:
            ds["energy"][start:stop] = np.array([m["energy"] for m in metas])
        self._written_structures = stop
        self._durable_atoms = metas[-1]["atom_offset"] + metas[-1]["n_atoms"]
        self._durable_tag = metas[-1]["tag"]

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Add global attributes (e.g. totals known only at the end)."""
        self._ds.setncatts({k: _attr(v) for k, v in attrs.items()})

    def close(self) -> Path:
        """Flush, close and rename to the final name. Returns the final path."""
        self._flush()
        sizes = (self._ds.dimensions["atom"].size, self._ds.dimensions["structure"].size)
        if sizes != (self.n_atoms_total, self._written_structures):
            self._ds.close()
            raise RuntimeError(
                f"{self.tmp_path}: holds {sizes} atoms/structures but {self.n_atoms_total}/"
                f"{self._written_structures} were written; not publishing it"
            )
        self._ds.complete = 1
        self._ds.close()
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Close without publishing; the partial file stays for inspection."""
        try:
            self._ds.close()
        except RuntimeError:
            pass

    def __enter__(self) -> LatentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _attr(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str, np.number)):
        return value
    return str(value)


def read_structure_table(path: str | Path) -> dict[str, np.ndarray]:
    """The per-structure variables of a latent file (small), as numpy arrays."""
    with netCDF4.Dataset(path) as ds:
        ds.set_auto_mask(False)
        return {
            name: np.asarray(ds[name][:])
            for name in STRUCTURE_FIELDS
        }


def read_attrs(path: str | Path) -> dict[str, Any]:
    with netCDF4.Dataset(path) as ds:
        return {k: ds.getncattr(k) for k in ds.ncattrs()}
