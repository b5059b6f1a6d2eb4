"""RunSession as a library call: an interrupt reaches only the waiting main thread, never the flow's code."""

import _thread
import threading
import time

import pytest

from mace_ood.flows import session as session_module
from mace_ood.flows.session import RunSession, raise_if_interrupted


def swallowing_flow(seen: list[str]) -> str:
    """Like Prefect's engine under load: code that catches what it is handed and goes on (pydantic
    wrapped a KeyboardInterrupt raised inside its serializer and the run went on). Only the flow's own
    wait, :func:`raise_if_interrupted`, may stop it."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - the swallowing this test stands for
            seen.append(f"swallowed {type(exc).__name__}")
        try:
            raise_if_interrupted()
        except KeyboardInterrupt:
            seen.append("stopped at its wait")
            raise
    return "ran to the end"


def test_an_interrupt_stops_the_flow_at_its_wait_and_reaches_the_caller():
    assert threading.current_thread() is threading.main_thread()
    seen: list[str] = []
    threading.Timer(0.3, _thread.interrupt_main).start()
    started = time.monotonic()
    with RunSession("a test flow", owns_process=False, start_api=False) as run_session:
        with pytest.raises(KeyboardInterrupt):
            run_session.call(swallowing_flow, seen)
        assert run_session.interrupted
    assert seen == ["stopped at its wait"], seen
    assert time.monotonic() - started < 5


def test_a_flow_that_never_waits_is_left_after_the_grace_and_the_caller_still_gets_the_interrupt(monkeypatch):
    monkeypatch.setattr(session_module, "STOP_JOIN_S", 0.2)
    release = threading.Event()
    threading.Timer(0.2, _thread.interrupt_main).start()
    with RunSession("a test flow", owns_process=False, start_api=False) as run_session:
        with pytest.raises(KeyboardInterrupt):
            run_session.call(release.wait, 30)
    release.set()


def test_without_an_interrupt_the_flow_returns_its_value_and_raises_its_error():
    with RunSession("a test flow", owns_process=False, start_api=False) as run_session:
        assert run_session.call(lambda x: x + 1, 1) == 2
        with pytest.raises(ValueError, match="bad"):
            run_session.call(lambda: (_ for _ in ()).throw(ValueError("bad")))
    raise_if_interrupted()  # no session: nothing to stop
