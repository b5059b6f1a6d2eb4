"""Prefect wiring: OOM retries halve the batch; other failures are not retried."""

from __future__ import annotations

import pytest
from prefect import flow

import mace_ood.tasks.extract as extract_module
from mace_ood.config import ExtractionSettings
from mace_ood.extract.oom import OutOfMemoryError, is_out_of_memory
from mace_ood.extract.stream import ExtractionSummary
from mace_ood.records import ExtractionJob
from tests.oom_injection import inject as inject_collation_oom

JOB = ExtractionJob("F", 0, "m.model", "D", ("a.xyz",), "out/seed-0.nc")


def test_is_out_of_memory():
    class OutOfMemoryErrorLike(Exception):
        pass

    OutOfMemoryErrorLike.__name__ = "OutOfMemoryError"
    assert is_out_of_memory(OutOfMemoryErrorLike())
    assert is_out_of_memory(OutOfMemoryError("budget"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.parametrize(("attempt", "expected"), [(1, 16), (2, 8), (3, 4), (5, 1), (9, 1)])
def test_batch_size_halves_per_attempt(attempt, expected):
    assert extract_module.batch_size_for_attempt(16, attempt) == expected
    assert extract_module.batch_size_for_attempt(None, attempt) is None  # no count cap: the budget halves
    budget = extract_module.settings_for_attempt(ExtractionSettings(), attempt).max_atoms_per_batch
    assert budget == max(1, 4096 >> (attempt - 1))


def test_task_retries_out_of_memory_with_halved_batches(prefect_server, monkeypatch):
    seen = []

    def fake_extract(model_path, files, out_path, settings, batch_size=None, progress=None, **_):
        seen.append(batch_size)
        if batch_size > 2:
            raise OutOfMemoryError(f"out of memory at batch {batch_size}")
        return ExtractionSummary(path=out_path, model_path=model_path, model_sha256="x", n_structures=1)

    monkeypatch.setattr(extract_module, "extract_to_netcdf", fake_extract)
    task = extract_module.extract_latents.with_options(retry_delay_seconds=0)

    @flow
    def one():
        return task(JOB, ExtractionSettings(device="cpu", batch_size=8))

    result = one()
    assert seen == [8, 4, 2]
    assert result["n_structures"] == 1 and result["family"] == "F"


def test_task_does_not_retry_other_errors(prefect_server, monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise ValueError("corrupt input")

    monkeypatch.setattr(extract_module, "extract_to_netcdf", broken)
    task = extract_module.extract_latents.with_options(retry_delay_seconds=0)

    @flow
    def one():
        return task(JOB, ExtractionSettings(device="cpu"))

    with pytest.raises(ValueError, match="corrupt input"):
        one()
    assert calls == [1]


def test_retry_gets_past_an_oom_the_in_process_back_off_cannot(prefect_server, monkeypatch, tiny_models, tmp_path):
    """No mock of the extraction: an injected budget makes collating more than 40 atoms run out of
    memory (before the model, so batch halving in-process never sees it); only a retry with a
    smaller atom budget per batch gets through, and its latents equal an unconstrained run's."""
    import ase.io
    import numpy as np
    import xarray as xr

    from mace_ood.extract.stream import extract_to_netcdf
    from mace_ood.testing import random_structures

    data = tmp_path / "d.xyz"
    ase.io.write(data, random_structures(6, seed=7, sizes=(2,)))  # 32 atoms each
    job = ExtractionJob("F", 0, str(tiny_models["T1"][0]), "D", (str(data),), str(tmp_path / "seed-0.nc"))
    settings = ExtractionSettings(device="cpu", batch_size=8, max_atoms_per_batch=128, chunk_atoms=64)
    reference = extract_to_netcdf(job.model_path, [str(data)], tmp_path / "free.nc", settings)
    inject_collation_oom(40, monkeypatch)
    task = extract_module.extract_latents.with_options(retry_delay_seconds=0)

    @flow
    def one():
        return task(job, settings)

    result = one()
    assert result["n_structures"] == 6 == reference.n_structures
    with xr.open_dataset(job.out_path) as a, xr.open_dataset(tmp_path / "free.nc") as b:
        np.testing.assert_allclose(a["latent"].values, b["latent"].values, atol=1e-12)
    assert extract_module.settings_for_attempt(settings, 3).max_atoms_per_batch == 32  # 128 -> 64 -> 32: fits


def test_an_out_of_memory_no_retry_fixes_fails_after_four_retries(prefect_server, tiny_models, tmp_path, monkeypatch):
    calls = []
    real = extract_module.extract_to_netcdf

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    import ase.io

    from mace_ood.testing import random_structures

    data = tmp_path / "d.xyz"
    ase.io.write(data, random_structures(1, seed=8, sizes=(2,)))
    monkeypatch.setattr(extract_module, "extract_to_netcdf", counting)
    inject_collation_oom(1, monkeypatch)  # no batch of even one structure collates
    job = ExtractionJob("F", 0, str(tiny_models["T1"][0]), "D", (str(data),), str(tmp_path / "seed-0.nc"))
    task = extract_module.extract_latents.with_options(retry_delay_seconds=0)

    @flow
    def one():
        return task(job, ExtractionSettings(device="cpu", batch_size=2, max_atoms_per_batch=2))

    with pytest.raises(RuntimeError, match="out of memory"):
        one()
    assert len(calls) == 5  # retried (it is an out-of-memory error), 4 times at most, then failed
