"""Which device a process runs its models on: the user's choice, resolved against what it can see.

- ``cpu`` and ``cuda:N`` are taken as given (``cuda:N`` must be visible).
- ``auto`` / ``cuda`` with GPUs visible:
  - a worker that mace-ood started under dask-cuda (``MACE_OOD_GPU_PINNED=1``: its own GPU is
    the first of its ``CUDA_VISIBLE_DEVICES``), or any process that sees one GPU: ``cuda:0``;
  - several jobqueue workers in one multi-GPU job (``<prefix>-<jobid>-<n>``): the local rank
    ``n`` picks a distinct GPU, ``cuda:(n mod visible)``;
  - a plain local cluster's worker ``k``: ``cuda:(k mod visible)``;
  - anything else (the flow's own process): ``cuda:0``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

PINNED_ENV = "MACE_OOD_GPU_PINNED"
_JOBQUEUE_NAME = re.compile(r"^.+-(?P<job>\d+)-(?P<rank>\d+)$")


class DeviceError(ValueError):
    """A device that this process cannot use; the message says why."""


def local_rank(worker_name: object) -> int | None:
    """The worker's index among the workers that share its GPUs, from its Dask name."""
    if isinstance(worker_name, int):
        return worker_name
    name = str(worker_name) if worker_name is not None else ""
    if name.isdigit():
        return int(name)
    match = _JOBQUEUE_NAME.match(name)
    return int(match["rank"]) if match else None


def choose_device(
    device: str, n_visible: int, worker_name: object = None, environ: Mapping[str, str] | None = None
) -> str:
    """The torch device string for ``device`` in a process that sees ``n_visible`` GPUs."""
    environ = os.environ if environ is None else environ
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda:"):
        index = int(device.split(":", 1)[1])
        if index >= n_visible:
            raise DeviceError(f"device {device!r} requested but this process sees {n_visible} GPU(s)")
        return device
    if n_visible == 0:
        if device == "cuda":
            raise DeviceError("device 'cuda' requested but torch sees no GPU (torch.cuda.is_available() is False)")
        return "cpu"
    if environ.get(PINNED_ENV) == "1" or n_visible == 1:
        return "cuda:0"
    rank = local_rank(worker_name)
    return f"cuda:{rank % n_visible}" if rank is not None else "cuda:0"


def current_worker_name() -> object:
    try:
        from distributed import get_worker

        return get_worker().name
    except (ImportError, ValueError):
        return None


def worker_label() -> str:
    """This process's Dask worker name, or ``local`` outside a worker."""
    name = current_worker_name()
    return "local" if name is None else str(name)


def worker_device(device: str) -> str:
    """``choose_device`` for this process: torch's GPU count and, on a Dask worker, its name."""
    import torch

    n_visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return choose_device(device, n_visible, current_worker_name())
