"""Does ``llpr_energy_std`` bound the energy error? Per family and dataset of a finished run.

    .venv/bin/python benchmarks/llpr_coverage.py demo_work/run [--energy-key REF_energy] [--z 1.645]

For every scored structure with a reference energy: |E - E_ref| <= z * llpr_energy_std, with E the
family's (seed-mean) energy from the latent files (needs ``forces: true``); a training set counts
its held-out calibration structures only. Prints a markdown table and each family's alpha.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import netCDF4
import numpy as np
import xarray as xr

from mace_ood.score.llpr import reference_energies
from mace_ood.score.reference import FamilyReference, llpr_calibration_folds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--energy-key", default="REF_energy")
    parser.add_argument("--z", type=float, default=1.645, help="1.645: the two-sided 90 %% of a Gaussian")
    args = parser.parse_args()
    print(f"| evaluation | alpha | calibrated on | within {args.z} std | median abs error (eV) | median std (eV) |")
    print("|---|---|---|---|---|---|")
    for path in sorted((args.run_dir / "scores").glob("*.nc")):
        family, dataset = path.stem.split("__")
        reference = FamilyReference.load(args.run_dir / "reference" / f"{family}.pkl")
        if not reference.llpr:
            continue
        with xr.open_dataset(path) as ds:
            if "llpr_energy_std" not in ds:
                continue
            std = ds["llpr_energy_std"].values
            ids = ds["structure_id"].values.astype(str)
            sources, frames = ds["source_file"].values.astype(str), ds["frame_index"].values
            seed_files = json.loads(ds.attrs["seed_files"])
        with_energy = [netCDF4.Dataset(p) for p in seed_files]
        try:
            if any("energy" not in f.variables for f in with_energy):
                continue
            energy = np.mean([np.asarray(f["energy"][:]) for f in with_energy], axis=0)
        finally:
            for f in with_energy:
                f.close()
        truth = reference_energies(sources, frames, np.arange(len(ids)), args.energy_key)
        keep = np.isfinite(truth)
        if path.stem.endswith(f"__{_trained_on(args.run_dir, family)}"):
            # LLPR is fitted on the training runs outside its calibration folds: only theirs are new to it
            first = llpr_calibration_folds(len(reference.folds))
            keep &= np.array([reference.structure_fold.get(i, 0) < first for i in ids]) if reference.folds else False
        if not keep.any():
            continue
        error = np.abs(energy - truth)[keep]
        covered = int((error <= args.z * std[keep]).sum())
        alphas = ", ".join(f"{s.alpha:.2f}" for s in reference.llpr)
        print(f"| {family} on {dataset} | {alphas} | {reference.llpr[0].calibrated_on} | {covered} of {keep.sum()} "
              f"({covered / keep.sum():.0%}) | {np.median(error):.3f} | {np.median(std[keep]):.3f} |")


def _trained_on(run_dir: Path, family: str) -> str:
    config = json.loads((run_dir / "run_config.json").read_text())
    return config["model_families"][family]["trained_on"]


if __name__ == "__main__":
    main()
