"""Calibrate + select + report on a synthetic run of ten million atoms, each step timed with its peak RSS.

    .venv/bin/python benchmarks/select_at_scale.py [--structures 300000] [--training 300000] [--top-k 1000]

Writes a run directory as a finished `mace-ood run` leaves it before its select stage: the
scores files of one family on its own training set and on a new dataset (every per-atom and
per-structure score of the default config, forces on, and the F-channel descriptor), seed 0's
latent files (read by the report's PCA plot and chemiscope file) and the structure files (one
100-frame extxyz template of 20-46 atoms a frame, linked under 3,000 MD-run names per dataset:
each file one run, the training set scored out of fold in 10 folds of runs). About 10 % of the new structures are shifted
out of distribution. Then each step runs in a fresh process (peak RSS is the process's own):

1. select on the family's training set (its calibration, rank and top K);
2. select on the new dataset: calibrate against every training structure and atom, scored out
   of fold (size-aware `mahalanobis_max`; each run counted once), flag, rank, diverse selection of
   K against every training structure's descriptor;
3. report: scores.csv, the K picks as CIF/extxyz, report.xlsx, plots, chemiscope.

Prints a markdown table. Set-up (writing the files) is not timed.
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

from mace_ood.runtime import apply_environment_defaults

FRAMES_PER_FILE = 100
CHANNELS = 64
BLOCK = 1_000_000


def template_sizes(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(20, 47, FRAMES_PER_FILE)


def write_template(path: Path) -> list[str]:
    """One MD-like extxyz file of FRAMES_PER_FILE frames; returns each frame's formula."""
    import ase.io
    from ase import Atoms

    rng = np.random.default_rng(1)
    frames = []
    for n in template_sizes():
        cell = np.eye(3) * (11.8 * n) ** (1 / 3)
        symbols = rng.choice(["Cu", "Au"], n)
        frames.append(Atoms(symbols, positions=rng.random((n, 3)) @ cell, cell=cell, pbc=True))
    ase.io.write(path, frames, format="extxyz")
    return [a.get_chemical_formula() for a in frames]


