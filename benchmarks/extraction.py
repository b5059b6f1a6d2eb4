"""Benchmark 1: latent extraction throughput (atoms/s), mace-ood against the matching bare loop.

    .venv/bin/python benchmarks/extraction.py [--device cpu|cuda] [--repeats 3] [--sizes 32 256 2048]

On the same structures and the same model, in one run, in both modes of a run:

- **latents only** (``forces: false``): ``extract_to_netcdf`` against the bare loop
  ``model(batch, compute_force=False)`` under ``inference_mode``, and against
  ``MACECalculator.get_descriptors`` per structure (what users write);
- **forces on** (the default): ``extract_to_netcdf`` against the bare loop
  ``model(batch, compute_force=True)``, and against mace's CLI ``mace_eval_configs
  --return_descriptors`` (which computes forces too; its start-up, a 1-structure run, is subtracted).

The bare loops run over batches built ahead of time by mace's own data pipeline (``AtomicData``,
``Batch``), outside the timing: they are the limit, the model alone. mace-ood's time includes
reading the file, checks, graphs and writing netCDF. Each measurement is repeated; the table
gives the median ratio to the bare loop of the same mode and size, with the range in brackets.
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
from mace_ood.extract.stream import extract_to_netcdf  # noqa: E402
from mace_ood.testing import build_tiny_mace  # noqa: E402

SIZES = {32: (2, 2, 2), 256: (4, 4, 4), 2048: (8, 8, 8)}
BUDGET = ExtractionSettings().max_atoms_per_batch


def structures(n_atoms: int, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * SIZES[n_atoms]
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


def dataset(workdir: Path, n_atoms: int, atoms_per_size: int) -> tuple[list, Path]:
    """The structures of one size (``atoms_per_size`` atoms in all, at least 2) and the extxyz file of them."""
    frames = structures(n_atoms, max(2, atoms_per_size // n_atoms))
    path = workdir / f"s{n_atoms}.xyz"
    ase.io.write(path, frames)
    return frames, path


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bare_loop(model_path, frames, device, dtype, batch_size, forces: bool) -> float:
    """Seconds of the model alone over batches built by mace's pipeline beforehand."""
    import mace.data
    from mace.tools import AtomicNumberTable
    from mace.tools.torch_geometric.batch import Batch
    from mace.tools.torch_tools import default_dtype

    model = torch.load(model_path, weights_only=False, map_location=device).to(getattr(torch, dtype))
    table = AtomicNumberTable([int(z) for z in model.atomic_numbers])
    with default_dtype(getattr(torch, dtype)):
        graphs = [mace.data.AtomicData.from_config(mace.data.config_from_atoms(a), z_table=table,
                                                    cutoff=float(model.r_max)) for a in frames]
    batches = [Batch.from_data_list(graphs[i : i + batch_size]).to(device) for i in range(0, len(graphs), batch_size)]

    def run():
        for batch in batches:
            if forces:
                out = model(batch.to_dict(), compute_force=True)
                out["node_feats"].detach().cpu(), out["forces"].detach().cpu()
            else:
                with torch.inference_mode():
                    model(batch.to_dict(), compute_force=False)["node_feats"].cpu()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run()  # warm-up
    return timed(run)


def mace_ood(model_path, data, device, dtype, batch_size, workdir, forces: bool,
             max_atoms: int | None = 1 << 20) -> tuple[float, dict]:
    """``batch_size`` None: the run's default, batches by the atom budget alone; else that count,
    within ``max_atoms`` (None: the default budget)."""
    budget = {} if batch_size is None or max_atoms is None else {"max_atoms_per_batch": max_atoms}
    settings = ExtractionSettings(device=device, default_dtype=dtype, batch_size=batch_size, forces=forces, **budget)
    extract_to_netcdf(model_path, [str(data)], workdir / "warm.nc", settings)  # model load, warm-up
    (workdir / "warm.nc").unlink()
    out = workdir / "bench.nc"
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
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


def ratio(values: list[float]) -> str:
    """Median of the repeats, with their range."""
    return f"{np.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--atoms-per-size", type=int, default=16000)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="structures per pass for all (default: mace-ood's default, the atom budget of "
                        "max_atoms_per_batch alone, and the bare loops batched the same way)")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--max-l", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--skip-cli", action="store_true", help="leave out mace_eval_configs (slow)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mace-ood-bench-"))
    model_path = workdir / "model.model"
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    torch.save(build_tiny_mace(0, atomic_numbers=(29,), channels=args.channels, max_l=args.max_l, dtype=dtype), model_path)
    print(f"# extraction benchmark: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}, {args.dtype}, C={args.channels} "
          f"L={args.max_l}, batch {args.batch_size or f'by atom budget ({BUDGET} atoms)'}, median of {args.repeats} repeats (range)\n")
    print("| atoms/structure | structures | latents only: bare loop (atoms/s) | mace-ood / bare | "
          "get_descriptors / bare | forces on: bare loop (atoms/s) | mace-ood / bare | mace_eval_configs / bare |")
    print("|---|---|---|---|---|---|---|---|")
    for n_atoms in args.sizes:
        frames, data = dataset(workdir, n_atoms, args.atoms_per_size)
        count = len(frames)
        one = workdir / f"one{n_atoms}.xyz"
        ase.io.write(one, frames[:1])
        total = n_atoms * count
        bare_batch = args.batch_size or max(1, BUDGET // n_atoms)  # the batches mace-ood's default makes
        cli_batch = args.batch_size or bare_batch
        rows: dict[str, list[float]] = {k: [] for k in ("bare", "ours", "desc", "bare_f", "ours_f", "cli")}
        extra: dict = {}
        for _ in range(args.repeats):
            bare = bare_loop(model_path, frames, args.device, args.dtype, bare_batch, forces=False)
            bare_f = bare_loop(model_path, frames, args.device, args.dtype, bare_batch, forces=True)
            rows["bare"].append(total / bare)
            rows["bare_f"].append(total / bare_f)
            ours, extra = mace_ood(model_path, data, args.device, args.dtype, args.batch_size, workdir, forces=False)
            rows["ours"].append(bare / ours)
            ours_f, _ = mace_ood(model_path, data, args.device, args.dtype, args.batch_size, workdir, forces=True)
            rows["ours_f"].append(bare_f / ours_f)
            rows["desc"].append(bare / get_descriptors(model_path, frames, args.device, args.dtype))
            if not args.skip_cli:
                cli = eval_configs(model_path, data, one, args.device, args.dtype, cli_batch, workdir)
                rows["cli"].append(bare_f / max(1e-9, cli))
        gpu = f" (peak GPU {extra['peak_gpu_mib']:.0f} MiB)" if extra else ""
        print(f"| {n_atoms} | {count} | {np.median(rows['bare']):,.0f} | {ratio(rows['ours'])}{gpu} | "
              f"{ratio(rows['desc'])} | {np.median(rows['bare_f']):,.0f} | {ratio(rows['ours_f'])} | "
              f"{ratio(rows['cli']) if rows['cli'] else '-'} |", flush=True)


if __name__ == "__main__":
    main()
