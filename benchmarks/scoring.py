"""Benchmark 3: out-of-core scoring, and the compression and chunking of the latent files.

    .venv/bin/python benchmarks/scoring.py [--atoms 1000000] [--seeds 4] [--features 128]

Writes S seed files of N atoms x F float32 latents (structures of 32 atoms), then times,
each in a fresh process with its peak RSS:

- ``xarray lazy``: mace-ood's scoring (``open_latents`` + ``compute_scores``);
- ``netCDF4 loop``: a plain read loop over chunk-sized slabs of every seed file;
- ``numpy in RAM``: everything loaded, then one ``var`` (only where it fits).

for several compression filters and chunk lengths; also the write time of each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ATOMS_PER_STRUCTURE = 32


def write_files(directory: Path, n_atoms: int, seeds: int, features: int, chunk: int, compression: str) -> float:
    from mace_ood.extract.store import LatentWriter

    rng = np.random.default_rng(0)
    base = rng.standard_normal((ATOMS_PER_STRUCTURE * 64, features)).astype(np.float32)
    start = time.perf_counter()
    for s in range(seeds):
        with LatentWriter(directory / f"seed-{s}.nc", features, "float32", chunk_atoms=chunk, compression=compression) as w:
            noise = rng.standard_normal((ATOMS_PER_STRUCTURE, features)).astype(np.float32) * 0.1
            for i in range(n_atoms // ATOMS_PER_STRUCTURE):
                block = base[(i % 64) * ATOMS_PER_STRUCTURE : (i % 64 + 1) * ATOMS_PER_STRUCTURE] + noise * (s + 1)
                w.append(f"s{i}", "x", i, block)
    return time.perf_counter() - start


def method_lazy(directory: Path, chunk: int) -> np.ndarray:
    from mace_ood.score.compute import compute_scores
    from mace_ood.score.latents import open_latents

    with open_latents(sorted(directory.glob("seed-*.nc")), chunk_atoms=chunk) as ds:
        return compute_scores(ds, None)["latent_variance"].values


def method_loop(directory: Path, chunk: int) -> np.ndarray:
    import netCDF4

    files = [netCDF4.Dataset(p) for p in sorted(directory.glob("seed-*.nc"))]
    for f in files:
        f.set_auto_mask(False)
    n_atoms = files[0]["n_atoms"][:]
    structure = np.repeat(np.arange(len(n_atoms)), n_atoms)
    total = np.zeros(len(n_atoms))
    for start in range(0, len(structure), chunk):
        block = np.stack([f["latent"][start : start + chunk] for f in files]).astype(np.float64)
        per_atom = block.var(axis=0).mean(axis=-1)
        total += np.bincount(structure[start : start + chunk], per_atom, minlength=len(n_atoms))
    return total / n_atoms


def method_numpy(directory: Path, chunk: int) -> np.ndarray:
    import netCDF4

    arrays = []
    for p in sorted(directory.glob("seed-*.nc")):
        with netCDF4.Dataset(p) as f:
            f.set_auto_mask(False)
            arrays.append(f["latent"][:])
            n_atoms = f["n_atoms"][:]
    per_atom = np.stack(arrays).var(axis=0).mean(axis=-1)
    return np.add.reduceat(per_atom, np.concatenate([[0], np.cumsum(n_atoms)[:-1]])) / n_atoms


def child(method: str, directory: str, chunk: int) -> None:
    start = time.perf_counter()
    result = {"lazy": method_lazy, "loop": method_loop, "numpy": method_numpy}[method](Path(directory), chunk)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(Path(directory) / f"result-{method}.npy", result)
    print(json.dumps({"seconds": seconds, "peak_mib": peak}))


def measure(method: str, directory: Path, chunk: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", method, str(directory), str(chunk)],
                         check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atoms", type=int, default=1_000_000)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--numpy-max-gib", type=float, default=8.0)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    size_gib = args.atoms * args.seeds * args.features * 4 / 2**30
    print(f"# scoring benchmark: {args.seeds} seeds x {args.atoms:,} atoms x {args.features} float32 "
          f"({size_gib:.1f} GiB raw), {os.cpu_count()} cores\n")
    print("| compression | chunk (atoms) | write (s) | files (MiB) | xarray lazy (s / peak MiB) | netCDF4 loop (s / peak MiB) | numpy in RAM (s / peak MiB) |")
    print("|---|---|---|---|---|---|---|")
    cases = [("zlib", 16384), ("blosc_lz4", 16384), ("zstd", 16384), ("none", 16384), ("zlib", 4096), ("zlib", 65536)]
    for compression, chunk in cases:
        with tempfile.TemporaryDirectory(prefix="mace-ood-score-bench-") as tmp:
            directory = Path(tmp)
            write_s = write_files(directory, args.atoms, args.seeds, args.features, chunk, compression)
            mib = sum(p.stat().st_size for p in directory.glob("seed-*.nc")) / 2**20
            lazy = measure("lazy", directory, chunk)
            loop = measure("loop", directory, chunk)
            cells = [f"{lazy['seconds']:.1f} / {lazy['peak_mib']:.0f}", f"{loop['seconds']:.1f} / {loop['peak_mib']:.0f}"]
            if compression == "zlib" and chunk == 16384 and size_gib < args.numpy_max_gib:
                ram = measure("numpy", directory, chunk)
                cells.append(f"{ram['seconds']:.1f} / {ram['peak_mib']:.0f}")
                np.testing.assert_allclose(np.load(directory / "result-numpy.npy"), np.load(directory / "result-lazy.npy"), rtol=1e-6)
            else:
                cells.append("—")
            np.testing.assert_allclose(np.load(directory / "result-loop.npy"), np.load(directory / "result-lazy.npy"), rtol=1e-6)
            print(f"| {compression} | {chunk} | {write_s:.1f} | {mib:.0f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
