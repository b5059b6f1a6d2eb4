"""Overhead of the OOD calculator per MD step, against the bare MACE calculators, same process.

Needs a finished run (default: the demo's, ``make demo``). Times ``steps`` velocity-Verlet steps
of one structure of the family's training set with (a) one bare ``MACECalculator`` (the model a
user would run anyway), (b) every seed's ``MACECalculator`` averaged (the committee alone), and
(c) ``mace_ood.OODCalculator`` (the committee plus every score and the calibrated flag). Prints
a markdown table of ms per step and the ratios.

    python benchmarks/calculator.py [--run demo_work/run] [--family MACE_T1] [--steps 30]
"""

from __future__ import annotations

import argparse
import time

import ase.io
import numpy as np
from ase import units
from ase.calculators.calculator import Calculator, all_changes
from ase.md.verlet import VelocityVerlet

import mace_ood


class Committee(Calculator):
    implemented_properties = ["energy", "forces"]

    def __init__(self, calculators) -> None:
        super().__init__()
        self.calculators = calculators

    def calculate(self, atoms=None, properties=None, system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        forces = [c.get_forces(self.atoms.copy()) for c in self.calculators]
        energies = [c.results["energy"] for c in self.calculators]
        self.results = {"energy": float(np.mean(energies)), "forces": np.mean(forces, axis=0)}


def ms_per_step(atoms, calculator, steps: int) -> float:
    atoms = atoms.copy()
    atoms.calc = calculator
    dynamics = VelocityVerlet(atoms, 1 * units.fs)
    dynamics.run(2)  # warm-up: model load, first graph
    started = time.perf_counter()
    dynamics.run(steps)
    return 1000 * (time.perf_counter() - started) / steps


def main() -> None:
    from mace.calculators import MACECalculator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo_work/run")
    parser.add_argument("--family", default="MACE_T1")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    run = mace_ood.open_run(args.run)
    models = run.models(args.family)
    training = run.scores[(run.scores.family == args.family) & run.scores.reference]
    first = training.iloc[0]
    atoms = ase.io.read(first["source_file"], index=int(first["frame_index"]))
    bare = [MACECalculator(model_paths=p, device="cpu", default_dtype=models.default_dtype) for p in models.files]
    rows = {
        "1 MACE model (bare)": ms_per_step(atoms, bare[0], args.steps),
        f"{len(bare)} MACE models, mean (committee)": ms_per_step(atoms, Committee(bare), args.steps),
        f"OODCalculator ({len(bare)} models + scores + flag)": ms_per_step(
            atoms, mace_ood.OODCalculator(run, args.family), args.steps),
    }
    base = rows["1 MACE model (bare)"]
    committee = next(v for k, v in rows.items() if "committee" in k)
    print(f"{len(atoms)} atoms, {args.steps} steps, {args.run} ({args.family})\n")
    print("| calculator | ms / step | vs 1 model | vs the committee |")
    print("|---|---|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.1f} | {value / base:.2f}x | {value / committee:.2f}x |")


if __name__ == "__main__":
    main()
