"""Local CPU workers fork from one process that imported torch and mace once
(``mace_ood.cluster.forked_local_workers``), and still get the flow's settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mace_ood.cluster import WORKER_PRELOAD, can_fork_workers, forked_local_workers


def test_the_preloaded_modules_import_no_prefect():
    """Prefect reads its settings (the flow's API URL) at import: imported before the fork, every
    worker would talk to the server the first run named, or start its own."""
    code = f"import sys; [__import__(m) for m in {list(WORKER_PRELOAD)!r}]; print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"  # mace prints a line about cuequivariance


@pytest.mark.parametrize(("env", "gpu", "expected"), [
    ({"OMP_NUM_THREADS": "1"}, False, sys.platform.startswith("linux")),
    ({"OMP_NUM_THREADS": "2"}, False, False),  # a thread pool forked half-made
    ({"OMP_NUM_THREADS": "1"}, True, False),  # CUDA is not fork-safe
    ({}, False, False),
])
def test_only_single_threaded_cpu_workers_fork(env, gpu, expected):
    assert can_fork_workers(env, gpu) is expected


def _worker_view() -> dict:
    import psutil
    from prefect.settings import get_current_settings

    return {
        "api_url": str(get_current_settings().api.url),
        "parent": psutil.Process().parent().cmdline(),
        "torch_threads": __import__("torch").get_num_threads(),
        "marker": os.environ.get("MACE_OOD_TEST_MARKER"),
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forking is used on Linux only")
def test_forked_workers_get_the_api_url_of_their_run_and_one_thread(monkeypatch):
    from distributed import Client, LocalCluster

    from mace_ood.cluster import worker_environment

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    views = []
    for run, url in enumerate(("http://127.0.0.1:9/api", "http://127.0.0.1:10/api")):
        monkeypatch.setenv("MACE_OOD_TEST_MARKER", str(run))  # set after the server started: the nanny's env
        env = {**os.environ, **worker_environment(1, url)}
        assert can_fork_workers(env, gpu=False)
        with forked_local_workers(env) as forked, LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", host="127.0.0.1", env=env,
        ) as cluster, Client(cluster) as client:
            assert forked
            views.append((url, str(run), client.submit(_worker_view, pure=False).result()))
    for url, marker, view in views:
        assert view["api_url"] == url and view["marker"] == marker
        assert view["torch_threads"] == 1
        assert any("forkserver" in part for part in view["parent"]), view["parent"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forking is used on Linux only")
def test_a_forkserver_started_by_something_else_leaves_the_workers_spawned(monkeypatch):
    from multiprocessing import forkserver

    import dask

    import mace_ood.cluster as cluster

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with forked_local_workers(env) as forked:  # ours: started (or kept) here
        assert forked and dask.config.get("distributed.worker.multiprocessing-method") == "forkserver"
    assert forkserver._forkserver._forkserver_pid is not None
    monkeypatch.setattr(cluster, "_own_forkserver_pid", -1)  # as if another library had started it
    before = dask.config.get("distributed.worker.multiprocessing-method")
    with forked_local_workers(env) as forked:
        assert not forked
        assert dask.config.get("distributed.worker.multiprocessing-method") == before
