"""Local CPU workers fork from one process that imported torch and mace once
(``mace_ood.cluster.forked_local_workers``), and still get the flow's settings."""

from __future__ import annotations

import os
import sys

import pytest

from mace_ood.cluster import PREFECT_PRELOAD, can_fork_workers, forked_local_workers


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

    preloaded = all(m in sys.modules for m in PREFECT_PRELOAD)  # before this task imports anything
    from prefect.context import GLOBAL_SETTINGS_CONTEXT
    from prefect.settings import get_current_settings

    return {
        "api_url": str(get_current_settings().api.url),
        "imported_api_url": str(GLOBAL_SETTINGS_CONTEXT.settings.api.url),  # what Prefect read at import
        "prefect_preloaded": preloaded,
        "parent": psutil.Process().parent().cmdline(),
        "parent_pid": psutil.Process().parent().pid,
        "torch_threads": __import__("torch").get_num_threads(),
        "marker": os.environ.get("MACE_OOD_TEST_MARKER"),
        "sigint_ignored": __import__("signal").getsignal(__import__("signal").SIGINT) is __import__("signal").SIG_IGN,
    }


def _cluster(env):
    from distributed import LocalCluster

    return LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", host="127.0.0.1",
                        env=env)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forking is used on Linux only")
def test_forked_workers_get_the_settings_of_their_run(monkeypatch):
    """Runs of one process: A; B with another API URL while A's workers fork; B again after.
    A's workers fork from a forkserver that imported Prefect with A's URL and see an env var set
    after it started; B, while A's workers are forked, is told to spawn its workers (the server is
    not restarted under a run, and Dask's setting is global: A's `forkserver` must not leak into
    it); B again forks from a forkserver started again with B's URL, and kept for B's settings."""
    from multiprocessing import forkserver

    import dask
    from distributed import Client

    from mace_ood.cluster import worker_environment

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    url_a, url_b = "http://127.0.0.1:9/api", "http://127.0.0.1:10/api"
    env_a = {**os.environ, **worker_environment(1, url_a)}
    env_b = {**os.environ, **worker_environment(1, url_b)}
    assert can_fork_workers(env_a, gpu=False) and can_fork_workers(env_b, gpu=False)
    with forked_local_workers(env_a) as forked_a:
        server_a = forkserver._forkserver._forkserver_pid
        late = {**env_a, "MACE_OOD_TEST_MARKER": "set after the forkserver started"}  # given by the nanny
        with _cluster(late) as cluster, Client(cluster) as client:
            with forked_local_workers(env_b) as forked_during_a:
                method_during_a = dask.config.get("distributed.worker.multiprocessing-method")
                assert forkserver._forkserver._forkserver_pid == server_a
            a = client.submit(_worker_view, pure=False).result()
    with forked_local_workers(env_b) as forked_b, _cluster(env_b) as cluster, Client(cluster) as client:
        server_b = forkserver._forkserver._forkserver_pid
        b = client.submit(_worker_view, pure=False).result()
    with forked_local_workers(env_b):
        assert forkserver._forkserver._forkserver_pid == server_b  # the same settings keep it

    assert forked_a and forked_b and not forked_during_a
    assert a["api_url"] == a["imported_api_url"] == url_a and a["marker"] == "set after the forkserver started"
    assert b["api_url"] == b["imported_api_url"] == url_b
    for view in (a, b):
        assert view["prefect_preloaded"] and view["torch_threads"] == 1
        assert view["sigint_ignored"]  # a terminal's Ctrl-C is the run owner's to act on (mace_ood/worker_signals.py)
        assert any("forkserver" in part for part in view["parent"]), view["parent"]
    assert a["parent_pid"] == server_a != server_b == b["parent_pid"]
    assert method_during_a == "spawn"  # a spawned worker imports Prefect itself, with B's settings


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forking is used on Linux only")
def test_a_forkserver_started_by_something_else_leaves_the_workers_spawned(monkeypatch):
    from multiprocessing import forkserver

    import dask

    import mace_ood.cluster as cluster

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    env = {**os.environ, **cluster.worker_environment(1, "http://127.0.0.1:10/api")}  # the last test's B: kept
    with forked_local_workers(env) as forked:  # ours: started (or kept) here
        assert forked and dask.config.get("distributed.worker.multiprocessing-method") == "forkserver"
    assert forkserver._forkserver._forkserver_pid is not None
    monkeypatch.setattr(cluster, "_own_forkserver_pid", -1)  # as if another library had started it
    before = dask.config.get("distributed.worker.multiprocessing-method")
    with forked_local_workers(env) as forked:
        assert not forked
        assert dask.config.get("distributed.worker.multiprocessing-method") == before
