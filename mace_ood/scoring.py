"""The latent-variance score, lazy and out of core (xarray + dask).

For one (family, dataset) with seed files s = 1..S holding latents z_s(atom, feature):

    u(atom)      = mean_feature Var_s z_s(atom, feature)     (population variance, ddof=0)
    U(structure) = mean_{atom in structure} u(atom)

The seed arrays are stacked to (seed, atom, feature) and reduced block by block along
atoms (``map_blocks``), which streams the files in chunk-sized slabs; the per-structure
mean is a difference of a running sum at the structure boundaries, so nothing of size
(atoms x features) is ever held in memory.
"""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr

from mace_ood.store import STRUCTURE_FIELDS as STRUCTURE_VARS


class ScoreError(ValueError):
    pass


def open_latents(paths: list[str | Path], chunk_atoms: int | None = None) -> xr.Dataset:
    """Open the seed files of one evaluation lazily as one Dataset with a ``seed`` dimension.

    ``latent`` is a dask array (seed, atom, feature) chunked along atoms only; the small
    per-structure variables are loaded (from the first seed) and checked equal across seeds.
    """
    if len(paths) < 2:
        raise ScoreError(f"the across-seed variance needs at least 2 seed files, got {len(paths)}")
    opened = [
        xr.open_dataset(path, engine="netcdf4", chunks={}, mask_and_scale=False, cache=False)
        for path in paths
    ]
    try:
        return _combine_seeds(paths, opened, chunk_atoms)
    except BaseException:
        for ds in opened:
            ds.close()
        raise


def _combine_seeds(paths: list, opened: list[xr.Dataset], chunk_atoms: int | None) -> xr.Dataset:
    first = opened[0]
    if chunk_atoms is None:
        chunk_atoms = int(first["latent"].encoding.get("chunksizes", (16384,))[0])
    table = {name: first[name].values for name in STRUCTURE_VARS}
    for path, ds in zip(paths[1:], opened[1:], strict=True):
        for name in ("structure_id", "n_atoms"):
            if not np.array_equal(ds[name].values, table[name]):
                raise ScoreError(
                    f"{path}: its structures differ from {paths[0]} ({name}); "
                    "were the seeds run on different inputs?"
                )
        if ds.sizes["feature"] != first.sizes["feature"]:
            raise ScoreError(f"{path}: latent width {ds.sizes['feature']} != {first.sizes['feature']}")
    latent = xr.concat(
        [ds["latent"].chunk({"atom": chunk_atoms, "feature": -1}) for ds in opened],
        dim="seed", coords="minimal", compat="override", join="override",
    )
    out = xr.Dataset({"latent": latent})
    if all("forces" in ds for ds in opened):
        out["forces"] = xr.concat(
            [ds["forces"].chunk({"atom": chunk_atoms, "xyz": -1}) for ds in opened],
            dim="seed", coords="minimal", compat="override", join="override",
        )
        out["node_energy"] = xr.concat(
            [ds["node_energy"].chunk({"atom": chunk_atoms}) for ds in opened],
            dim="seed", coords="minimal", compat="override", join="override",
        )
        out["energy"] = (("seed", "structure"), np.stack([ds["energy"].values for ds in opened]))
    for name, values in table.items():
        out[name] = ("structure", values)
    out.attrs["seed_files"] = [str(p) for p in paths]
    out.set_close(lambda: [ds.close() for ds in opened])
    return out


def _block_variance(block: np.ndarray) -> np.ndarray:
    return block.var(axis=0, dtype=np.float64).mean(axis=-1)


def atom_latent_variance(latent: xr.DataArray) -> xr.DataArray:
    """Per-atom mean over features of the across-seed variance, lazily (dims: atom)."""
    data = latent.transpose("seed", "atom", "feature").data
    data = data.rechunk({0: -1, 2: -1})
    per_atom = da.map_blocks(_block_variance, data, drop_axis=(0, 2), dtype=np.float64)
    return xr.DataArray(per_atom, dims=("atom",), name="atom_latent_variance")


def structure_mean(per_atom: xr.DataArray, atom_offset: np.ndarray, n_atoms: np.ndarray) -> xr.DataArray:
    """Mean of a per-atom array over each structure's contiguous atom range, lazily."""
    values = per_atom.data
    running = da.concatenate([da.zeros(1, dtype=values.dtype), da.cumsum(values)])
    starts = np.asarray(atom_offset, dtype=np.int64)
    stops = starts + np.asarray(n_atoms, dtype=np.int64)
    sums = running[stops] - running[starts]
    return xr.DataArray(sums / np.asarray(n_atoms), dims=("structure",))
