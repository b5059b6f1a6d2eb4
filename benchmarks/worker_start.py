"""Local Dask workers ready to extract: spawned (each imports torch, e3nn, mace and Prefect) against
forked from one preloaded process (``mace_ood.cluster.forked_local_workers``), in the same process.

Each round starts a local cluster of ``--workers`` single-threaded workers the way the flow does
(``worker_environment``), runs one task per worker that imports Prefect's task engine (as the
flow's tasks do), loads a tiny MACE model and runs it on one structure, and closes the cluster. CPU-seconds are the whole machine's busy time
(``/proc/stat``: this process, the forkserver, the workers); the forkserver's own imports are
paid in the first forked round, so later rounds are what a second run in the same process costs.
"forked, TLS" is the forked round with the scheduler and workers on TLS (``Security.temporary()``).

    python benchmarks/worker_start.py --workers 2 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from mace_ood.runtime import apply_environment_defaults

os.environ.setdefault("OMP_NUM_THREADS", "1")
apply_environment_defaults()


def busy_cpu_s() -> float:
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def first_forward(model_path: str) -> int:
    import prefect.task_engine  # noqa: F401  (what a worker imports to run one of the flow's tasks)
    import prefect_dask  # noqa: F401

    from mace_ood.extract.runner import LatentExtractor
    from mace_ood.testing import random_structures

    extractor = LatentExtractor(model_path, device="cpu", default_dtype="float64")
    return len(extractor(random_structures(1, seed=0)[0]))


def one_round(model_path: str, n_workers: int, forked: bool, tls: bool = False) -> tuple[float, float]:
    from contextlib import nullcontext

    from distributed import Client, LocalCluster
    from distributed.security import Security

    from mace_ood.cluster import forked_local_workers, worker_environment

    env = {**os.environ, **worker_environment(n_workers, None)}
    started, cpu = time.perf_counter(), busy_cpu_s()
    secure = {"security": Security.temporary(), "protocol": "tls://"} if tls else {}
    with forked_local_workers(env) if forked else nullcontext(), LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0", host="127.0.0.1", env=env,
        **secure,
    ) as cluster, Client(cluster, security=secure.get("security")) as client:
        workers = list(client.scheduler_info()["workers"])
        sizes = [client.submit(first_forward, model_path, workers=[w], pure=False) for w in workers]
        assert all(s.result() > 0 for s in sizes)
    return time.perf_counter() - started, busy_cpu_s() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from mace_ood.testing import save_tiny_family

    with tempfile.TemporaryDirectory() as folder:
        model = str(save_tiny_family(Path(folder), "B", 1)[0])
        rows = []
        for label, forked, tls in (("spawned", False, False), ("forked", True, False), ("forked, TLS", True, True)):
            for index in range(args.rounds):
                wall, cpu = one_round(model, args.workers, forked, tls)
                rows.append((label, index + 1, wall, cpu))
                print(f"{label} round {index + 1}: {wall:.1f} s wall, {cpu:.1f} CPU-s", flush=True)
    later = {label: [r for r in rows if r[0] == label and r[1] > 1] for label in ("spawned", "forked", "forked, TLS")}
    print(f"\n{args.workers} workers, {os.cpu_count()} cores\n")
    print("| workers start | round | wall (s) | CPU-s (machine) |\n|---|---|---|---|")
    for label, index, wall, cpu in rows:
        print(f"| {label} | {index} | {wall:.1f} | {cpu:.1f} |")
    if later["spawned"] and later["forked"]:
        mean = {k: sum(r[3] for r in v) / len(v) for k, v in later.items()}
        print(f"\nrounds after the first: forked uses {mean['forked'] / mean['spawned']:.2f}x the CPU of spawned")
    if later["forked"] and later["forked, TLS"]:
        wall = {k: sorted(r[2] for r in v)[len(v) // 2] for k, v in later.items()}
        print(f"TLS (temporary credentials) against plain TCP, forked, rounds after the first: "
              f"{wall['forked, TLS'] / wall['forked']:.2f}x the wall time (median), "
              f"{wall['forked, TLS'] - wall['forked']:+.2f} s")


if __name__ == "__main__":
    main()
