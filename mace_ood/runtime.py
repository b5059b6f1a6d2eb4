"""Process-wide settings, applied by entry points (CLI, flow, worker start-up), never on import."""

from __future__ import annotations

import os

# Default OpenMP spinning made MACE calls 5-10x slower at random on shared cores.
ENVIRONMENT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
    "DASK_LOGGING__DISTRIBUTED": "warning",
}
# HDF5 chunk cache per variable: the default 64 MiB per variable per open file dominates
# memory when several seed files are open at once.
HDF5_CHUNK_CACHE = (4 * 1024 * 1024, 521, 0.75)


def configure_process() -> None:
    """Environment defaults (unless set) and a small HDF5 chunk cache for this process."""
    for key, value in ENVIRONMENT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import netCDF4

    netCDF4.set_chunk_cache(*HDF5_CHUNK_CACHE)
