"""Benchmark: what a time checkpoint of a latent file costs, which bounds what a killed job loses.

    .venv/bin/python benchmarks/checkpoint.py [--features 128 256] [--structure-atoms 96]

An extraction makes its ``.partial`` file durable after each whole chunk (16,384 atoms) and at
least every ``CHECKPOINT_SECONDS`` (:mod:`mace_ood.extract.stream`): a job killed by its walltime
or ``scancel`` loses at most that long of model time, whatever the file's size. A checkpoint
writes the buffered partial chunk (compressed, rewritten at each checkpoint until the chunk is
whole), the structure table, and syncs. This fills whole chunks of random latents structure by
structure, once without checkpoints and once with a checkpoint after every ``--every`` atoms, and
prints the cost of one checkpoint and the share of the time it would take at the default interval.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from mace_ood.extract.store import LatentWriter
from mace_ood.extract.stream import CHECKPOINT_SECONDS
from mace_ood.runtime import configure_process


def fill(path: Path, features: int, structure_atoms: int, n_atoms: int, every: int | None) -> tuple[float, int]:
    """Seconds to write ``n_atoms`` of latents (closing the file included), and the checkpoints made."""
    rng = np.random.default_rng(0)
    block = rng.standard_normal((structure_atoms, features)).astype(np.float32)
    checkpoints, since = 0, 0
    start = time.perf_counter()
    with LatentWriter(path, features, "float32", with_forces=True,
                      on_durable=lambda *_: None) as writer:
        for i in range(n_atoms // structure_atoms):
            writer.append(f"s{i}", "md.extxyz", i, block + i, formula="Cu96", tag=i,
                          forces=block[:, :3], node_energy=block[:, 0], energy=float(i))
            since += structure_atoms
            if every and since >= every:
                writer.checkpoint()
                checkpoints, since = checkpoints + 1, 0
    return time.perf_counter() - start, checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--structure-atoms", type=int, default=96)
    parser.add_argument("--every", type=int, default=960, help="atoms between checkpoints")
    parser.add_argument("--chunks", type=int, default=4, help="whole 16,384-atom chunks written")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configure_process()
    n_atoms = args.chunks * 16384
    print(f"| latent width | checkpoints | one checkpoint (ms) | share of the time at {CHECKPOINT_SECONDS:g} s | at 60 s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for features in args.features:
            plain, checked, made = [], [], 0
            for r in range(args.repeats):
                plain.append(fill(Path(tmp) / f"plain{r}.nc", features, args.structure_atoms, n_atoms, None)[0])
                seconds, made = fill(Path(tmp) / f"checked{r}.nc", features, args.structure_atoms, n_atoms,
                                     args.every)
                checked.append(seconds)
            one = max(0.0, (min(checked) - min(plain)) / made)
            print(f"| {features} | {made} | {1000 * one:.1f} | {100 * one / CHECKPOINT_SECONDS:.2f} % | "
                  f"{100 * one / 60:.2f} % |")


if __name__ == "__main__":
    main()
