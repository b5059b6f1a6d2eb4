"""Recognising out-of-memory errors (CUDA, CPU allocator, or the test budget)."""

from __future__ import annotations


class OutOfMemoryError(RuntimeError):
    """Raised by an injected memory budget; named like torch's so it is handled alike."""


class DoesNotFitError(RuntimeError):
    """A structure too large for the device even split into domains: deterministic, never retried."""


INJECT_COLLATION_BUDGET_ENV = "MACE_OOD_INJECT_ATOMS_PER_COLLATION"


def collation_budget() -> int | None:
    """An injected atom budget for collating one batch (tests stand it in for a device whose
    memory a big batch exhausts before the model runs, where in-process back-off cannot help)."""
    import os

    value = os.environ.get(INJECT_COLLATION_BUDGET_ENV)
    return int(value) if value else None


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch.OutOfMemoryError (any class so named) or a RuntimeError saying "out of memory"."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, RuntimeError):
        message = str(exc).lower()
        return "out of memory" in message or "can't allocate memory" in message
    return False


def free_device_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - freeing is best effort
        pass
