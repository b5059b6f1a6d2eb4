"""The seed files of one evaluation, opened lazily as one (seed, atom, feature) dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from mace_ood.extract.store import STRUCTURE_FIELDS as STRUCTURE_VARS


class ScoreError(ValueError):
    pass


def open_latents(paths: list[str | Path], chunk_atoms: int | None = None) -> xr.Dataset:
    """Open the seed files of one evaluation lazily as one Dataset with a ``seed`` dimension.

    ``latent`` is a dask array (seed, atom, feature) chunked along atoms only; the small
    per-structure variables are loaded (from the first seed) and checked equal across seeds.
    """
    if not paths:
        raise ScoreError("no seed files to open")
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
    if all("layer_energy" in ds for ds in opened):
        out["layer_energy"] = xr.concat(
            [ds["layer_energy"].chunk({"atom": chunk_atoms, "layer": -1}) for ds in opened],
            dim="seed", coords="minimal", compat="override", join="override",
        )
    if all("llpr_force_jacobian" in ds for ds in opened):
        out["llpr_force_jacobian"] = xr.concat(
            [ds["llpr_force_jacobian"].chunk({"atom": chunk_atoms, "llpr_jacobian": -1}) for ds in opened],
            dim="seed", coords="minimal", compat="override", join="override",
        )
    for name, values in table.items():
        out[name] = ("structure", values)
    out.attrs["seed_files"] = [str(p) for p in paths]
    out.set_close(lambda: [ds.close() for ds in opened])
    return out
