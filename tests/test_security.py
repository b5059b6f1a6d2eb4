"""No one else gets in: a Prefect API beyond loopback needs a secret, plain TCP to another machine
is named, an existing cluster can be reached over TLS (SLURM's TLS is tested in tests/test_slurm.py)."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from mace_ood.cluster import ClusterError, check_cluster, client_security, plain_address_warning
from mace_ood.config import DaskConfig


@pytest.mark.parametrize(("address", "warned"), [
    ("tcp://10.0.0.5:8786", True), ("node17:8786", True), ("tcp://127.0.0.1:8786", False),
    ("tcp://localhost:8786", False), ("tcp://[::1]:8786", False), ("tls://10.0.0.5:8786", False),
])
def test_plain_tcp_to_another_machine_is_named(address, warned):
    warning = plain_address_warning(DaskConfig(address=address))
    assert bool(warning) is warned, warning
    if warned:
        assert warning.startswith(f"dask.address {address} is plain TCP beyond this machine")
    tls = DaskConfig(address=address, security={"ca_file": "ca.pem", "cert": "c.pem", "key": "k.pem"})
    assert plain_address_warning(tls) is None


def test_tls_files_are_only_for_an_existing_cluster():
    with pytest.raises(ValueError, match="TLS files are for an existing cluster"):
        DaskConfig(cluster="slurm", security={"ca_file": "ca.pem", "cert": "c.pem", "key": "k.pem"})


def test_validate_refuses_a_prefect_api_beyond_loopback_without_a_secret(project, tmp_path):
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from mace_ood.cli import app

    work = tmp_path / "p"
    shutil.copytree(project.parent, work)
    with temporary_settings({PREFECT_API_URL: "http://10.1.2.3:4200/api"}):
        refused = CliRunner().invoke(app, ["validate", str(work / "config.yaml")])
        ran = CliRunner().invoke(app, ["run", str(work / "config.yaml")])
    assert refused.exit_code == 2, refused.output
    errors = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "PREFECT_API_URL http://10.1.2.3:4200/api is beyond this machine" in errors[0]
    assert "PREFECT_SERVER_API_AUTH_STRING" in errors[0] and "PREFECT_API_AUTH_STRING" in errors[0]
    assert ran.exit_code == 2 and "is beyond this machine" in ran.output  # before any work
    assert not list((work / "run").rglob("*"))  # nothing written
    with temporary_settings({PREFECT_API_URL: "http://10.1.2.3:4200/api", PREFECT_API_AUTH_STRING: "s3cret"}):
        passed = CliRunner().invoke(app, ["validate", str(work / "config.yaml")])
    assert passed.exit_code == 0, passed.output


@pytest.fixture()
def tls_cluster(tmp_path):
    """A local Dask cluster that speaks TLS only, and the client's TLS files."""
    from distributed import LocalCluster
    from distributed.security import Security

    security = Security.temporary()
    files = {}
    for name, pem in (("ca_file", security.tls_ca_file), ("cert", security.tls_client_cert),
                      ("key", security.tls_client_key)):
        (tmp_path / f"{name}.pem").write_text(pem)
        files[name] = str(tmp_path / f"{name}.pem")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://", host="127.0.0.1",
                      security=security, dashboard_address=None) as cluster:
        yield cluster.scheduler_address, files


def test_an_existing_cluster_is_reached_over_tls_with_the_configured_files_only(tls_cluster, tmp_path):
    address, files = tls_cluster
    assert address.startswith("tls://")
    found = check_cluster(address, tmp_path / "out", None, need_gpu=False, timeout=10,
                          security=client_security(DaskConfig(address=address, security=files)))
    assert found["workers"] == 1
    with pytest.raises(ClusterError, match=f"dask.address {address} speaks TLS: give dask.security"):
        check_cluster(address, tmp_path / "out", None, need_gpu=False, timeout=3)
    plain = address.replace("tls://", "tcp://")  # the same port, without TLS: refused
    with pytest.raises(ClusterError, match=f"dask.address {plain}: cannot connect"):
        check_cluster(plain, tmp_path / "out", None, need_gpu=False, timeout=3)


