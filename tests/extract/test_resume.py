"""Never lose work: SIGKILL mid-extraction and resume; recompute only what changed."""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import nullcontext

import ase.io
import numpy as np
import pytest
import xarray as xr

from mace_ood.config import ExtractionSettings
from mace_ood.extract.stream import extract_to_netcdf
from mace_ood.paths import partial_path, progress_path
from mace_ood.testing import random_structures

SETTINGS = ExtractionSettings(device="cpu", default_dtype="float64", batch_size=2, chunk_atoms=64)


def _extract(model: str, dataset: str, out: str, settings_json: str) -> None:
    """The killed process's work (module level: the forked or spawned child imports this file)."""
    extract_to_netcdf(model, [dataset], out, ExtractionSettings.model_validate_json(settings_json))


def latents_of(path):
    with xr.open_dataset(path) as ds:
        return {name: ds[name].values for name in ("latent", "structure_id", "atom_offset", "n_atoms")}


def assert_same(a, b):
    np.testing.assert_array_equal(a["structure_id"], b["structure_id"])
    np.testing.assert_array_equal(a["atom_offset"], b["atom_offset"])
    np.testing.assert_allclose(a["latent"], b["latent"], atol=1e-12)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    structures = random_structures(150, seed=5, sizes=(2,))
    structures.insert(40, random_structures(1, symbols=("Fe",))[0])  # skipped: Fe unknown to the model
    path = root / "big.xyz"
    ase.io.write(path, structures)
    return path


@pytest.fixture(scope="module")
def uninterrupted(dataset, tiny_models):
    out = dataset.parent / "reference" / "seed-0.nc"
    summary = extract_to_netcdf(tiny_models["T1"][0], [str(dataset)], out, SETTINGS)
    assert len(summary.skipped) == 1
    return latents_of(out), summary


def run_and_kill(model, dataset, out, when_structures: int) -> int:
    """Start a real extraction process; SIGKILL it once `when_structures` are durable.

    The process is forked from the forkserver the flow's local workers fork from (torch and mace
    imported once; a fresh interpreter costs ~6 CPU-seconds each, 36 in this file), with the
    session's Prefect settings so it is the one this xdist worker's runs use; spawned where
    workers are not forked."""
    import multiprocessing

    from prefect.settings import PREFECT_API_URL

    from mace_ood.cluster import can_fork_workers, forked_local_workers, worker_environment

    env = {**os.environ, **worker_environment(1, PREFECT_API_URL.value())}
    forkable = can_fork_workers(env, gpu=False)
    with forked_local_workers(env) if forkable else nullcontext(False) as forked:
        context = multiprocessing.get_context("forkserver" if forked else "spawn")
        process = context.Process(target=_extract, args=(str(model), str(dataset), str(out), SETTINGS.model_dump_json()),
                                  daemon=True)
        process.start()
    record = progress_path(out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.is_alive():
        if when_structures == 0 and partial_path(out).exists():
            break
        if record.exists():
            try:
                if json.loads(record.read_text())["n_structures"] >= when_structures:
                    break
            except (json.JSONDecodeError, KeyError, FileNotFoundError):
                pass
        time.sleep(0.005)
    assert process.is_alive(), "the extraction finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    # what is durable now (the process may have gone on between the last look and the kill)
    return json.loads(record.read_text())["n_structures"] if record.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("kill_points", [(0,), (10,), (60,), (110,), (20, 90)])
def test_killed_extraction_resumes_to_identical_latents(prefect_server, dataset, tiny_models, uninterrupted, tmp_path,
                                                       kill_points):
    reference, full = uninterrupted
    out = tmp_path / "seed-0.nc"
    durable = 0
    for point in kill_points:
        durable = run_and_kill(tiny_models["T1"][0], dataset, out, point)
        assert not out.exists() and partial_path(out).exists()
    summary = extract_to_netcdf(tiny_models["T1"][0], [str(dataset)], out, SETTINGS)
    assert summary.resumed_structures == durable
    assert summary.computed_structures == full.n_structures - durable
    assert summary.skipped == full.skipped
    assert not progress_path(out).exists() and not partial_path(out).exists()
    assert_same(latents_of(out), reference)


def test_only_changed_structures_are_recomputed(tiny_models, tmp_path):
    structures = random_structures(20, seed=9)
    data = tmp_path / "data.xyz"
    ase.io.write(data, structures)
    out = tmp_path / "lat" / "seed-0.nc"
    first = extract_to_netcdf(tiny_models["T1"][0], [str(data)], out, SETTINGS)
    assert first.computed_structures == 20
    again = extract_to_netcdf(tiny_models["T1"][0], [str(data)], out, SETTINGS)
    assert again.reused and again.forward_passes == 0
    # three new structures, one moved atom: 4 computed, 19 copied
    structures[5].positions[0] += 0.1
    ase.io.write(data, structures + random_structures(3, seed=10))
    grown = extract_to_netcdf(tiny_models["T1"][0], [str(data)], out, SETTINGS)
    assert (grown.computed_structures, grown.copied_structures) == (4, 19)
    fresh = tmp_path / "fresh" / "seed-0.nc"
    extract_to_netcdf(tiny_models["T1"][0], [str(data)], fresh, SETTINGS)
    assert_same(latents_of(out), latents_of(fresh))
    # --refresh recomputes everything, and gives the same latents
    refreshed = extract_to_netcdf(tiny_models["T1"][0], [str(data)], out, SETTINGS.model_copy(update={"refresh": True}))
    assert not refreshed.reused and refreshed.computed_structures == 23 and refreshed.copied_structures == 0
    assert_same(latents_of(out), latents_of(fresh))
    # another model: nothing can be copied
    other = extract_to_netcdf(tiny_models["T1"][1], [str(data)], out, SETTINGS)
    assert other.computed_structures == 23 and other.copied_structures == 0
