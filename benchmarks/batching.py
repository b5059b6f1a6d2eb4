"""Batching by atom budget against a fixed structure count: mace-ood's own extraction, both ways, in
one process, the repeats interleaved.

    .venv/bin/python benchmarks/batching.py [--sizes 32 256] [--repeats 5] [--device cpu|cuda]

"default": ``batch_size`` unset, a pass holds what ``max_atoms_per_batch`` (4096 atoms) allows;
"count 16": ``batch_size: 16`` with the same budget (the default before 2026-12-07). The table gives
each one's atoms/s (median) and the median of the per-repeat ratios default / count 16, with their
range, latents only and forces on.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mace_ood.runtime import apply_environment_defaults

apply_environment_defaults()  # before torch starts OpenMP

import ase.io  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from extraction import SIZES, mace_ood, ratio, structures  # noqa: E402

from mace_ood.testing import build_tiny_mace  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--atoms-per-size", type=int, default=16000)
    parser.add_argument("--count", type=int, default=16, help="the fixed structure count compared")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256], choices=list(SIZES))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mace-ood-batching-"))
    model_path = workdir / "model.model"
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    torch.save(build_tiny_mace(0, atomic_numbers=(29,), channels=16, max_l=0, dtype=dtype), model_path)
    print(f"# batching: {args.device}, {args.dtype}, torch threads {torch.get_num_threads()}, C=16 L=0, "
          f"median of {args.repeats} interleaved repeats (range)\n")
    print(f"| atoms/structure | structures | mode | count {args.count} (atoms/s) | default (atoms/s) | default / count {args.count} |")
    print("|---|---|---|---|---|---|")
    for n_atoms in args.sizes:
        count = max(2, args.atoms_per_size // n_atoms)
        data = workdir / f"s{n_atoms}.xyz"
        ase.io.write(data, structures(n_atoms, count))
        total = n_atoms * count
        for mode, forces in (("latents only", False), ("forces on", True)):
            fixed, budget = [], []
            for _ in range(args.repeats):
                fixed.append(total / mace_ood(model_path, data, args.device, args.dtype, args.count, workdir, forces,
                                              max_atoms=None)[0])
                budget.append(total / mace_ood(model_path, data, args.device, args.dtype, None, workdir, forces)[0])
            ratios = [b / f for b, f in zip(budget, fixed, strict=True)]
            print(f"| {n_atoms} | {count} | {mode} | {np.median(fixed):,.0f} | {np.median(budget):,.0f} | "
                  f"{ratio(ratios)} |", flush=True)


if __name__ == "__main__":
    main()
