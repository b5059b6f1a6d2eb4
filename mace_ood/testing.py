"""Tiny random-weight MACE models and synthetic structures, for tests and benchmarks.

Nothing here downloads anything: models are built with ``mace.modules.ScaleShiftMACE``
and saved the way ``mace_run_train`` saves them (a pickled module).
"""

from __future__ import annotations

from pathlib import Path

import ase.data
import ase.io
import numpy as np
import torch
from ase import Atoms
from ase.build import bulk


def build_tiny_mace(
    seed: int,
    atomic_numbers: tuple[int, ...] = (13, 29),
    channels: int = 8,
    max_l: int = 1,
    num_interactions: int = 2,
    r_max: float = 4.0,
    dtype: torch.dtype = torch.float64,
    heads: list[str] | None = None,
    correlation: int = 2,
) -> torch.nn.Module:
    """A ScaleShiftMACE with random weights (seeded), as a trained model would be saved;
    with ``heads``, a multi-head model (as mace's fine-tuning with replay saves one)."""
    import mace  # noqa: F401  (mace makes e3nn's constants loadable under torch>=2.6)
    from e3nn import o3
    from mace import modules

    torch.manual_seed(seed)
    hidden = f"{channels}x0e" + (f"+{channels}x1o" if max_l >= 1 else "")
    interaction = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=r_max,
        num_bessel=6,
        num_polynomial_cutoff=5,
        max_ell=2,
        interaction_cls=interaction,
        interaction_cls_first=interaction,
        num_interactions=num_interactions,
        num_elements=len(atomic_numbers),
        hidden_irreps=o3.Irreps(hidden),
        MLP_irreps=o3.Irreps("8x0e"),
        atomic_energies=(
            np.linspace(-1.0, -2.0, len(atomic_numbers)) if not heads
            else np.stack([np.linspace(-1.0, -2.0, len(atomic_numbers)) * (1 + h) for h in range(len(heads))])
        ),
        avg_num_neighbors=10.0,
        atomic_numbers=list(atomic_numbers),
        correlation=correlation,
        gate=torch.nn.functional.silu,
        atomic_inter_scale=[1.0 + h for h in range(len(heads))] if heads else 1.0,
        atomic_inter_shift=[0.1 * h for h in range(len(heads))] if heads else 0.0,
        **({"heads": list(heads)} if heads else {}),
    )
    return model.to(dtype)


def save_tiny_family(
    directory: str | Path, name: str, n_seeds: int = 3, first_seed: int = 0, **kwargs
) -> list[Path]:
    """Save ``n_seeds`` tiny models as ``<name>_seed<k>.model``; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_seeds):
        path = directory / f"{name}_seed{k}.model"
        torch.save(build_tiny_mace(first_seed + k, **kwargs), path)
        paths.append(path)
    return paths


def random_structures(
    n: int, seed: int = 0, symbols: tuple[str, ...] = ("Cu", "Al"), sizes: tuple[int, ...] = (1, 2)
) -> list[Atoms]:
    """Rattled fcc cells of varying size and composition (periodic)."""
    rng = np.random.default_rng(seed)
    structures = []
    for i in range(n):
        repeat = int(sizes[i % len(sizes)])
        atoms = bulk("Cu", "fcc", a=3.6 + 0.1 * rng.standard_normal(), cubic=True) * (repeat, repeat, repeat)
        numbers = rng.choice([ase.data.atomic_numbers[s] for s in symbols], size=len(atoms))
        atoms.set_atomic_numbers(numbers)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        structures.append(atoms)
    return structures


def write_dataset(directory: str | Path, stem: str, structures: list[Atoms], fmt: str = "extxyz") -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.{'xyz' if fmt == 'extxyz' else fmt}"
    ase.io.write(path, structures, format=fmt)
    return path

