from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from xarray.tests import raise_if_dask_computes

from mace_ood.extract.store import LatentWriter
from mace_ood.paths import partial_path
from mace_ood.score.compute import compute_scores
from mace_ood.score.latents import ScoreError, open_latents
from tests.synthetic import synthetic_latent_files


def numpy_scores(latents: np.ndarray, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    per_atom = latents.var(axis=0).mean(axis=-1)
    bounds = np.cumsum([0] + sizes)
    return per_atom, np.array([per_atom[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:], strict=True)])


def test_netcdf_reopens_with_declared_chunks(tmp_path):
    paths, latents, sizes = synthetic_latent_files(tmp_path, chunk_atoms=16)
    with xr.open_dataset(paths[1], engine="netcdf4") as ds:
        assert ds["latent"].encoding["chunksizes"] == (16, latents.shape[2])
        assert ds["latent"].encoding["zstd"] is True
        np.testing.assert_array_equal(ds["latent"].values, latents[1])
        assert list(ds["n_atoms"].values) == sizes
        assert ds["atom_offset"].values[-1] == sum(sizes[:-1])
        assert list(ds["structure_id"].values) == [f"s{i}" for i in range(len(sizes))]
        assert ds.attrs["seed"] == 1


@pytest.mark.parametrize("compression", ["zlib", "zstd", "none"])  # on incompressible float64 data
def test_other_compressions_read_back(tmp_path, compression):
    data = np.random.default_rng(0).standard_normal((50, 7))
    with LatentWriter(tmp_path / "c.nc", 7, "float64", chunk_atoms=16, compression=compression) as writer:
        writer.append("a", "f", 0, data)
    with xr.open_dataset(tmp_path / "c.nc") as ds:
        np.testing.assert_array_equal(ds["latent"].values, data)
        assert ds["latent"].encoding.get("zlib") is (compression == "zlib")


def test_writer_publishes_only_complete_files(tmp_path):
    path = tmp_path / "x.nc"
    with pytest.raises(ZeroDivisionError):
        with LatentWriter(path, 3) as writer:
            writer.append("a", "f", 0, np.ones((4, 3)))
            raise ZeroDivisionError("interrupted")
    assert not path.exists() and partial_path(path).exists()


def test_score_is_lazy_and_equals_numpy(tmp_path):
    paths, latents, sizes = synthetic_latent_files(tmp_path, chunk_atoms=16)
    with open_latents(paths) as ds:
        with raise_if_dask_computes():
            scores = compute_scores(ds, None)
        assert scores["latent_variance"].chunks is not None  # still a dask array
        computed = scores.compute()
    per_atom, per_structure = numpy_scores(latents, sizes)
    np.testing.assert_allclose(computed["atom_latent_variance"].values, per_atom, rtol=1e-12)
    np.testing.assert_allclose(computed["latent_variance"].values, per_structure, rtol=1e-10)


def test_score_reads_in_atom_chunks(tmp_path):
    paths, _, _ = synthetic_latent_files(tmp_path, chunk_atoms=16)
    with open_latents(paths) as ds:
        assert ds["latent"].data.chunksize[1] == 16
        assert ds["latent"].data.chunksize[2] == ds.sizes["feature"]


def test_seed_files_must_agree(tmp_path):
    a, _, _ = synthetic_latent_files(tmp_path / "a", sizes=(3, 4))
    b, _, _ = synthetic_latent_files(tmp_path / "b", sizes=(3, 5))
    with pytest.raises(ScoreError, match="differ"):
        open_latents([a[0], b[1]])
    with pytest.raises(ScoreError, match="no seed files"):
        open_latents([])
    with open_latents(a[:1]) as one:  # a family of one model
        assert one.sizes["seed"] == 1
