"""The Prefect API of a run: the one the user configured, or a temporary server started here.

Without ``PREFECT_API_URL``, Prefect starts a temporary server in a subprocess and gives it
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (20 s by default) to answer. On a busy
login node that start-up took longer, and the run failed before any work. mace-ood starts
that server itself, before the flow: with ``DEFAULT_STARTUP_TIMEOUT_S`` unless the user set the
timeout, one retry with twice the time, and then a one-line error saying what to do.

The temporary server listens on 127.0.0.1, which every account of a shared login node reaches too:
it is started with a random secret (``PREFECT_SERVER_API_AUTH_STRING``), which only the
run's own clients carry (``PREFECT_API_AUTH_STRING``, in this process's settings, which Prefect
hands to every task it runs on a Dask worker, and in its environment, which SLURM jobs inherit,
while the run lasts; never written to a file). A process's later runs (a notebook's, a test
process's) reuse its port and secret: the local workers' forkserver imported Prefect with both and
is started again for other settings, which cost each later run its preloads (about 15 s here).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from mace_ood.runtime import environment

DEFAULT_STARTUP_TIMEOUT_S = 90.0
PREFECT_DEFAULT_TIMEOUT_S = 20.0  # Prefect 3.9's own default
TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"

log = logging.getLogger(__name__)
_temporary_api_urls: set[str] = set()  # the temporary servers of this process's runs now
_last_port: int | None = None  # the port of this process's last temporary server
_PROCESS_SECRET = secrets.token_urlsafe(32)  # of this process's temporary servers, in memory only


class ServerStartError(RuntimeError):
    pass


class UnsafeApiError(RuntimeError):
    """A Prefect API others can reach without a secret (:func:`unauthenticated_api_message`)."""


def refuse_unauthenticated_api(api_url: str | None = None) -> None:
    """Raise :class:`UnsafeApiError` for ``api_url`` (default: the configured ``PREFECT_API_URL``)."""
    from prefect.settings import get_current_settings

    url = api_url or get_current_settings().api.url
    message = unauthenticated_api_message(str(url) if url else None)
    if message:
        raise UnsafeApiError(message)


def startup_timeout() -> float:
    """The user's ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` when set (environment or
    Prefect profile), else ``DEFAULT_STARTUP_TIMEOUT_S``."""
    from prefect.settings import get_current_settings

    if os.environ.get(TIMEOUT_ENV):
        return float(os.environ[TIMEOUT_ENV])
    configured = float(get_current_settings().server.ephemeral.startup_timeout_seconds)
    return configured if configured != PREFECT_DEFAULT_TIMEOUT_S else DEFAULT_STARTUP_TIMEOUT_S


def start_temporary_server(timeout_s: float | None = None):
    """Start Prefect's temporary server (retried once with twice the time) with the current settings
    (its auth string among them); returns the server (``api_url``, ``stop()``)."""
    from prefect.server.api.server import SubprocessASGIServer

    global _last_port
    timeout_s = timeout_s or startup_timeout()
    for attempt in (1, 2):
        server = SubprocessASGIServer(server_port(_last_port))
        try:
            server.start(timeout=timeout_s * attempt)
        except RuntimeError:
            server.stop()  # it may still be starting: never leave it behind
            if attempt == 2:
                raise ServerStartError(
                    f"Prefect's temporary server did not start within {timeout_s:g} s, nor {2 * timeout_s:g} s "
                    "on a retry: start one with `prefect server start` and `export "
                    "PREFECT_API_URL=http://127.0.0.1:4200/api`, or raise " + TIMEOUT_ENV
                ) from None
            log.warning("Prefect's temporary server did not start within %g s; retrying with %g s",
                        timeout_s, 2 * timeout_s)
        else:
            _last_port = server.port
            return server
    raise AssertionError("unreachable")


def is_temporary(api_url: str | None) -> bool:
    """Whether ``api_url`` is a temporary server (it lives only as long as the run): one that a run of
    this process started, or Prefect's own for a flow called without an API."""
    from prefect.settings import get_current_settings

    return bool(api_url) and (api_url in _temporary_api_urls or not get_current_settings().api.url)


def server_port(preferred: int | None = None) -> int:
    """A free port on 127.0.0.1 for a temporary server, ``preferred`` where it is free: given
    explicitly, the server is this run's own instance (Prefect shares one instance between callers
    that give no port)."""
    import socket

    with socket.socket() as probe:
        # as the server binds (asyncio's default): the last run's closed connections in TIME_WAIT
        # do not hold the port, a listening server does
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", preferred or 0))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unauthenticated_api_message(api_url: str | None) -> str | None:
    """One line when the flow's Prefect API is beyond this machine and its clients carry no auth
    string (``PREFECT_API_AUTH_STRING``), else None."""
    from urllib.parse import urlparse

    from prefect.settings import get_current_settings

    from mace_ood.cluster import is_loopback_host

    if not api_url or is_loopback_host(urlparse(api_url).hostname) or get_current_settings().api.auth_string:
        return None
    return (f"PREFECT_API_URL {api_url} is beyond this machine and PREFECT_API_AUTH_STRING is not set: anyone who "
            "reaches that server reads every run's logs, cancels runs and starts deployments with any parameters; "
            "start it with PREFECT_SERVER_API_AUTH_STRING=<secret> and export PREFECT_API_AUTH_STRING=<secret> for "
            "the flow and its workers (SLURM jobs inherit it from the flow's environment)")


@contextmanager
def run_api() -> Iterator[str]:
    """The configured API, or a temporary server with a secret for the duration of the
    block: its URL is then this process's ``PREFECT_API_URL`` setting (the Dask workers are given
    it), and the secret its ``PREFECT_API_AUTH_STRING`` setting (which the tasks on the workers get
    with the flow's settings) and environment variable (which batch-queue jobs inherit)."""
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        PREFECT_SERVER_API_AUTH_STRING,
        get_current_settings,
        temporary_settings,
    )

    configured = get_current_settings().api.url
    if configured:
        yield str(configured)
        return
    secret = _PROCESS_SECRET
    with temporary_settings(updates={PREFECT_SERVER_API_AUTH_STRING: secret, PREFECT_API_AUTH_STRING: secret}):
        server = start_temporary_server()
        _temporary_api_urls.add(server.api_url)
        try:
            with temporary_settings(updates={PREFECT_API_URL: server.api_url}), \
                    environment({"PREFECT_API_AUTH_STRING": secret}):
                yield server.api_url
        finally:
            _send_queued_logs()
            _temporary_api_urls.discard(server.api_url)
            server.stop()


def _send_queued_logs(timeout_s: float = 5.0) -> None:
    """Send the run's queued log batches before its temporary server stops: left queued, they were
    sent at exit to a server that was gone, and the process spent a minute on connection retries
    before "Error logging to API: All connection attempts failed" (measured on a failed run)."""
    from prefect.logging.handlers import APILogWorker

    try:
        APILogWorker.drain_all(timeout=timeout_s)
    except Exception:  # noqa: BLE001 - best effort: the run's result is already decided
        pass