@pytest.mark.slow
def test_a_prefect_server_with_a_secret_serves_a_run_whose_clients_carry_it(project, tmp_path):
    """A real ``prefect server start`` with PREFECT_SERVER_API_AUTH_STRING: a run with the secret
    (the flow and its Dask workers) completes; without it, it is refused in one line."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    work = tmp_path / "p"
    shutil.copytree(project.parent, work)
    config = yaml.safe_load((work / "config.yaml").read_text())
    config["output_dir"] = str(work / "run")
    config["select"]["top_k"] = 2
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_API_AUTH_STRING="s3cret")
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError as exc:  # 401 (HTTPError is an OSError) means it is up and wants the secret
                if getattr(exc, "code", None) == 401:
                    break
                time.sleep(0.5)
        client_env = {k: v for k, v in env.items() if not k.startswith("PREFECT_SERVER_API")}
        command = [sys.executable, "-m", "mace_ood.cli", "run", str(work / "config.yaml")]
        without = subprocess.run(command, env={**client_env, "PREFECT_API_URL": url}, capture_output=True,
                                 text=True, timeout=300)
        assert without.returncode != 0, without.stderr[-2000:]
        assert "401" in without.stderr or "Unauthorized" in without.stderr, without.stderr[-2000:]
        with_secret = subprocess.run(command, env={**client_env, "PREFECT_API_URL": url,
                                                   "PREFECT_API_AUTH_STRING": "s3cret"},
                                     capture_output=True, text=True, timeout=300)
        assert with_secret.returncode == 0, with_secret.stderr[-3000:]
        assert (work / "run" / "scores.csv").is_file()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_a_local_run_s_cluster_refuses_a_plain_client_on_every_address(tmp_path):
    """Another account of a shared login node reaches 127.0.0.1 too: the local cluster a run starts
    (the flow's own cluster arguments, as prefect-dask starts it) answers no plain Dask client, on
    its scheduler, nannies or workers; with ``dask.security: false`` a plain client gets in."""
    from distributed import Client, LocalCluster

    from mace_ood.flows.ood import make_task_runner
    from tests.ports import plain_client_gets_in

    for security in (True, False):
        runner = make_task_runner(DaskConfig(n_workers=1, security=security), "cpu", None).runner
        with LocalCluster(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
            info = client.scheduler_info()["workers"]
            addresses = [cluster.scheduler_address, *info, *(w["nanny"] for w in info.values() if w.get("nanny"))]
            answered = {a: plain_client_gets_in(a.split("://")[1]) for a in addresses}
        assert len(addresses) >= 3, addresses
        if security:
            assert all(a.startswith("tls://") for a in addresses) and not any(answered.values()), answered
        else:
            assert all(answered.values()), answered  # the check itself can see a way in


def test_a_local_run_s_temporary_prefect_server_takes_only_the_run_s_secret():
    """Another account of the machine reaches 127.0.0.1 too: the temporary server of a run answers
    no request without the run's secret (401), while the run's own clients, in this process and in
    the processes it starts (its Dask workers), carry it; the secret leaves with the server."""
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from mace_ood.flows.server import is_temporary, run_api

    def status(url: str, secret: str | None = None) -> int:
        import base64

        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(secret.encode()).decode()
        request = urllib.request.Request(f"{url}/flows/filter", data=b"{}", headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    env_before = os.environ.get("PREFECT_API_AUTH_STRING")
    with temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_API_AUTH_STRING}), run_api() as url:
        assert url.startswith("http://127.0.0.1:") and is_temporary(url)
        secret = os.environ["PREFECT_API_AUTH_STRING"]
        assert len(secret) >= 32
        assert status(url) == 401
        assert status(url, "guess") == 401
        assert status(url, secret) == 200
        with get_client(sync_client=True) as client:  # this process's clients (the flow)
            client.read_flows(limit=1)
        child = subprocess.run(  # a process the run starts (a worker): its inherited environment suffices
            [sys.executable, "-c", "from prefect.client.orchestration import get_client\n"
             "with get_client(sync_client=True) as c: c.read_flows(limit=1)"],
            env={**os.environ, "PREFECT_API_URL": url}, capture_output=True, text=True, timeout=120)
        assert child.returncode == 0, child.stderr[-2000:]
    assert os.environ.get("PREFECT_API_AUTH_STRING") == env_before
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=5)
    # the process's next run: its URL and secret (the forkserver's Prefect keeps them), still refusing others
    with temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_API_AUTH_STRING}), run_api() as again:
        assert again == url and os.environ["PREFECT_API_AUTH_STRING"] == secret
        assert status(again) == 401 and status(again, secret) == 200
