"""The real thing: a `prefect server` on 127.0.0.1, the flow served as a deployment, a run
triggered through the API, and the UI rendered by headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import pytest
import yaml

from tests.synthetic import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` with its own PREFECT_HOME on a free loopback port."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api")  # what the browser calls
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("prefect server did not start within 90 s")
    yield url, env
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@contextmanager
def talking_to(url: str):
    """This process's Prefect API is the server at ``url`` inside; on the way out, what its event
    and log workers queued for that server is sent while it is up, and the workers are dropped.
    Prefect keeps one events worker per process, bound to the API it first saw (its key holds no
    URL): made here, it would send every later event of this xdist worker to this module's server
    after it has stopped, and the session's test harness waited on them at exit (a hung
    `make test` with 3 xdist workers, this file the first to emit events on its worker)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"{url}/api"}):
        try:
            yield
        finally:
            EventsWorker.drain_all(timeout=30)
            APILogWorker.drain_all(timeout=30)


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def served_run(server, project, tmp_path_factory):
    """`mace-ood serve` registers the deployment; a run is triggered through the API with
    parameters (top_k changed) and waited for."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    url, env = server
    work = tmp_path_factory.mktemp("served") / "p"
    shutil.copytree(project.parent, work)
    env = {**env, "PREFECT_API_URL": f"{url}/api"}
    serve = subprocess.Popen([sys.executable, "-m", "mace_ood.cli", "serve", str(work / "config.yaml"), "--name", "it"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with talking_to(url):
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 120
                deployment = None
                while deployment is None and time.monotonic() < deadline:
                    try:
                        deployment = client.read_deployment_by_name("mace-ood/it")
                    except Exception:  # noqa: BLE001 - not registered yet
                        time.sleep(1)
                assert deployment is not None, "the served deployment never appeared"
                parameters = dict(deployment.parameters)
                parameters["config"] = {**parameters["config"], "select": {**parameters["config"]["select"], "top_k": 2}}
                flow_run = run_deployment("mace-ood/it", parameters=parameters, timeout=400, poll_interval=2)
                task_runs = client.read_task_runs()
                artifacts = client.read_artifacts()
        yield url, work, flow_run, task_runs, artifacts
    finally:
        stop_process(serve)


@pytest.mark.slow
def test_triggered_deployment_completes_with_artifacts(served_run):
    _, work, flow_run, task_runs, artifacts = served_run
    assert flow_run.state.is_completed(), flow_run.state
    keys = {a.key for a in artifacts}
    assert {"mace-ood-summary", "top-mace-t1-t2", "top-mace-t2-t1"} <= keys
    progress = [a for a in artifacts if a.key == "extract-mace-t1-seed0-t2"]
    assert progress and progress[0].type == "progress" and float(progress[0].data) == 100.0
    top = next(a for a in artifacts if a.key == "top-mace-t1-t2")
    data = top.data if isinstance(top.data, list) else yaml.safe_load(top.data)
    assert len(data) == 2  # the triggered parameters (top_k 2) were used
    assert (work / "run" / "report.xlsx").is_file()


@pytest.mark.slow
def test_task_runs_from_dask_workers_reach_the_same_server(served_run):
    _, _, _, task_runs, _ = served_run
    extraction = [t for t in task_runs if t.name.startswith("extract ")]
    assert len(extraction) == 12  # 2 families x 2 datasets x 3 seeds, run on Dask worker processes
    assert all(t.state.is_completed() for t in extraction)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_ui_renders_the_top_k_table(served_run, tmp_path):
    url, _, flow_run, _, artifacts = served_run
    top = next(a for a in artifacts if a.key == "top-mace-t1-t2")
    data = top.data if isinstance(top.data, list) else yaml.safe_load(top.data)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=20000", "--window-size=1400,1000"]
    page = f"{url}/artifacts/artifact/{top.id}"
    shot = tmp_path / "artifact.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", page], capture_output=True, timeout=120)
    print(f"screenshot: {shot}")
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert data[0]["structure_id"] in dom, "the top-K table is not rendered on the artifact page"
    run_page = subprocess.run([CHROMIUM, *flags, "--dump-dom", f"{url}/runs/flow-run/{flow_run.id}"],
                              capture_output=True, text=True, timeout=120).stdout
    assert flow_run.name in run_page
    assert shot.is_file() and shot.stat().st_size > 10_000


@pytest.mark.slow
def test_cancelling_a_deployment_run_stops_its_workers_and_running_again_resumes(server, big_project, tmp_path):
    """`prefect flow-run cancel` (a Cancelling state set through the API) on a served run in the
    middle of its extraction: the run's process and its Dask workers are gone within 10 s, the
    run ends Cancelled, and the next run resumes to the scores of an uninterrupted one."""
    import json

    import pandas as pd
    import psutil
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import State

    from mace_ood.config import load_config
    from mace_ood.flows.ood import ood_detection

    url, env = server
    source, uninterrupted = big_project
    work = tmp_path / "p"
    shutil.copytree(source, work)

    env = {**env, "PREFECT_API_URL": f"{url}/api"}
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([sys.executable, "-m", "mace_ood.cli", "serve", str(work / "config.yaml"), "--name", "cancel"],
                             env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with talking_to(url), get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    client.read_deployment_by_name("mace-ood/cancel")
                    break
                except Exception:  # noqa: BLE001 - not registered yet
                    time.sleep(1)
            flow_run = run_deployment("mace-ood/cancel", timeout=0)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not any(
                json.loads(p.read_text() or "{}").get("n_structures", 0) > 0
                for p in (work / "run").glob("latents/*/T2/*.progress.json")
            ):
                time.sleep(0.1)
            # the run's processes: the runner's children but its own multiprocessing helper, and theirs
            runs = [p for p in psutil.Process(serve.pid).children() if "resource_tracker" not in " ".join(p.cmdline())]
            running = runs + [d for p in runs for d in p.children(recursive=True)]
            assert len(running) >= 2, "expected the flow run's process and its Dask worker"
            started = time.monotonic()
            client.set_flow_run_state(flow_run.id, State(type=StateType.CANCELLING, name="Cancelling"), force=True)
            while time.monotonic() - started < 30 and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                                          for p in running):
                time.sleep(0.1)
            took = time.monotonic() - started
            left = [" ".join(p.cmdline()[:4]) for p in running if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            assert took < 10, f"the cancelled run's processes were still there after {took:.1f} s: {left}"
            while time.monotonic() - started < 60 and not client.read_flow_run(flow_run.id).state.is_final():
                time.sleep(0.5)
            assert client.read_flow_run(flow_run.id).state.is_cancelled()

        # again, in this process (the flow the deployment serves; a second served run costs a cold
        # process and its worker, ~15 CPU-seconds, and resumes from the same files), reporting to the
        # session's test server as this process's other runs do: its workers fork from the same
        # forkserver (another API URL would start it again, ~8 CPU-seconds, and again after)
        again = ood_detection(load_config(work / "config.yaml"))
        assert sum(e["resumed_structures"] for e in again["extractions"]) > 0
        scores = pd.read_csv(work / "run" / "scores.csv").drop(columns=["source_file"])
        pd.testing.assert_frame_equal(scores, uninterrupted)
    finally:
        stop_process(serve)
