"""Benchmarks 2 and 4: a whole `mace-ood run` (Prefect + Dask + extraction + scores + reports).

    .venv/bin/python benchmarks/full_run.py memory [--sizes 10000 100000 1000000]
    .venv/bin/python benchmarks/full_run.py workers [--atoms 100000] [--seeds 4]

``memory``: peak RSS of the whole process tree (flow, Dask scheduler and workers), sampled
every 0.2 s with psutil, for datasets of replicated 32-atom structures; it must not grow
with the dataset beyond the output tables.
``workers``: wall time of the same run with 1 and 2 local Dask workers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import yaml

from mace_ood.testing import build_tiny_mace, random_structures


def write_structures(path: Path, n_atoms: int, seed: int) -> None:
    """Replicated rattled 32-atom Cu cells, streamed to an extxyz file."""
    import ase.io

    pool = random_structures(64, seed=seed, symbols=("Cu",), sizes=(2,))
    with open(path, "w") as handle:
        for i in range(n_atoms // 32):
            ase.io.write(handle, pool[i % len(pool)], format="extxyz")


def make_run(root: Path, n_atoms: int, seeds: int, workers: int) -> Path:
    models = []
    for s in range(seeds):
        models.append(root / f"F_seed{s}.model")
        torch.save(build_tiny_mace(s, atomic_numbers=(29,), channels=16, max_l=0, dtype=torch.float32), models[-1])
    write_structures(root / "train.xyz", 3200, seed=1)
    if not (root / f"data{n_atoms}.xyz").exists():
        write_structures(root / f"data{n_atoms}.xyz", n_atoms, seed=2)
    config = {
        "output_dir": str(root / f"run{n_atoms}-{workers}"),
        "device": "cpu", "default_dtype": "float32", "batch_size": 16,
        "datasets": {"train": [str(root / "train.xyz")], "big": [str(root / f"data{n_atoms}.xyz")]},
        "model_families": {"F": {"trained_on": "train", "models": [str(m) for m in models]}},
        "dask": {"n_workers": workers},
    }
    path = root / f"config{n_atoms}-{workers}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_and_watch(config: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of the whole process tree of `mace-ood run`."""
    start = time.perf_counter()  # the CLI applies mace-ood's environment defaults itself
    process = subprocess.Popen([sys.executable, "-m", "mace_ood.cli", "run", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    if process.returncode != 0:
        raise RuntimeError(f"mace-ood run {config} failed ({process.returncode})")
    return time.perf_counter() - start, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "workers"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--atoms", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="mace-ood-full-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"# full-run benchmark ({args.what}): {os.cpu_count()} cores, tiny C16 float32 models, "
          f"{args.seeds} seeds, 32-atom structures\n")
    if args.what == "memory":
        print("| atoms | structures | wall (s) | peak RSS, process tree (MiB) |")
        print("|---|---|---|---|")
        for n_atoms in args.sizes:
            seconds, peak = run_and_watch(make_run(root, n_atoms, args.seeds, 1))
            print(f"| {n_atoms:,} | {n_atoms // 32:,} | {seconds:.0f} | {peak:.0f} |", flush=True)
    else:
        print("| Dask workers | atoms | wall (s) | peak RSS (MiB) |")
        print("|---|---|---|---|")
        for workers in (1, 2):
            seconds, peak = run_and_watch(make_run(root, args.atoms, args.seeds, workers))
            print(f"| {workers} | {args.atoms:,} | {seconds:.0f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
