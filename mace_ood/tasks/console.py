"""What a user sees in the terminal: Prefect's log lines without the tracebacks.

A failed task is reported once, as one line naming the task and the file with the cause; the
traceback stays in the Prefect API's logs (the UI). ``MACE_OOD_TRACEBACKS=1`` shows it here too.
"""

from __future__ import annotations

import logging
import os

TRACEBACKS_ENV = "MACE_OOD_TRACEBACKS"


class WithoutTraceback(logging.Formatter):
    """Formats a record with another formatter, leaving out its exception and stack (the record
    itself is untouched, so the API handler still sends the traceback)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            text = self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        return text


def hide_console_tracebacks() -> None:
    """Console handlers of Prefect's logging (root and its own loggers) print no tracebacks."""
    if os.environ.get(TRACEBACKS_ENV, "").lower() in ("1", "true", "yes"):
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, WithoutTraceback):
                handler.setFormatter(WithoutTraceback(handler.formatter))
