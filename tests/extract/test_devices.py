"""Each worker picks its own GPU from what it can see (environment and worker names in, device out)."""

from __future__ import annotations

import pytest

from mace_ood.extract.devices import PINNED_ENV, DeviceError, choose_device, local_rank


def test_local_rank_from_worker_names():
    assert local_rank(3) == 3 and local_rank("2") == 2
    assert local_rank("SLURMCluster-1234567-3") == 3  # dask-jobqueue: <prefix>-<jobid>-<n>
    assert local_rank("mace-ood-98765-0") == 0
    assert local_rank("tcp://10.0.0.1:1234") is None and local_rank(None) is None


def test_dask_cuda_workers_each_take_their_first_visible_gpu():
    """LocalCUDACluster rotates CUDA_VISIBLE_DEVICES; adding the worker index on top sent worker k
    to GPU 2k mod G (both workers of 2 on GPU 0)."""
    devices = [choose_device("cuda", 2, k, {PINNED_ENV: "1", "CUDA_VISIBLE_DEVICES": order})
               for k, order in enumerate(("0,1", "1,0"))]
    assert devices == ["cuda:0", "cuda:0"]  # device 0 of each worker's own rotated list = distinct GPUs


def test_a_process_pinned_to_one_gpu_uses_it():
    assert choose_device("auto", 1, 5, {"CUDA_VISIBLE_DEVICES": "3"}) == "cuda:0"


def test_jobqueue_workers_of_one_multi_gpu_job_get_distinct_gpus():
    names = [f"SLURMCluster-4242-{n}" for n in range(4)]
    assert [choose_device("cuda", 4, name, {}) for name in names] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


def test_plain_local_cluster_maps_worker_k_to_gpu_k():
    assert [choose_device("auto", 2, k, {}) for k in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]


def test_explicit_devices_and_errors():
    assert choose_device("cuda:1", 2, 0, {}) == "cuda:1"
    assert choose_device("cpu", 4, 1, {}) == "cpu"
    assert choose_device("auto", 0, 1, {}) == "cpu"
    with pytest.raises(DeviceError, match="sees 1 GPU"):
        choose_device("cuda:1", 1, 0, {})
    with pytest.raises(DeviceError, match="no GPU"):
        choose_device("cuda", 0, 0, {})
    assert choose_device("cuda", 3, "scheduler-less-name", {}) == "cuda:0"
