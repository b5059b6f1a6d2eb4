"""Reuse keyed on what changes the numbers; pinned model content checked by the worker;
a resumed run rebuilds every piece of state it needs from the file."""

from __future__ import annotations

import shutil

import ase.io
import numpy as np
import pytest
import torch

import mace_ood.extract.models as models
from mace_ood.config import ExtractionSettings
from mace_ood.extract.models import ModelError, sha256_of
from mace_ood.extract.stream import extract_to_netcdf
from mace_ood.paths import partial_path
from mace_ood.structures import iter_structures
from mace_ood.testing import random_structures

SETTINGS = ExtractionSettings(device="cpu", default_dtype="float64", batch_size=4, chunk_atoms=64)


def latents(path):
    import netCDF4

    with netCDF4.Dataset(path) as ds:
        return np.asarray(ds["latent"][:]), [str(i) for i in ds["structure_id"][:]]


def test_batch_size_reuses_and_layout_changes_copy(tiny_models, tmp_path):
    data = tmp_path / "d.xyz"
    ase.io.write(data, random_structures(8, seed=1))
    out = tmp_path / "seed-0.nc"
    first = extract_to_netcdf(tiny_models["T1"][0], [str(data)], out, SETTINGS)
    assert first.computed_structures == 8
    reference, _ = latents(out)
    bigger = extract_to_netcdf(tiny_models["T1"][0], [str(data)], out, SETTINGS.model_copy(update={"batch_size": 8}))
    assert bigger.reused and bigger.forward_passes == 0  # was: 8 of 8 files rewritten
    relaid = extract_to_netcdf(
        tiny_models["T1"][0], [str(data)], out, SETTINGS.model_copy(update={"chunk_atoms": 128, "compression": "zlib"})
    )
    assert not relaid.reused and (relaid.computed_structures, relaid.copied_structures) == (0, 8)
    import netCDF4

    with netCDF4.Dataset(out) as ds:
        assert ds["latent"].chunking()[0] == 128 and ds["latent"].filters()["zlib"]
    np.testing.assert_array_equal(latents(out)[0], reference)
    dtype = extract_to_netcdf(tiny_models["T1"][0], [str(data)], out, SETTINGS.model_copy(update={"default_dtype": "float32"}))
    assert dtype.computed_structures == 8  # the numbers change: recomputed


def test_a_model_replaced_after_planning_is_refused_before_unpickling(tiny_models, tmp_path, monkeypatch):
    model = tmp_path / "m.model"
    shutil.copy(tiny_models["T1"][0], model)
    planned = sha256_of(model)
    shutil.copy(tiny_models["T1"][1], model)  # replaced between planning and loading
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or pytest.fail("unpickled"))
    data = tmp_path / "d.xyz"
    ase.io.write(data, random_structures(2, seed=2))
    with pytest.raises(ModelError, match="SHA-256 .* was planned"):
        extract_to_netcdf(model, [str(data)], tmp_path / "o.nc", SETTINGS, expected_sha256=planned)
    with pytest.raises(ModelError, match="was planned"):  # the loader checks the bytes it loads
        models.load_model(model, expected_sha256=planned)
    assert loads == []


def test_each_file_is_hashed_once_per_process(tiny_models, tmp_path, monkeypatch):
    model = tmp_path / "m.model"
    shutil.copy(tiny_models["T1"][0], model)
    models._sha256_cached.cache_clear()
    opened = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        if str(path) == str(model.resolve()):
            opened.append(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    first = sha256_of(model)
    assert sha256_of(model) == first and len(opened) == 1
    model.write_bytes(model.read_bytes() + b"\0")  # new content, new size: hashed again
    assert sha256_of(model) != first and len(opened) == 2


class Killed(Exception):
    pass


def test_resume_rebuilds_the_seen_ids_across_the_kill_point(tiny_models, tmp_path):
    """A duplicate id whose first copy was written before the kill is still a duplicate after it."""
    data = tmp_path / "data"
    data.mkdir()
    ase.io.write(data / "p.xyz", random_structures(4, seed=3))
    ase.io.write(data / "x.xyz", random_structures(2, seed=4))  # ids x@0, x@1
    ase.io.write(data / "x@1.xyz", random_structures(1, seed=5)[0])  # id x@1 again
    files = sorted(str(p) for p in data.iterdir())
    assert [r.structure_id for r, _ in iter_structures(files)][-2:] == ["x@1", "x@1"]
    settings = SETTINGS.model_copy(update={"batch_size": 1})
    full = extract_to_netcdf(tiny_models["T1"][0], files, tmp_path / "full.nc", settings)
    assert [s["structure_id"] for s in full.skipped] == ["x@1"]

    out = tmp_path / "killed.nc"

    def kill_after_x1(n_structures, n_atoms):
        if n_structures == 6:  # p@0..3, x@0, x@1 durable; x@1.xyz not read yet
            raise Killed

    with pytest.raises(Killed):
        extract_to_netcdf(tiny_models["T1"][0], files, out, settings, progress=kill_after_x1, checkpoint_seconds=0)
    assert partial_path(out).exists()
    resumed = extract_to_netcdf(tiny_models["T1"][0], files, out, settings)
    assert resumed.resumed_structures == 6 and resumed.computed_structures == 0
    assert resumed.skipped == full.skipped
    got, ids = latents(out)
    want, want_ids = latents(tmp_path / "full.nc")
    assert ids == want_ids and len(set(ids)) == len(ids)
    np.testing.assert_allclose(got, want, atol=1e-12)
