"""One owner for a run's processes: :class:`RunSession`, and :func:`run` from Python.

A run starts processes: Prefect's temporary server (unless ``PREFECT_API_URL`` is set) and the
Dask workers. The session that a run is entered through decides what an interrupt does:

- **It owns the process** (``mace-ood run``, ``mace-ood demo``, the process Prefect's runner starts
  for a deployment run): SIGINT and SIGTERM stop the run at once (one line on stderr, every child
  process stopped, exit status 128 + the signal; :func:`mace_ood.runtime.stop_on_signals`). The
  flow then runs on a worker thread and the main thread keeps the handler: Prefect arms its own
  SIGTERM handler at each flow run, but only on the main thread, so no flow function ever has to
  arm mace-ood's again.
- **It is a library call** (:func:`run` in a notebook or a script, or the flow called directly):
  no signal handler is installed. The flow runs on a worker thread too, and an interrupt
  (``KeyboardInterrupt``) reaches the main thread where it only waits: raised anywhere inside
  Prefect's code, it was caught and wrapped there (a ``PydanticSerializationError`` under load)
  and the run went on. The session then asks the flow to stop (:func:`raise_if_interrupted`, at
  each wait of the flow), whose task runner closes the Dask cluster through its own API; what
  the run started and is still alive after :data:`STOP_JOIN_S` is killed, the temporary server
  is stopped and ``KeyboardInterrupt`` is raised to the caller. The host process (a Jupyter
  kernel) lives on.

In both cases latent files are durable under ``.partial`` with a progress record, so running the
same config again resumes.
"""

from __future__ import annotations

import contextvars
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any, TypeVar

from mace_ood.config import RunConfig, config_from_dict, load_config

T = TypeVar("T")
# how long an interrupted library call waits for its flow to close the Dask cluster itself
STOP_JOIN_S = 8.0
# how long a signalled owner waits for a configured Prefect server to take its flow runs' end
RECORD_STOP_S = 3.0
_current: contextvars.ContextVar[RunSession | None] = contextvars.ContextVar("mace_ood_run_session", default=None)


class RunSession:
    """The Prefect API and the signal policy of one run, entered once by its entry point.

    Parameters
    ----------
    what
        What is running, for the one-line interrupt message (``mace-ood on runs/example``).
    owns_process
        True for an entry point that owns the process (the CLI, a deployment run's process):
        signals stop the run and exit. False for a library call: no handler is installed and an
        interrupt is raised to the caller after the clean-up.
    start_api
        Start Prefect's temporary server for the session when no ``PREFECT_API_URL`` is set (and
        stop it at the end). False inside a flow already running: its API is its caller's.
    """

    def __init__(self, what: str, *, owns_process: bool, start_api: bool = True) -> None:
        self.what = what
        self.start_api = start_api
        # only the main thread can own signal handlers
        self.owns_process = owns_process and threading.current_thread() is threading.main_thread()
        self._stack: ExitStack | None = None
        self._token: contextvars.Token | None = None
        self._interrupted = threading.Event()
        self._processes_before: set[int] = set()
        self._flow_runs: list[str] = []  # of this run, outermost first (record_flow_run)

    def __enter__(self) -> RunSession:
        from mace_ood.flows.server import run_api
        from mace_ood.runtime import stop_on_signals

        if _current.get() is not None:
            raise RuntimeError("a mace-ood run session is already active in this context: enter one per run")
        import psutil

        self._processes_before = {p.pid for p in psutil.Process().children(recursive=True)}
        self._stack = ExitStack()
        try:
            if self.owns_process:
                self._stack.enter_context(stop_on_signals(self.what, self._record_stop))
            if self.start_api:
                self._stack.enter_context(run_api())
        except BaseException:
            self._stack.close()
            raise
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc_info) -> None:
        _current.reset(self._token)
        self._stack.close()

    def _record_stop(self, signum: int) -> None:
        """Mark this run's flow runs ``Crashed`` in a configured Prefect API, within
        :data:`RECORD_STOP_S`: the owner leaves without Prefect's engine (``os._exit``), which left them
        ``Running`` there for good (a served deployment's UI, a SLURM run's server). Not for the run's
        temporary server (it ends with the run), nor for a run Prefect is cancelling (its runner records
        ``Cancelled``)."""
        from prefect.settings import get_current_settings

        from mace_ood.flows.server import is_temporary

        url = get_current_settings().api.url
        if not self._flow_runs or not url or is_temporary(str(url)):
            return
        message = f"interrupted by {signal.Signals(signum).name}: stopped by mace-ood; running it again resumes"
        context = contextvars.copy_context()  # this thread's Prefect settings

        def record() -> None:
            with suppress(Exception):  # best effort, and never a traceback under the one-line message
                context.run(mark_crashed, list(self._flow_runs), message)

        recorder = threading.Thread(target=record, daemon=True)
        recorder.start()
        recorder.join(RECORD_STOP_S)

    @property
    def interrupted(self) -> bool:
        """Whether the caller interrupted this run (a library call's ``KeyboardInterrupt``)."""
        return self._interrupted.is_set()

    def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` on a worker thread, the main thread waiting: its signal
        handler armed when the session owns the process, else ready for an interrupt."""
        outcome: dict[str, Any] = {}
        context = contextvars.copy_context()
        # an Event, not Thread.join: a join interrupted by KeyboardInterrupt marks the thread as
        # stopped while it still runs (CPython 3.11's _wait_for_tstate_lock releases its lock)
        done = threading.Event()

        def target() -> None:
            try:
                outcome["value"] = context.run(function, *args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread as is
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=target, name="mace-ood-run", daemon=True).start()
        try:
            while not done.wait(0.5):  # short waits: a signal handler runs between them
                pass
        except KeyboardInterrupt:
            self._stop(done)
            raise
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _stop(self, done: threading.Event) -> None:
        """After an interrupt: the flow stops at its next wait and closes its Dask cluster; what the
        run started and is still alive after :data:`STOP_JOIN_S` is killed (the helpers
        multiprocessing shares between runs, the forkserver and its resource tracker, are kept)."""
        import psutil

        from mace_ood.runtime import kill_processes

        self._interrupted.set()
        sys.stderr.write(f"\ninterrupted: stopping {self.what}; finished and partial files are kept, "
                         "running again resumes\n")
        if done.wait(STOP_JOIN_S):
            return
        helpers = {p.pid for p in psutil.Process().children() if _is_shared_helper(p)}
        started = [p for p in psutil.Process().children(recursive=True)
                   if p.pid not in self._processes_before and p.pid not in helpers and not _is_prefect_server(p)]
        kill_processes(started)  # the server, if this session's, is stopped by __exit__ through its API


def _command(process) -> str:
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _is_shared_helper(process) -> bool:
    """multiprocessing's forkserver and resource tracker, children of this process shared by every run
    in it (workers forked from the forkserver carry its command line: only direct children are helpers)."""
    return any(name in _command(process) for name in ("forkserver", "resource_tracker"))


def _is_prefect_server(process) -> bool:
    command = _command(process)
    return "prefect" in command and "server" in command


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` in the flow's thread once its caller has been interrupted: called
    at each of the flow's waits, the one place the flow's own code stops."""
    session = _current.get()
    if session is not None and session.interrupted:
        raise KeyboardInterrupt


def mark_crashed(flow_run_ids: list[str], message: str) -> None:
    """``Crashed(message)`` for each flow run not yet final and not being cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        for flow_run_id in flow_run_ids:
            state = client.read_flow_run(flow_run_id).state
            if state is None or not (state.is_final() or state.is_cancelling()):
                client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)


