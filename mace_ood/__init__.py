"""mace-ood: find the structures a MACE model ensemble does not understand (plan -> extract -> score -> select -> report).

The Python API: ``run`` (:mod:`mace_ood.flows.session`) and ``open_run``, ``Run.score`` and
``OODCalculator`` (:mod:`mace_ood.api`), imported on first use (``import mace_ood`` stays light for
Dask workers).
"""

from __future__ import annotations

_API = ("open_run", "Run", "OODCalculator", "RunError")


def __getattr__(name: str):
    if name == "run":
        from mace_ood.flows.session import run

        return run
    if name in _API:
        from mace_ood import api

        return getattr(api, name)
    raise AttributeError(f"module 'mace_ood' has no attribute {name!r}")


__all__ = ["run", *_API]
