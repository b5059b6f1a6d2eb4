"""Process-wide settings, applied by entry points (CLI, flow, worker start-up), never on import."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager, suppress

# The one table of the environment mace-ood sets where the user has not: every entry point applies
# it to its own process (the CLI, the flow, each task, the tests' conftest, `make bench` through
# `python -m mace_ood.runtime`), and Dask workers get it in their environment (`worker_environment`).
ENVIRONMENT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry from a temporary server (and no network)
    "OMP_WAIT_POLICY": "PASSIVE",  # OpenMP's default spinning made MACE calls 5-10x slower at random on shared cores
    "DASK_LOGGING__DISTRIBUTED": "warning",
    # logs go to the Prefect API in batches; at Prefect's 2 s interval the last batch of a run
    # left after the temporary server had stopped ("Error logging to API: All connection
    # attempts failed" at the end of `make demo`), and a worker draining its queue outlived the
    # nanny's 4 s exit grace ("still alive after 4.0 seconds, killing")
    "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.25",
    "PYTHONWARNINGS": "ignore::UserWarning:e3nn.o3._wigner",  # e3nn's torch.load warning, once per process
}
# HDF5 chunk cache per variable: the default 64 MiB per variable per open file dominates
# memory when several seed files are open at once.
HDF5_CHUNK_CACHE = (4 * 1024 * 1024, 521, 0.75)
# After SIGTERM, how long child processes (Dask workers, the scheduler's helpers, Prefect's
# temporary server) get to exit before they are killed.
STOP_GRACE_S = 1.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker now, its stderr on /dev/null.

    A local Dask cluster's worker processes share one tracker; when a run is stopped by a
    signal, CPython's tracker prints a traceback for a semaphore unregistered twice
    (``cache[rtype].remove(name)``) and leak warnings for what the dying workers held, after the
    run's own one-line message: noise a user can do nothing about. Nothing of the run's own
    output goes through the tracker."""
    from multiprocessing import resource_tracker

    if getattr(resource_tracker._resource_tracker, "_fd", None) is not None:
        return  # already running: too late to change where it writes
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        resource_tracker.ensure_running()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def apply_environment_defaults(environ=None):
    """:data:`ENVIRONMENT_DEFAULTS` into ``environ`` (this process's by default) where unset; returns it."""
    environ = os.environ if environ is None else environ
    for key, value in ENVIRONMENT_DEFAULTS.items():
        environ.setdefault(key, value)
    return environ


@contextmanager
def environment(values: dict[str, str], remove: tuple[str, ...] = ()):
    """``values`` set and ``remove`` unset in ``os.environ`` within the block; what was there before
    is put back after (a child process started inside inherits the block's environment)."""
    saved = {key: os.environ.get(key) for key in [*values, *remove]}
    os.environ.update(values)
    for key in remove:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def configure_process() -> None:
    """Environment defaults (unless set) and a small HDF5 chunk cache for this process."""
    apply_environment_defaults()
    import netCDF4

    netCDF4.set_chunk_cache(*HDF5_CHUNK_CACHE)


@contextmanager
def hdf5_in_this_thread():
    """Run the lazy (dask) work inside on the calling thread: the synchronous scheduler.

    netCDF4/HDF5 is not thread-safe. Inside a Dask worker, dask's default scheduler is the
    distributed client: a lazily opened latent file read there is shipped as sub-tasks to other
    workers, whose own task thread may be using HDF5 at the same moment (an ``HDF error`` or
    a crashed worker). Every stage that opens netCDF runs under this, as a decorator or a
    ``with`` block, so each process touches HDF5 from one thread; the parallelism is the many
    tasks in flight across worker processes.
    """
    import dask

    with dask.config.set(scheduler="synchronous"):
        yield


