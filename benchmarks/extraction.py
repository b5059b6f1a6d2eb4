"""Benchmark 1: latent extraction throughput (atoms/s), mace-ood vs the alternatives.

    .venv/bin/python benchmarks/extraction.py [--device cpu|cuda] [--atoms-per-size 16000]

On the same structures and the same model, in one run:

- ``bare loop``: ``model(batch, compute_force=False)`` over pre-built batches (the limit);
- ``mace-ood``: ``extract_to_netcdf`` (reads the file, checks, builds graphs, writes netCDF);
- ``get_descriptors``: ``MACECalculator.get_descriptors`` per structure (what users write);
- ``mace_eval_configs``: mace's CLI with ``--return_descriptors`` (also computes forces);
  its start-up (a 1-structure run) is subtracted.

Prints a markdown table; ratios are against the bare loop of the same size.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mace_ood.runtime import apply_environment_defaults

apply_environment_defaults()  # before torch starts OpenMP

import ase.io  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase.build import bulk  # noqa: E402

from mace_ood.config import ExtractionSettings  # noqa: E402
from mace_ood.extract.runner import LatentExtractor  # noqa: E402
from mace_ood.extract.stream import extract_to_netcdf  # noqa: E402
from mace_ood.testing import build_tiny_mace  # noqa: E402

SIZES = {32: (2, 2, 2), 256: (4, 4, 4), 2048: (8, 8, 8)}


def structures(n_atoms: int, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * SIZES[n_atoms]
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bare_loop(model_path, frames, device, dtype, batch_size) -> float:
    from mace.tools.torch_geometric.batch import Batch

    extractor = LatentExtractor(model_path, device, dtype)
    graphs = [extractor.graph(a) for a in frames]
    batches = [Batch.from_data_list(graphs[i : i + batch_size]).to(extractor.device) for i in range(0, len(graphs), batch_size)]
    model = extractor.model

    def run():
        with torch.inference_mode():
            for batch in batches:
                model(batch.to_dict(), compute_force=False)["node_feats"].cpu()
        if extractor.device.startswith("cuda"):
            torch.cuda.synchronize()

    run()  # warm-up
    return timed(run)


def mace_ood(model_path, data, device, dtype, batch_size, workdir) -> tuple[float, dict]:
    settings = ExtractionSettings(device=device, default_dtype=dtype, batch_size=batch_size, max_atoms_per_batch=1 << 20)
    extract_to_netcdf(model_path, [str(data)], workdir / "warm.nc", settings)  # model load, warm-up
    out = workdir / "bench.nc"
    start = time.perf_counter()
    summary = extract_to_netcdf(model_path, [str(data)], out, settings)
    seconds = time.perf_counter() - start
    extra = {}
    if device.startswith("cuda"):
        extra["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        extra["batch"] = summary.smallest_batch
    out.unlink()
    return seconds, extra


def get_descriptors(model_path, frames, device, dtype) -> float:
    from mace.calculators import MACECalculator

    calculator = MACECalculator(model_paths=str(model_path), device=device, default_dtype=dtype)
    calculator.get_descriptors(frames[0])
    return timed(lambda: [calculator.get_descriptors(a, invariants_only=True) for a in frames])


def eval_configs(model_path, data, one, device, dtype, batch_size, workdir) -> float:
    command = [sys.executable, "-m", "mace.cli.eval_configs", "--model", str(model_path), "--device", device,
               "--default_dtype", dtype, "--batch_size", str(batch_size), "--return_descriptors"]

    def run(configs):
        subprocess.run([*command, "--configs", str(configs), "--output", str(workdir / "out.xyz")],
                       check=True, capture_output=True)

    startup = timed(lambda: run(one))
    return timed(lambda: run(data)) - startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--atoms-per-size", type=int, default=16000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--max-l", type=int, default=0)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mace-ood-bench-"))
    model_path = workdir / "model.model"
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    torch.save(build_tiny_mace(0, atomic_numbers=(29,), channels=args.channels, max_l=args.max_l, dtype=dtype), model_path)
    print(f"# extraction benchmark: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}, {args.dtype}, "
          f"C={args.channels} L={args.max_l}, batch {args.batch_size}\n")
    print("| atoms/structure | structures | bare loop (atoms/s) | mace-ood | get_descriptors | mace_eval_configs |")
    print("|---|---|---|---|---|---|")
    for n_atoms in SIZES:
        count = max(2, args.atoms_per_size // n_atoms)
        frames = structures(n_atoms, count)
        data = workdir / f"s{n_atoms}.xyz"
        one = workdir / f"one{n_atoms}.xyz"
        ase.io.write(data, frames)
        ase.io.write(one, frames[:1])
        total = n_atoms * count
        limit = total / bare_loop(model_path, frames, args.device, args.dtype, args.batch_size)
        ours_s, extra = mace_ood(model_path, data, args.device, args.dtype, args.batch_size, workdir)
        ours = total / ours_s
        per_structure = total / get_descriptors(model_path, frames, args.device, args.dtype)
        cli = total / max(1e-9, eval_configs(model_path, data, one, args.device, args.dtype, args.batch_size, workdir))
        gpu = f" (peak GPU {extra['peak_gpu_mib']:.0f} MiB)" if extra else ""
        print(f"| {n_atoms} | {count} | {limit:,.0f} | {ours:,.0f} ({ours / limit:.2f}x){gpu} | "
              f"{per_structure:,.0f} ({per_structure / limit:.2f}x) | {cli:,.0f} ({cli / limit:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