def record_flow_run() -> None:
    """Note the flow run in progress with the run's session (the flows call it as they start)."""
    from prefect.context import FlowRunContext

    session, context = _current.get(), FlowRunContext.get()
    if session is not None and context is not None and context.flow_run is not None:
        session._flow_runs.append(str(context.flow_run.id))


def current_session() -> RunSession | None:
    """The session this run was entered through, if any."""
    return _current.get()


def call_in_session(what: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function`` in the active session, or, where none is (a flow called directly, or by
    Prefect's runner for a deployment run), in a new one, which owns the process only for a
    deployment's run: Prefect's runner starts a process of its own for each."""
    session = current_session()
    if session is not None:
        record_flow_run()
        return function(*args, **kwargs)
    with RunSession(what, owns_process=is_deployment_run(), start_api=False) as session:
        record_flow_run()
        return session.call(function, *args, **kwargs)


def is_deployment_run() -> bool:
    """Whether the flow run in progress was started from a deployment."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return bool(context and context.flow_run and context.flow_run.deployment_id)


def run(config: RunConfig | dict | str | Path, **overrides: Any):
    """Run mace-ood from Python (a notebook, a script) and return the finished run.

    The same flow as ``mace-ood run``: extract, score, select and report. An interrupt (the
    notebook's stop button, Ctrl-C) stops the run's Dask workers and temporary Prefect server and
    raises ``KeyboardInterrupt``; the calling process lives on, and running again resumes.

    Parameters
    ----------
    config
        A `RunConfig` (`mace_ood.config`), a mapping of its keys, or a YAML file.
    **overrides
        Top-level keys that replace the config's (``output_dir="runs/b"``, ``device="cuda"``).

    Returns
    -------
    mace_ood.api.Run
        The finished run, as `mace_ood.open_run` opens it.
    """
    from mace_ood.api import open_run
    from mace_ood.cluster import import_jobqueue
    from mace_ood.flows.ood import ood_detection
    from mace_ood.plan import plan_run

    if isinstance(config, (str, Path)):
        config = load_config(config, overrides)
    else:
        data = config.model_dump(mode="json") if isinstance(config, RunConfig) else dict(config)
        data.update({k: v for k, v in overrides.items() if v is not None})
        config = config_from_dict(data)
    plan = plan_run(config)  # bad input fails here, before any server or worker starts; the flow runs it
    import_jobqueue(config.dask)
    with RunSession(f"mace-ood on {config.output_dir}", owns_process=False) as session:
        session.call(ood_detection, config, plan)
    return open_run(config.output_dir)