def stop_child_processes(grace_s: float = STOP_GRACE_S) -> int:
    """Kill every descendant of this process but multiprocessing's resource tracker and reap them
    (:func:`kill_processes`; no orphan, no zombie), scanned again until none is left; returns how
    many there were. The tracker exits by itself once this process's end of its pipe closes, its
    stderr on /dev/null (:func:`quiet_resource_tracker`): killed with the workers, a dying worker
    relaunched a loud one; closing its pipe early made other threads' finalizers print tracebacks
    (``benchmarks/interrupts.py``)."""
    import psutil

    tracker = _resource_tracker_pid()
    _no_worker_restarts()
    _adopt_orphans()
    stopped = 0
    for _ in range(5):
        children = [c for c in psutil.Process().children(recursive=True) if c.pid != tracker]
        if not children:
            break
        stopped += len(children)
        kill_processes(children, grace_s)
    return stopped


def kill_processes(processes: list, grace_s: float = STOP_GRACE_S) -> None:
    """SIGKILL ``processes`` (psutil) and reap them, waiting up to ``grace_s``.

    At once, not SIGTERM: terminated gently, dying workers ran multiprocessing's finalizers and a
    nanny spawned a replacement whose semaphores were gone, each printing a traceback after the
    one-line message; what is durable is on disk already (partial files and progress)."""
    import psutil

    for process in processes:
        with suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=grace_s)


def _no_worker_restarts() -> None:
    """Tell this process's Dask nannies that their workers are going away (``Nanny.close_gracefully``,
    Dask's own signal for a cluster's shutdown): else a nanny restarted the worker killed next, and
    the new process, spawned by a parent about to exit, printed its failure under the one-line
    message (``spawn_main ... SemLock._rebuild: FileNotFoundError``, benchmarks/interrupts.py)."""
    nanny = sys.modules.get("distributed.nanny")
    for instance in list(getattr(getattr(nanny, "Nanny", None), "_instances", ())):
        with suppress(Exception):
            instance.close_gracefully(reason="mace-ood stopped by a signal")


def _adopt_orphans() -> None:
    """On Linux, become the parent of every descendant orphaned from now on (a child subreaper), so
    that the next scan reaps them: local workers forked from multiprocessing's forkserver are its
    children, and killed together with it they were left as zombies nothing reaped."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_child_subreaper = 36
        with suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def _resource_tracker_pid() -> int | None:
    from multiprocessing import resource_tracker

    pid = getattr(resource_tracker._resource_tracker, "_pid", None)
    return pid if isinstance(pid, int) else None


@contextmanager
def stop_on_signals(what: str, record_stop: Callable[[int], None] | None = None):
    """Ctrl-C (SIGINT) or SIGTERM (``kill``, SLURM's walltime, Prefect cancelling a deployment run)
    stops ``what`` at once: one line on stderr, every child process stopped and reaped, exit status
    128 + the signal. Prefect's and Dask's own shutdown talks to servers the signal may have just
    killed (a terminal signals the whole group): it hung for minutes. Durable work stays on disk
    (``.partial`` latent files with a progress record): running again resumes. Entered only by a
    session that owns the process (:mod:`mace_ood.flows.session`), on the main thread (elsewhere it
    does nothing); the flow runs on a worker thread, where Prefect arms no SIGTERM handler of its own.
    ``record_stop(signum)`` runs next: the session records the run's end where it outlives the
    process (a configured Prefect server), as Prefect's own signal handler would have.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame) -> None:
        for s in STOP_SIGNALS:  # a second Ctrl-C must not interrupt the clean-up
            signal.signal(s, signal.SIG_IGN)
        sys.stderr.write(
            f"\ninterrupted by {signal.Signals(signum).name}: stopped {what}; finished and partial "
            "files are kept, running the same command again resumes\n"
        )
        sys.stderr.flush()
        logging.getLogger("distributed").setLevel(logging.CRITICAL)  # no "restarting worker" noise
        stop_child_processes()
        if record_stop is not None:
            record_stop(signum)
        os._exit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":  # the table as `KEY=value` words, where unset: what `make bench` runs under
    print(" ".join(f"{key}={value}" for key, value in ENVIRONMENT_DEFAULTS.items() if key not in os.environ))
