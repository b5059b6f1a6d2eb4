"""Tiny synthetic inputs shared by the tests: random-weight models, structures, configs."""

from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import yaml
from ase import Atoms

from mace_ood.extract.store import LatentWriter
from mace_ood.testing import random_structures, save_tiny_family, write_dataset


def make_project(root: Path, n_seeds: int = 3) -> Path:
    """Two datasets (T1: Cu/Al bulk; T2: larger cells, a CIF) and two model families; returns the config."""
    save_tiny_family(root / "models", "T1", n_seeds, first_seed=0)
    save_tiny_family(root / "models", "T2", n_seeds, first_seed=100)
    write_dataset(root / "data" / "T1", "md_CuAl_T300K", random_structures(6, seed=1))
    write_dataset(root / "data" / "T1", "relaxed_Cu4", random_structures(1, seed=2, sizes=(1,)))
    write_dataset(root / "data" / "T2", "slab_CuAl_T600K", random_structures(4, seed=3, sizes=(2, 1)))
    ase.io.write(root / "data" / "T2" / "cellrelaxed_Al4.cif", random_structures(1, seed=4, sizes=(1,))[0])
    ase.io.write(root / "data" / "T2" / "iron_Fe2.xyz", Atoms("Fe2", positions=[[0, 0, 0], [1.4, 1.4, 1.4]], cell=[2.8] * 3, pbc=True))
    config = {
        "output_dir": "run",
        "device": "cpu",
        "default_dtype": "float64",
        "batch_size": 3,
        "chunk_atoms": 64,
        "datasets": {"T1": ["data/T1/*.xyz"], "T2": ["data/T2/*.xyz", "data/T2/*.cif"]},
        "model_families": {
            "MACE_T1": {"trained_on": "T1", "models": ["models/T1_seed*.model"]},
            "MACE_T2": {"trained_on": "T2", "models": ["models/T2_seed*.model"]},
        },
        "reference": True,
        "select": {"top_k": 3},
        "dask": {"n_workers": 1},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def synthetic_latent_files(
    directory: Path, n_seeds: int = 3, sizes: tuple[int, ...] = (5, 1, 17, 40, 3, 64), n_features: int = 6,
    chunk_atoms: int = 16, seed: int = 0,
) -> tuple[list[Path], np.ndarray, list[int]]:
    """Seed files with random latents; returns paths, the (seed, atom, feature) array, sizes."""
    rng = np.random.default_rng(seed)
    n_atoms = sum(sizes)
    latents = rng.standard_normal((n_seeds, n_atoms, n_features)) * rng.uniform(0.1, 2, (1, n_atoms, 1))
    paths = []
    for s in range(n_seeds):
        path = directory / f"seed-{s}.nc"
        with LatentWriter(path, n_features, "float64", {"seed": s}, chunk_atoms=chunk_atoms) as writer:
            start = 0
            for i, size in enumerate(sizes):
                writer.append(f"s{i}", "synthetic.xyz", i, latents[s, start : start + size], formula=f"Cu{size}")
                start += size
        paths.append(path)
    return paths, latents, list(sizes)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_busy_project(root: Path, n_families: int = 3, n_structures: int = 20, n_seeds: int = 2) -> Path:
    """Several families, each trained on its own dataset, every family scoring every dataset:
    with 64-atom chunks, many reference fits and scorings read netCDF at the same time."""
    datasets, families = {}, {}
    for k in range(n_families):
        save_tiny_family(root / "models", f"F{k}", n_seeds, first_seed=10 * k, channels=8, max_l=0)
        write_dataset(root / "data" / f"D{k}", f"md_CuAl_T{300 + 100 * k}K",
                      random_structures(n_structures, seed=k, sizes=(2,)))
        datasets[f"D{k}"] = [f"data/D{k}/*.xyz"]
        families[f"MACE_F{k}"] = {"trained_on": f"D{k}", "models": [f"models/F{k}_seed*.model"]}
    config = {
        "output_dir": "run", "device": "cpu", "default_dtype": "float64", "batch_size": 8, "chunk_atoms": 64,
        "datasets": datasets, "model_families": families, "reference": True, "select": {"top_k": 3},
        "dask": {"n_workers": 2},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
