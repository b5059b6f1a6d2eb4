"""The Prefect API of a run: the one the user configured, or a temporary server started here.

Without ``PREFECT_API_URL``, Prefect starts a temporary server in a subprocess and gives it
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (20 s by default) to answer. On a busy
login node that start-up took longer, and the run failed before any work. mace-ood starts
that server itself, before the flow: with ``DEFAULT_STARTUP_TIMEOUT_S`` unless the user set the
timeout, one retry with twice the time, and then a one-line error saying what to do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_STARTUP_TIMEOUT_S = 90.0
PREFECT_DEFAULT_TIMEOUT_S = 20.0  # Prefect 3.9's own default
TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"

log = logging.getLogger(__name__)
_temporary_api_url: list[str] = []  # the URL of the temporary server this process started, if any


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


def start_temporary_server(timeout_s: float | None = None) -> str:
    """Start Prefect's temporary server (retried once with twice the time); returns its API URL."""
    from prefect.server.api.server import SubprocessASGIServer

    timeout_s = timeout_s or startup_timeout()
    for attempt in (1, 2):
        server = SubprocessASGIServer()
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
            _temporary_api_url[:] = [server.api_url]
            return server.api_url
    raise AssertionError("unreachable")


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


def is_temporary(api_url: str | None) -> bool:
    """Whether ``api_url`` is a temporary server of this process (it lives only as long as the run)."""
    return bool(api_url) and api_url in _temporary_api_url


@contextmanager
def run_api() -> Iterator[str]:
    """The configured API, or a temporary server for the duration of the block (its URL is
    then this process's ``PREFECT_API_URL``, which the Dask workers are given too)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    configured = get_current_settings().api.url
    if configured:
        yield str(configured)
        return
    from prefect.server.api.server import SubprocessASGIServer

    url = start_temporary_server()
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        _send_queued_logs()
        SubprocessASGIServer().stop()
        _temporary_api_url.clear()


def _send_queued_logs(timeout_s: float = 5.0) -> None:
    """Send the run's queued log batches before its temporary server stops: left queued, they were
    sent at exit to a server that was gone, and the process spent a minute on connection retries
    before "Error logging to API: All connection attempts failed" (measured on a failed run)."""
    from prefect.logging.handlers import APILogWorker

    try:
        APILogWorker.drain_all(timeout=timeout_s)
    except Exception:  # noqa: BLE001 - best effort: the run's result is already decided
        pass
