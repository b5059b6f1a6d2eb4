from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tests.synthetic import make_project  # noqa: E402


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the whole session (Dask workers get its URL from the flow)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """Config of a tiny two-family project (random-weight models); shared, treat as read-only."""
    return make_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="session")
def tiny_models(project) -> dict[str, list[Path]]:
    models = project.parent / "models"
    return {name: sorted(models.glob(f"{name}_seed*.model")) for name in ("T1", "T2")}


@pytest.fixture(scope="session")
def finished_run(prefect_server, project, tmp_path_factory):
    """One real run of the whole flow (Dask workers, embedded Prefect server) on the tiny project;
    shared by the CLI and API tests, treat as read-only."""
    import shutil

    from typer.testing import CliRunner

    from mace_ood.cli import app

    work = tmp_path_factory.mktemp("run") / "p"
    shutil.copytree(project.parent, work)
    result = CliRunner().invoke(app, ["run", str(work / "config.yaml"), "--top-k", "2"])
    return work, result
