from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tests.synthetic import make_project  # noqa: E402

# Longest first (measured with --durations on 2 cores), so `make test`'s two xdist workers, each
# given whole files in this order, finish together; the first two need the shared big project.
LONGEST_FIRST = ("test_interrupt.py", "test_server.py", "test_flag_rate.py", "test_hdf5_threads.py",
                 "test_cluster.py", "test_cli_flow.py", "test_api.py", "test_server_start.py")
BIG_DATASET_STRUCTURES = 120  # 6 extraction jobs of ~3 s each on 2 cores: time to interrupt one


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


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


@pytest.fixture(scope="session")
def big_project(prefect_server, project, tmp_path_factory):
    """The tiny project with a T2 dataset big enough to interrupt mid-extraction, and the scores
    of one uninterrupted run of it: ``(project folder, scores without source_file)``. Computed
    once per `make test` and shared by the xdist workers (the interrupt, cancel and worker-kill
    tests compare against it); treat as read-only and copy the folder before running in it."""
    import pandas as pd
    from filelock import FileLock

    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / "big_project"  # the same for every worker
    else:
        root = tmp_path_factory.mktemp("big_project")
    scores = root / "uninterrupted" / "scores.csv"
    with FileLock(str(root) + ".lock"):
        if not scores.is_file():
            _run_big_project(project.parent, root)
    return root / "p", pd.read_csv(scores).drop(columns=["source_file"])


def _run_big_project(source: Path, root: Path) -> None:
    import shutil

    import ase.io

    from mace_ood.config import load_config
    from mace_ood.flows.ood import ood_detection
    from mace_ood.testing import random_structures

    work = root / "p"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(source, work)
    ase.io.write(work / "data" / "T2" / "md_big.xyz", random_structures(BIG_DATASET_STRUCTURES, seed=8, sizes=(2,)))
    ood_detection(load_config(work / "config.yaml", {"output_dir": str(root / "uninterrupted")}))