def write_dataset(root: Path, name: str, n_structures: int, template: Path, formulas: list[str], training: bool,
                  seed: int) -> tuple[Path, Path]:
    """Scores file and seed-0 latent file of ``n_structures`` structures; returns their paths."""
    import netCDF4
    import xarray as xr

    from mace_ood.extract.store import STRUCTURE_FIELDS  # noqa: F401 - the names written below
    from mace_ood.paths import RunPaths, evaluation_label

    rng = np.random.default_rng(seed)
    n_files = -(-n_structures // FRAMES_PER_FILE)
    data = root / "data" / name
    data.mkdir(parents=True, exist_ok=True)
    for k in range(n_files):
        link = data / f"md_CuAu_{name}{k:05d}.extxyz"
        if not link.exists():
            link.symlink_to(template)
    frame = np.arange(n_structures) % FRAMES_PER_FILE
    source = np.array([str(data / f"md_CuAu_{name}{k:05d}.extxyz") for k in np.arange(n_structures) // FRAMES_PER_FILE])
    counts = template_sizes()[frame].astype(np.int32)
    offsets = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
    n_atoms = int(counts.sum())
    shifted = np.zeros(n_structures, dtype=bool) if training else rng.random(n_structures) < 0.1
    ids = np.array([f"md_CuAu_{name}{k:05d}@{f}" for k, f in zip(np.arange(n_structures) // FRAMES_PER_FILE, frame,
                                                               strict=True)])
    structure = {
        "structure_id": ids, "source_file": source, "formula": np.array(formulas)[frame],
        "info_json": np.full(n_structures, "{}"), "structure_hash": np.full(n_structures, ""),
        "frame_index": frame.astype(np.int32), "atom_offset": offsets, "n_atoms": counts,
    }
    centres = rng.normal(size=(50, CHANNELS))
    descriptor = centres[rng.integers(0, 50, n_structures)] + 0.3 * rng.normal(size=(n_structures, CHANNELS))
    descriptor[shifted] += 2.0
    ds = xr.Dataset({name: ("structure", values) for name, values in structure.items()})
    ds["descriptor"] = (("structure", "descriptor_feature"), descriptor)
    if training:  # every training structure scored out of fold; each 100-frame file one MD run, 10 folds of runs
        run = np.arange(n_structures) // FRAMES_PER_FILE
        ds["split"] = ("structure", np.full(n_structures, "out-of-fold", dtype=object))
        ds["group"] = ("structure", np.array([f"run{r}" for r in run], dtype=object))
        ds["fold"] = ("structure", (run % 10).astype(np.int64))
    shift_of_atom = np.repeat(shifted, counts)
    per_atom_names = ["latent_variance", "aligned_latent_variance", "mahalanobis", "knn_distance", "gmm_nll",
                      "force_deviation", "energy_std_per_atom"]
    label = evaluation_label("F", name)
    path = RunPaths(root).scores(label)
    path.parent.mkdir(parents=True, exist_ok=True)
    for score in per_atom_names:
        values = rng.gamma(4.0, 0.25, n_atoms) * np.where(shift_of_atom, 3.0, 1.0)
        key = "force_deviation_mean" if score == "force_deviation" else score
        ds[key] = ("structure", np.add.reduceat(values, offsets) / counts)
        if score != "energy_std_per_atom":
            ds[f"{score}_max"] = ("structure", np.maximum.reduceat(values, offsets))
        np.save(root / f".{label}.{score}.npy", values)
    ds.attrs.update({"family": "F", "dataset": name, "reference": int(training),
                     "seed_files": json.dumps([str(RunPaths(root).latent("F", name, 0))])})
    ds.to_netcdf(path, engine="netcdf4")
    with netCDF4.Dataset(path, "a") as nc:
        nc.createDimension("atom", n_atoms)
        for score in per_atom_names:
            variable = nc.createVariable(f"atom_{score}", "f8", ("atom",))
            values = np.load(root / f".{label}.{score}.npy", mmap_mode="r")
            for start in range(0, n_atoms, BLOCK):
                variable[start : start + BLOCK] = values[start : start + BLOCK]
            (root / f".{label}.{score}.npy").unlink()
    latents = RunPaths(root).latent("F", name, 0)
    latents.parent.mkdir(parents=True, exist_ok=True)
    with netCDF4.Dataset(latents, "w") as nc:
        nc.createDimension("atom", n_atoms)
        nc.createDimension("feature", CHANNELS)
        variable = nc.createVariable("latent", "f4", ("atom", "feature"), chunksizes=(16384, CHANNELS))
        for start in range(0, n_atoms, BLOCK):
            stop = min(n_atoms, start + BLOCK)
            variable[start:stop] = rng.normal(size=(stop - start, CHANNELS)).astype(np.float32)
    return path, latents


def config(root: Path, top_k: int):
    from mace_ood.config import RunConfig

    return RunConfig.model_validate({
        "output_dir": str(root), "datasets": {"train": ["data/train/*.extxyz"], "new": ["data/new/*.extxyz"]},
        "model_families": {"F": {"trained_on": "train", "models": ["F_seed0.model", "F_seed1.model"]}},
        "select": {"top_k": top_k},
    })


def evaluations(root: Path):
    from mace_ood.paths import RunPaths
    from mace_ood.records import EvaluationPlan

    own = EvaluationPlan("F", "train", True, (str(RunPaths(root).latent("F", "train", 0)),))
    new = EvaluationPlan("F", "new", False, (str(RunPaths(root).latent("F", "new", 0)),))
    return own, new


def step(name: str, root: Path, top_k: int) -> None:
    from mace_ood.report.build import build_report
    from mace_ood.select.stage import select_evaluation

    cfg = config(root, top_k)
    own, new = evaluations(root)
    if name == "select training":
        select_evaluation(own, own, root, cfg.select, cfg.scores)
    elif name == "select new":
        select_evaluation(new, own, root, cfg.select, cfg.scores)
    else:
        records = [{"label": e.label} for e in (own, new)]
        build_report(cfg, [own, new], records, [])


STEPS = ("select training", "select new", "report")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=300_000, help="new structures")
    parser.add_argument("--training", type=int, default=300_000, help="training structures")
    parser.add_argument("--top-k", type=int, default=1000)
    parser.add_argument("--dir", help="keep the synthetic run here (default: a temporary folder)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        started = time.perf_counter()
        step(args.child[0], Path(args.child[1]), int(args.child[2]))
        print(json.dumps({"wall_s": time.perf_counter() - started,
                          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        formulas = write_template(root / "template.extxyz")
        sizes = {}
        for name, n, training, seed in (("train", args.training, True, 10), ("new", args.structures, False, 20)):
            write_dataset(root, name, n, root / "template.extxyz", formulas, training, seed)
            sizes[name] = int(template_sizes()[np.arange(n) % FRAMES_PER_FILE].sum())
        print(f"new: {args.structures:,} structures, {sizes['new']:,} atoms; training: {args.training:,} structures, "
              f"{sizes['train']:,} atoms; K = {args.top_k}; descriptor {CHANNELS} channels "
              f"(set-up {time.perf_counter() - started:.0f} s); each step in a fresh process\n")
        print("| step | wall | peak RSS |")
        print("|---|---|---|")
        total = 0.0
        for name in STEPS:
            out = subprocess.run([sys.executable, __file__, "--child", name, str(root), str(args.top_k)],
                                 capture_output=True, text=True, env=apply_environment_defaults(dict(os.environ)))
            if out.returncode != 0:
                print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} | |", flush=True)
                return
            result = json.loads(out.stdout.strip().splitlines()[-1])
            total += result["wall_s"]
            print(f"| {name} | {result['wall_s']:.1f} s | {result['peak_rss_mib'] / 1024:.2f} GiB |", flush=True)
        print(f"| **calibrate + select + report** | **{total:.1f} s** | |")


if __name__ == "__main__":
    main()
