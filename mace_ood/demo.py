"""The demo: two EMT-labelled Cu datasets, 4 tiny MACE seeds trained on each, a config.

T1 is bulk fcc Cu MD at 300 K with small strains (what a typical training set looks
like); T2 holds what T1 never saw: hot MD at 1200 K, a vacancy, a (111) slab, a
compressed cell. Models are trained with mace's own ``mace_run_train`` (tiny
ScaleShiftMACE, 16x0e, 2 layers) and cached by the content of their training data and
settings, so only the first demo pays for training.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms, units
from ase.build import bulk, fcc111
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from mace_ood.emt import VectorEMT
from mace_ood.files import atomic_path

N_SEEDS = 4
FRAMES_PER_TRAJECTORY = 30
TEST_FRAMES = 10  # per T1 trajectory, for the in-distribution test set
STEPS_BETWEEN_FRAMES = 10
TRAIN_ARGS = (
    "--model=ScaleShiftMACE", "--num_channels=16", "--max_L=0", "--num_interactions=2",
    "--correlation=3", "--r_max=4.0", "--batch_size=8", "--max_num_epochs=20", "--lr=0.01",
    "--energy_weight=10", "--forces_weight=100", "--E0s=average", "--energy_key=REF_energy",
    "--forces_key=REF_forces", "--default_dtype=float32", "--device=cpu", "--save_cpu",
    "--valid_fraction=0.1", "--eval_interval=5",
)


def _labelled(atoms: Atoms) -> Atoms:
    """A copy with EMT energy and forces stored as REF_energy / REF_forces (no calculator).

    An MD frame keeps its calculator: EMT already has this geometry's results (a fresh EMT
    gives the same to 1e-13 eV, at the cost of a new neighbour list)."""
    if not isinstance(atoms.calc, VectorEMT):
        atoms = atoms.copy()
        atoms.calc = VectorEMT()
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    atoms = atoms.copy()
    atoms.info["REF_energy"] = float(energy)
    atoms.arrays["REF_forces"] = forces
    return atoms


def md_frames(atoms: Atoms, temperature_K: float, seed: int, n_frames: int = FRAMES_PER_TRAJECTORY) -> list[Atoms]:
    """Langevin MD with EMT (ASE's, vectorised: :mod:`mace_ood.emt`); every STEPS_BETWEEN_FRAMES-th
    step is kept, labelled."""
    atoms = atoms.copy()
    atoms.calc = VectorEMT()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    dynamics = Langevin(atoms, 4 * units.fs, temperature_K=temperature_K, friction=0.02, fixcm=False, rng=rng)
    frames = []
    for index in range(n_frames):
        dynamics.run(STEPS_BETWEEN_FRAMES)
        frame = _labelled(atoms)
        frame.info["temperature_K"] = temperature_K
        frame.info["step"] = (index + 1) * STEPS_BETWEEN_FRAMES
        frames.append(frame)
    return frames


def _strained(atoms: Atoms, strain: float) -> Atoms:
    atoms = atoms.copy()
    atoms.set_cell(atoms.cell * (1 + strain), scale_atoms=True)
    return atoms


def make_datasets(data_dir: Path) -> dict[str, list[Path]]:
    """Write the T1, T1_test, T1_valid and T2 files (extxyz + a few CIF/POSCAR); returns dataset -> files.

    T1_test is drawn like T1 (same strains and temperature, other MD seeds) and never trained
    on: the honest in-distribution class of `mace-ood evaluate`. T1_valid, drawn alike (6 runs),
    is where the predicted force error is fitted, so T1_test measures its coverage.
    """
    cu = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
    t1, t1_test, t1_valid, t2 = data_dir / "T1", data_dir / "T1_test", data_dir / "T1_valid", data_dir / "T2"
    for folder in (t1, t1_test, t1_valid, t2):
        folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {"T1": [], "T1_test": [], "T1_valid": [], "T2": []}
    for seed, strain in enumerate((-0.01, 0.0, 0.01)):
        label = f"{round(strain * 100):+d}pct"
        path = t1 / f"md_Cu32_T300K_strain{label}.extxyz"
        ase.io.write(path, md_frames(_strained(cu, strain), 300, seed=seed), format="extxyz")
        files["T1"].append(path)
        path = t1_test / f"md_Cu32_T300K_strain{label}_test.extxyz"
        ase.io.write(path, md_frames(_strained(cu, strain), 300, seed=20 + seed, n_frames=TEST_FRAMES), format="extxyz")
        files["T1_test"].append(path)
        for run in range(2):  # 6 validation runs, two per strain: what the force-error bound is calibrated over
            path = t1_valid / f"md_Cu32_T300K_strain{label}_valid{run}.extxyz"
            ase.io.write(path, md_frames(_strained(cu, strain), 300, seed=40 + 2 * seed + run, n_frames=TEST_FRAMES),
                         format="extxyz")
            files["T1_valid"].append(path)
    vacancy = cu.copy()
    del vacancy[0]
    slab = fcc111("Cu", size=(3, 3, 4), a=3.61, vacuum=7.0, periodic=True)
    slab.info.clear()
    t2_sets = {
        "md_Cu32_T1200K.extxyz": md_frames(cu, 1200, seed=10),
        "vacancy_Cu31_T600K.extxyz": md_frames(vacancy, 600, seed=11),
        "slab_Cu36_111_T300K.extxyz": md_frames(slab, 300, seed=12),
        "md_Cu32_T300K_strain-4pct.extxyz": md_frames(_strained(cu, -0.04), 300, seed=13),
    }
    for name, frames in t2_sets.items():
        ase.io.write(t2 / name, frames, format="extxyz")
        files["T2"].append(t2 / name)
    relaxed = _labelled(_strained(cu, 0.03))
    ase.io.write(t2 / "cellrelaxed_Cu32_strain+3pct.cif", relaxed, format="cif")
    ase.io.write(t2 / "unrelaxed_Cu31_vacancy.vasp", _labelled(vacancy), format="vasp")
    files["T2"] += [t2 / "cellrelaxed_Cu32_strain+3pct.cif", t2 / "unrelaxed_Cu31_vacancy.vasp"]
    return files


def training_key(train_file: Path) -> str:
    import mace

    digest = hashlib.sha256(train_file.read_bytes())
    digest.update(" ".join(TRAIN_ARGS).encode())
    digest.update(str(getattr(mace, "__version__", "")).encode())
    return digest.hexdigest()[:16]


def train_model(train_file: Path, seed: int, out_path: Path, log_path: Path) -> Path:
    """Train one tiny MACE with mace's own training code; writes ``out_path`` atomically."""
    with tempfile.TemporaryDirectory(prefix="mace-ood-train-") as work:
        name = f"seed{seed}"
        command = [
            sys.executable, "-m", "mace.cli.run_train", f"--name={name}",
            f"--train_file={train_file}", f"--seed={seed}", f"--work_dir={work}", *TRAIN_ARGS,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the CLI's process has mace-ood's defaults
        with open(log_path, "w") as log:
            result = subprocess.run(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        model = Path(work) / f"{name}.model"
        if result.returncode != 0 or not model.is_file():
            raise RuntimeError(f"mace_run_train failed for {train_file.name} seed {seed}; see {log_path}")
        with atomic_path(out_path) as tmp:
            shutil.copyfile(model, tmp)
    return out_path


def train_family(
    name: str, train_file: Path, cache_dir: Path, retrain: bool, echo: Callable[[str], None]
) -> list[Path]:
    """Train (or reuse) N_SEEDS models on ``train_file``, two at a time (one per core)."""
    family_dir = cache_dir / f"{name}-{training_key(train_file)}"
    family_dir.mkdir(parents=True, exist_ok=True)
    paths = [family_dir / f"{name}_seed{seed}.model" for seed in range(N_SEEDS)]
    todo = [(seed, path) for seed, path in enumerate(paths) if retrain or not path.is_file()]
    if not todo:
        echo(f"{name}: {N_SEEDS} cached models in {family_dir}")
        return paths
    echo(f"{name}: training {len(todo)} tiny MACE model(s) with mace_run_train (about 1-2 min each, 2 at a time)...")
    started = time.perf_counter()
    workers = max(1, min(len(todo), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(train_model, train_file, seed, path, family_dir / f"train_seed{seed}.log")
            for seed, path in todo
        ]
        for future in futures:
            echo(f"  trained {future.result().name}")
    echo(f"{name}: trained in {time.perf_counter() - started:.0f} s")
    return paths


def write_config(workdir: Path, models: dict[str, list[Path]]) -> Path:
    config = f"""# mace-ood demo config (written by `mace-ood demo`)
output_dir: run
device: auto
default_dtype: float64
max_atoms_per_batch: 4096 # atoms per forward pass: small structures share one
forces: true              # store each seed's forces too: force-deviation scores and `mace-ood evaluate`
datasets:
  T1: ["data/T1/*.extxyz"]
  T1_test: ["data/T1_test/*.extxyz"]   # drawn like T1, never trained on
  T1_valid: ["data/T1_valid/*.extxyz"] # drawn like T1 too: the force-error model is fitted there
  T2: ["data/T2/*.extxyz", "data/T2/*.cif", "data/T2/*.vasp"]
model_families:
  MACE_T1:
    trained_on: T1
    models: [{", ".join(f'"{p}"' for p in models["T1"])}]
    validation: T1_valid    # labelled, never trained on: the predicted force error in eV/A is fitted there
  MACE_T2:
    trained_on: T2
    models: [{", ".join(f'"{p}"' for p in models["T2"])}]
  MACE_T1_1model:         # one of MACE_T1's seeds alone: a family of one model, as a fine-tuned model is
    trained_on: T1
    models: ["{models["T1"][0]}"]
    validation: T1_valid
evaluations:              # T2's MD contains 300 K bulk: T1 is not new to MACE_T2
  - {{family: MACE_T1, dataset: T2}}
  - {{family: MACE_T1, dataset: T1_test}}
  - {{family: MACE_T2, dataset: T1}}
  - {{family: MACE_T1_1model, dataset: T2}}
  - {{family: MACE_T1_1model, dataset: T1_test}}
ood_labels: {{T1_test: false, T1_valid: false}}
reference: true
select: {{top_k: 30, alpha: 0.01}}
metadata: {{patterns: ['strain(?P<strain_pct>[+-]?\\d+)pct']}}
dask: {{}}                  # local cluster: one worker per GPU, else min(4, cores)
"""
    path = workdir / "config.yaml"
    path.write_text(config)
    return path


def prepare_demo(
    workdir: str | Path,
    cache_dir: str | Path | None = None,
    retrain: bool = False,
    echo: Callable[[str], None] = print,
) -> Path:
    """Make the data, train or reuse the models, write the config; returns the config path."""
    workdir = Path(workdir).resolve()
    cache_dir = Path(cache_dir or os.environ.get("MACE_OOD_CACHE", Path.home() / ".cache" / "mace-ood")) / "demo"
    files = make_datasets(workdir / "data")
    echo("datasets: " + ", ".join(f"{name} {len(paths)} files" for name, paths in files.items())
         + f" in {workdir / 'data'}")
    models = {}
    for name in ("T1", "T2"):
        train_file = workdir / "data" / f"train_{name}.extxyz"
        frames = [atoms for path in files[name] if path.suffix == ".extxyz" for atoms in ase.io.read(path, index=":")]
        ase.io.write(train_file, frames, format="extxyz")
        models[name] = train_family(name, train_file, cache_dir, retrain, echo)
    return write_config(workdir, models)
