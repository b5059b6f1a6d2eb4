"""Prefect wiring: OOM retries halve the batch; other failures are not retried."""

from __future__ import annotations

import pytest
from prefect import flow

import tasks.extract as extract_module
from mace_ood.config import ExtractionSettings
from mace_ood.extract.oom import OutOfMemoryError, is_out_of_memory
from mace_ood.extract.stream import ExtractionSummary
from mace_ood.records import ExtractionJob

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
