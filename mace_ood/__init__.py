"""mace-ood: find the structures a MACE model ensemble does not understand (plan -> extract -> score -> select -> report).

The Python API (:mod:`mace_ood.api`): ``open_run``, ``Run.score`` and ``OODCalculator``, imported
on first use (``import mace_ood`` stays light for Dask workers).
"""

from __future__ import annotations

_API = ("open_run", "Run", "OODCalculator", "RunError")


def __getattr__(name: str):
    if name in _API:
        from mace_ood import api

        return getattr(api, name)
    raise AttributeError(f"module 'mace_ood' has no attribute {name!r}")


__all__ = list(_API)
