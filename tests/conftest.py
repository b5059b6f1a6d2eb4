from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from mace_ood.cluster import import_jobqueue
from mace_ood.config import DaskConfig
from mace_ood.runtime import apply_environment_defaults

apply_environment_defaults()
os.environ.setdefault("OMP_NUM_THREADS", "1")  # two test processes on two cores: one thread each
# dask_jobqueue sets SIGINT to sys.exit when first imported; a test that imported it made the Python-API
# interrupt test's Ctrl-C a sys.exit ("DID NOT RAISE KeyboardInterrupt" in CI): import it once, here, as a
# run does (the handler put back), so that no later import changes this process's Ctrl-C
import_jobqueue(DaskConfig(cluster="slurm"))


def _one_certificate_file() -> str:
    """A CA file of one certificate (certifi's first), rewritten where missing or different.

    Every Prefect API client loads its CA file when it is made (``ssl.create_default_context``):
    certifi's ~140 certificates cost 19 ms, and a task run on a Dask worker makes two clients. Every
    server these tests talk to is plain http on 127.0.0.1, so no certificate is ever checked; with
    one certificate a client costs 0.3 ms (py-spy over `make test`: ~50 s of CPU were spent there).
    """
    import tempfile

    import certifi

    path = Path(tempfile.gettempdir()) / "mace-ood-tests-one-ca.pem"
    bundle = Path(certifi.where()).read_text()
    end = "-----END CERTIFICATE-----"
    first = bundle[bundle.index("-----BEGIN CERTIFICATE-----"): bundle.index(end) + len(end)] + "\n"
    if not path.is_file() or path.read_text() != first:
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(first)
        partial.replace(path)
    return str(path)


os.environ.setdefault("PREFECT_API_SSL_CERT_FILE", _one_certificate_file())

from tests.synthetic import make_project  # noqa: E402

# Most CPU first (each file's CPU-seconds measured on 2 cores, one process): `make test` gives each
# of its two xdist workers whole files in this order (`--no-loadscope-reorder`: by default xdist
# sorts files by their number of tests, which ran the 3-test flag-rate file last, alone).
LONGEST_FIRST = ("test_interrupt.py", "test_flag_rate.py", "test_server.py", "test_cluster.py", "test_hdf5_threads.py",
                 "test_server_start.py", "test_resume.py", "test_cli_flow.py", "test_single_model.py",
                 "test_llpr_forces.py", "test_gpu_check.py", "test_llpr.py", "test_api.py")
BIG_DATASET_STRUCTURES = 120  # its 6 extraction jobs take ~2 s each here: time to interrupt or cancel one


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


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``root/name``, made by ``build(folder)`` once per test session: with xdist the workers share
    one folder under a file lock (the first builds it, the others wait and reuse it)."""
    from filelock import FileLock

    if os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.getbasetemp().parent / name  # the same for every worker
    else:
        folder = tmp_path_factory.getbasetemp() / name
    done = folder / ".built"
    with FileLock(f"{folder}.lock"):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            done.touch()
    return folder


@dataclass(frozen=True)
class CliOutcome:
    exit_code: int
    output: str
    # read from the run's Prefect server right after it (another xdist worker cannot ask that server)
    artifacts: dict[str, list[dict]]  # key -> [{type, data}]
    task_runs: list[dict]  # the select task runs: [{name, completed}]


ARTIFACT_KEYS = ("top-mace-t1-t2", "mace-ood-summary")


@pytest.fixture(scope="session")
def finished_run(prefect_server, project, tmp_path_factory) -> tuple[Path, CliOutcome]:
    """One real `mace-ood run --top-k 2` of the whole flow (Dask workers, embedded Prefect server) on
    the tiny project, with its exit code, output, Prefect artifacts and select task runs; shared by
    the CLI and API tests (and their xdist workers), treat as read-only."""

    def build(folder: Path) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterKey,
            TaskRunFilter,
            TaskRunFilterName,
        )
        from typer.testing import CliRunner

        from mace_ood.cli import app

        shutil.copytree(project.parent, folder / "p")
        started = datetime.now(timezone.utc)
        result = CliRunner().invoke(app, ["run", str(folder / "p" / "config.yaml"), "--top-k", "2"])
        with get_client(sync_client=True) as client:  # only this run's: the server saw others
            artifacts = {key: [{"type": a.type, "data": a.data} for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))) if a.created >= started]
                for key in ARTIFACT_KEYS}
            selects = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="select ")))
            task_runs = [{"name": t.name, "completed": t.state.is_completed()} for t in selects if t.created >= started]
        (folder / "outcome.json").write_text(json.dumps({"exit_code": result.exit_code, "output": result.output,
                                                         "artifacts": artifacts, "task_runs": task_runs}))

    folder = built_once(tmp_path_factory, "finished_run", build)
    return folder / "p", CliOutcome(**json.loads((folder / "outcome.json").read_text()))


@pytest.fixture(scope="session")
def big_project(prefect_server, project, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """The tiny project with a T2 dataset big enough to interrupt mid-extraction, and the scores
    of one uninterrupted run of it: ``(project folder, scores without source_file)``. Built once
    per session and shared by the xdist workers (the interrupt, cancel and worker-kill tests
    compare against it); treat as read-only and copy the folder before running in it."""

    def build(folder: Path) -> None:
        import ase.io

        from mace_ood.config import load_config
        from mace_ood.flows.ood import ood_detection
        from mace_ood.testing import random_structures

        work = folder / "p"
        shutil.copytree(project.parent, work)
        structures = random_structures(BIG_DATASET_STRUCTURES, seed=8, sizes=(2,))
        ase.io.write(work / "data" / "T2" / "md_big.xyz", structures)
        ood_detection(load_config(work / "config.yaml", {"output_dir": str(folder / "uninterrupted")}))

    folder = built_once(tmp_path_factory, "big_project", build)
    return folder / "p", pd.read_csv(folder / "uninterrupted" / "scores.csv").drop(columns=["source_file"])
