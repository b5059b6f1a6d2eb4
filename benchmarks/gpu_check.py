"""One prepared command for a lent GPU: extraction, out-of-memory back-off, scoring, memory.

    python benchmarks/gpu_check.py            # on a GPU machine (about 5 min on an H100)
    python benchmarks/gpu_check.py --quick    # reduced, on the CPU (what the tests run)

Prefect-free (only mace-torch, ase, netCDF4 and numpy/torch are needed). Prints markdown:

1. extraction throughput of mace-ood against the matching bare loop (``model(batch)`` for
   latents only, ``compute_force=True`` with forces on), float32 and float64, for a medium random-weight model (128x0e+128x1o, 2 layers, correlation 3) at
   32, 256, 2048 and ~20,000 atoms per structure, with the peak GPU memory; mace-ood at its default
   batching (the atom budget), the bare loop given the same batches;
2. a real CUDA out-of-memory (the process is capped to a small memory fraction), the batch
   backing off down to spatial domains, and the latents against the CPU's (float32 tolerance);
   in ``--quick`` mode the injected atom budget stands in for the device;
3. exact k-NN scoring throughput on the device;
4. mace's cuEquivariance path when its packages are installed, checked for equality first.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extraction import BUDGET, bare_loop, mace_ood  # noqa: E402

from mace_ood.config import ExtractionSettings  # noqa: E402
from mace_ood.extract.runner import LatentExtractor  # noqa: E402
from mace_ood.extract.stream import extract_to_netcdf  # noqa: E402
from mace_ood.score.kernels import knn_mean_distance  # noqa: E402
from mace_ood.testing import build_tiny_mace  # noqa: E402

FULL = {"channels": 128, "sizes": (32, 256, 2048, 20000), "atoms": 40000, "knn": (200_000, 20_000)}
QUICK = {"channels": 8, "sizes": (32, 256), "atoms": 600, "knn": (2000, 2000)}


def cells(n_atoms: int, count: int, seed: int = 0):
    """Rattled fcc Cu supercells of about ``n_atoms`` atoms (4 per cubic cell)."""
    from ase.build import bulk

    repeat = max(1, round((n_atoms / 4) ** (1 / 3)))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True) * (repeat, repeat, repeat)
        atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


def extraction_table(device: str, preset: dict, workdir: Path) -> list[str]:
    import ase.io

    rows = ["| dtype | mode | atoms/structure | structures | bare loop (atoms/s) | mace-ood (atoms/s) | ratio | peak GPU |",
            "|---|---|---|---|---|---|---|---|"]
    for dtype_name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        model = workdir / f"medium-{dtype_name}.model"
        torch.save(build_tiny_mace(0, atomic_numbers=(29,), channels=preset["channels"], max_l=1,
                                   num_interactions=2, correlation=3, dtype=dtype), model)
        for n_atoms in preset["sizes"]:
            frames = cells(n_atoms, max(1, preset["atoms"] // n_atoms))
            data = workdir / f"s{n_atoms}.xyz"
            ase.io.write(data, frames)
            total = sum(len(a) for a in frames)
            batch = max(1, BUDGET // len(frames[0]))  # the batches of mace-ood's default, its atom budget
            for mode, forces in (("latents only", False), ("forces on", True)):
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                limit = total / bare_loop(model, frames, device, dtype_name, batch, forces)
                seconds, extra = mace_ood(model, data, device, dtype_name, None, workdir, forces)
                peak = f"{torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB" if device.startswith("cuda") else "-"
                rows.append(f"| {dtype_name} | {mode} | {len(frames[0])} | {len(frames)} | {limit:,.0f} | "
                            f"{total / seconds:,.0f} | {total / seconds / limit:.2f}x | {peak} |")
                print(rows[-1], flush=True)
    return rows


def oom_check(device: str, quick: bool, workdir: Path) -> list[str]:
    """Back-off down to domains on a real (or, quick, injected) out-of-memory; equal to the CPU."""
    import ase.io

    model = workdir / "oom.model"
    torch.save(build_tiny_mace(1, atomic_numbers=(29,), channels=8 if quick else 64, max_l=1,
                               dtype=torch.float32), model)
    frames = cells(2048 if quick else 32000, 2)
    data = workdir / "big.xyz"
    ase.io.write(data, frames)
    settings = ExtractionSettings(device=device, default_dtype="float32", batch_size=2, max_atoms_per_batch=1 << 30,
                                  chunk_atoms=4096, forces=False)  # the latent pass: forces double the halo
    budget = None
    if quick:
        budget = 1800  # atoms per forward: forces batch 1, then domains
    else:
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        torch.cuda.set_per_process_memory_fraction(min(0.9, 2 * 2**30 / total))  # ~2 GiB: a real OOM
    started = time.perf_counter()
    summary = extract_to_netcdf(model, [str(data)], workdir / "oom.nc", settings, max_atoms_per_forward=budget)
    wall = time.perf_counter() - started
    if not quick:
        torch.cuda.set_per_process_memory_fraction(1.0)
    reference = LatentExtractor(model, "cpu", "float32")
    import netCDF4

    with netCDF4.Dataset(workdir / "oom.nc") as ds:
        got = np.asarray(ds["latent"][:])
    want = np.concatenate([reference(a) for a in frames])
    diff = float(np.max(np.abs(got - want)))
    ok = diff < 1e-4 * max(1.0, float(np.max(np.abs(want))))
    return ["| structures | atoms each | smallest batch | split into domains | wall | max diff vs CPU | equal |",
            "|---|---|---|---|---|---|---|",
            f"| {len(frames)} | {len(frames[0])} | {summary.smallest_batch} | {summary.split_structures} | {wall:.1f} s "
            f"| {diff:.2e} | {'yes' if ok else 'NO'} |"]


def scoring_table(device: str, preset: dict) -> list[str]:
    n_query, n_reference = preset["knn"]
    rng = np.random.default_rng(0)
    query = rng.standard_normal((n_query, 128)).astype(np.float32)
    reference = rng.standard_normal((n_reference, 128)).astype(np.float32)
    knn_mean_distance(query[:100], reference, 10, device=device)  # warm-up
    started = time.perf_counter()
    knn_mean_distance(query, reference, 10, device=device)
    wall = time.perf_counter() - started
    return ["| k-NN (exact, k=10) | queries | reference | wall | queries/s |", "|---|---|---|---|---|",
            f"| {device} | {n_query:,} | {n_reference:,} | {wall:.2f} s | {n_query / wall:,.0f} |"]


def cueq_check(device: str, workdir: Path) -> list[str]:
    if importlib.util.find_spec("cuequivariance_torch") is None:
        return ["cuEquivariance: not installed (cuequivariance_torch missing); e3nn path only."]
    from mace.cli.convert_e3nn_cueq import run as convert

    model = workdir / "medium-float32.model"
    out = workdir / "medium-cueq.model"
    convert(input_model=str(model), output_model=str(out), device=device)
    atoms = cells(2048, 1)[0]
    e3nn = LatentExtractor(model, device, "float32")(atoms)
    cueq = LatentExtractor(out, device, "float32")(atoms)
    diff = float(np.max(np.abs(e3nn - cueq)))
    return [f"cuEquivariance: latents max diff vs e3nn {diff:.2e} ({'equal' if diff < 1e-4 else 'DIFFERENT'})"]


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")  # e3nn/TorchScript notices on every model load
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes, CPU allowed (for the tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if not args.quick and not args.device.startswith("cuda"):
        parser.error("no GPU visible: run with --quick for the reduced CPU check")
    preset = QUICK if args.quick else FULL
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"# mace-ood GPU check: {name}, torch {torch.__version__}, {'quick' if args.quick else 'full'}\n")
    with tempfile.TemporaryDirectory(prefix="mace-ood-gpu-check-") as tmp:
        workdir = Path(tmp)
        print("## 1. Extraction\n")
        extraction_table(args.device, preset, workdir)
        print("\n## 2. Out of memory: back-off to domains\n")
        print("\n".join(oom_check(args.device, args.quick, workdir)))
        print("\n## 3. Scoring\n")
        print("\n".join(scoring_table(args.device, preset)))
        print("\n## 4. cuEquivariance\n")
        print("\n".join(cueq_check(args.device, workdir)))


if __name__ == "__main__":
    main()
