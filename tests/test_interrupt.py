"""Ctrl-C and SIGTERM stop a real `mace-ood run` within seconds, leave no process behind, and
running again resumes to the scores of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import pandas as pd
import psutil
import pytest

STOP_WITHIN_S = 10.0


@pytest.fixture(scope="module")
def interrupt_project(big_project, tmp_path_factory):
    """A copy of the big project (its own PREFECT_HOME, shared by this module's runs) and the
    scores of an uninterrupted run of it."""
    source, uninterrupted = big_project
    work = tmp_path_factory.mktemp("interrupt") / "p"
    shutil.copytree(source, work)
    return work, uninterrupted


def cli_environment(work, api_url: str | None = None) -> dict[str, str]:
    """What a user's shell has: no Prefect API (the run starts its own temporary server), or
    ``api_url``, a configured server that outlives the run."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(work / ".prefect"))
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def flow_runs_since(started: datetime) -> list:
    """The flow runs of this test process's Prefect server that started after ``started``."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [run for run in client.read_flow_runs(limit=20) if run.start_time and run.start_time >= started]


def has_durable_progress(run_dir) -> bool:
    """Whether some structures of the big dataset (T2) are durable on disk (a progress record)."""
    for record in run_dir.glob("latents/*/T2/*.progress.json"):
        try:
            if json.loads(record.read_text())["n_structures"] > 0:
                return True
        except (OSError, ValueError, KeyError):  # replaced or removed (its file finished) while read
            pass
    return False


def wait_for_durable_progress(run_dir, process, timeout_s: float = 240) -> None:
    """Until some structures of the big dataset (T2) are durable on disk."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if has_durable_progress(run_dir):
            return
        assert process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    pytest.fail("no extraction made progress durable in time")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "to_group", "configured_api"),
    [(signal.SIGINT, True, False), (signal.SIGTERM, True, True), (signal.SIGTERM, False, False)],
    ids=["ctrl-c-to-the-group", "sigterm-to-the-group-configured-server", "kill-the-process"],
)
def test_a_signal_stops_the_run_at_once_and_running_again_resumes(prefect_server, interrupt_project, tmp_path, signum,
                                                                 to_group, configured_api):
    """With a configured Prefect server (SLURM's walltime SIGTERM to a job's processes, say), the run's
    flow runs end ``Crashed`` there with the signal's name, not ``Running`` for good."""
    from prefect.settings import get_current_settings

    from mace_ood.config import load_config
    from mace_ood.flows.ood import ood_detection

    work, uninterrupted = interrupt_project
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "mace_ood.cli", "run", str(work / "config.yaml"), "--output-dir", str(run_dir)]
    env = cli_environment(work, str(get_current_settings().api.url) if configured_api else None)
    test_started = datetime.now(timezone.utc)
    process = subprocess.Popen(command, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # its own group, as a terminal's job
    wait_for_durable_progress(run_dir, process)
    family = psutil.Process(process.pid).children(recursive=True)
    assert len(family) >= (2 if configured_api else 3), "expected Dask workers (and Prefect's temporary server)"
    started = time.monotonic()
    if to_group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the run did not stop within 60 s of the signal")
    took = time.monotonic() - started
    assert took < STOP_WITHIN_S, f"stopping took {took:.1f} s"
    assert process.returncode == 128 + signum
    message = [line for line in stderr.splitlines() if line.startswith("interrupted by")]
    assert len(message) == 1 and "resumes" in message[0], stderr[-2000:]
    after = stderr.split(message[0])[-1]
    assert not after.strip(), f"printed after the one-line message:\n{after[-3000:]}"  # no filter: nothing at all
    # multiprocessing's resource tracker exits by itself once the run's end of its pipe is closed
    psutil.wait_procs(family, timeout=max(0.0, STOP_WITHIN_S - took))
    left = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    zombies = [p for p in family if p.is_running() and p.status() == psutil.STATUS_ZOMBIE]
    assert not left and not zombies, f"left behind: {left}, zombies: {zombies}"
    if configured_api:
        ended = {run.name: run.state for run in flow_runs_since(test_started)}
        assert len(ended) == 2, ended  # the run's flow and its extract-and-score subflow
        assert all(state.is_crashed() and "interrupted by SIGTERM" in state.message for state in ended.values()), ended

    # again, in this process (the same flow the CLI calls; a second cold process and temporary
    # server would cost ~12 CPU-seconds and test nothing more)
    again = ood_detection(load_config(work / "config.yaml", {"output_dir": str(run_dir)}))
    resumed = sum(e["resumed_structures"] for e in again["extractions"])
    assert resumed > 0, "nothing was resumed: the interrupted run's durable work was lost"
    scores = pd.read_csv(run_dir / "scores.csv").drop(columns=["source_file"])
    pd.testing.assert_frame_equal(scores, uninterrupted)


def run_helpers() -> set[int]:
    """This process's multiprocessing helpers, shared by every run in it (the forkserver local
    workers fork from, the resource tracker): not a run's own processes."""
    helpers = set()
    for child in psutil.Process().children():
        try:
            if any(name in " ".join(child.cmdline()) for name in ("forkserver", "resource_tracker")):
                helpers.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return helpers


@pytest.mark.slow
def test_an_interrupt_of_mace_ood_run_from_python_keeps_the_caller_and_running_again_resumes(interrupt_project,
                                                                                            tmp_path):
    """A notebook's stop button: KeyboardInterrupt raised in the main thread while `mace_ood.run()`
    extracts. The run's workers are closed, KeyboardInterrupt reaches the caller, whose process
    and signal handlers are untouched, and running again resumes to an uninterrupted run's scores."""
    import _thread
    import threading

    import mace_ood

    assert threading.current_thread() is threading.main_thread(), "a notebook's interrupt arrives on the main thread"
    work, uninterrupted = interrupt_project
    run_dir = tmp_path / "run"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    # a kernel's SIGINT raises KeyboardInterrupt; in this test process an earlier test's library may have
    # left another handler (interrupt_main() only calls the Python-level one): set the kernel's
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    interrupted_at: list[float] = []

    def interrupt_when_durable() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # a read that raised here once ended this thread: no interrupt came
            if has_durable_progress(run_dir):
                interrupted_at.append(time.monotonic())
                _thread.interrupt_main()
                return
            time.sleep(0.05)

    threading.Thread(target=interrupt_when_durable, daemon=True).start()
    try:
        mace_ood.run(work / "config.yaml", output_dir=str(run_dir))
        raised = False
    except KeyboardInterrupt:
        raised = True
    finally:
        after = {s: signal.getsignal(s) for s in handlers}
        signal.signal(signal.SIGINT, previous_sigint)
    assert interrupted_at, "the run ended before it could be interrupted"
    assert raised, f"interrupted, but mace_ood.run() returned (SIGINT handler before the test: {previous_sigint})"
    took = time.monotonic() - interrupted_at[0]
    assert took < STOP_WITHIN_S, f"stopping took {took:.1f} s"
    assert after == handlers
    helpers = run_helpers()
    deadline = time.monotonic() + 5
    while True:
        left = [p for p in psutil.Process().children(recursive=True)
                if p.pid not in before and p.pid not in helpers and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"left behind: {[' '.join(p.cmdline()[:3]) for p in left]}"

    # what was durable stays: finished seed files, or partial ones with their progress
    assert list(run_dir.glob("latents/*/T2/*.nc")) or list(run_dir.glob("latents/*/T2/*.partial*"))

    again = mace_ood.run(work / "config.yaml", output_dir=str(run_dir))
    assert again.path == run_dir
    pd.testing.assert_frame_equal(again.scores.drop(columns=["source_file"]), uninterrupted)
