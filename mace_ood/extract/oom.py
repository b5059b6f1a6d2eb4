"""Recognising out-of-memory errors (CUDA, the CPU allocator, or a test's injected budget)."""

from __future__ import annotations


class OutOfMemoryError(RuntimeError):
    """Raised by an injected memory budget; named like torch's so it is handled alike."""


class DoesNotFitError(RuntimeError):
    """A structure too large for the device even split into domains: deterministic, never retried."""


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
