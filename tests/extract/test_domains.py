"""Structures too large for the device: domains with a halo give the unsplit result."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from mace_ood.config import ExtractionSettings
from mace_ood.extract.domains import decompose
from mace_ood.extract.runner import LatentExtractor
from mace_ood.extract.stream import extract_to_netcdf
from mace_ood.testing import random_structures, save_tiny_family


@pytest.fixture(scope="module")
def short_range_model(tmp_path_factory):
    """r_max 2.6 A, 2 layers: a receptive field of 5.2 A keeps the domains small."""
    return save_tiny_family(tmp_path_factory.mktemp("short"), "short", 1, r_max=2.6)[0]


def cu_al(repeat, cubic=True, seed=1):
    atoms = bulk("Cu", "fcc", a=3.61, cubic=cubic) * repeat
    atoms.rattle(0.05, seed=seed)
    atoms.numbers[::7] = 13
    return atoms


def test_domains_cover_every_atom_once():
    atoms = cu_al((4, 4, 4))
    domains = list(decompose(atoms, (2, 2, 2), halo=5.0))
    assert len(domains) == 8
    core = np.sort(np.concatenate([d.core_in_structure for d in domains]))
    np.testing.assert_array_equal(core, np.arange(len(atoms)))
    for d in domains:
        moved = d.cluster.positions[d.core_in_cluster] - atoms.positions[d.core_in_structure]
        lattice_steps = np.linalg.solve(atoms.cell.array.T, moved.T).T  # wrapped by whole cell vectors only
        np.testing.assert_allclose(lattice_steps, np.round(lattice_steps), atol=1e-9)
        assert not d.cluster.pbc.any()


def test_2000_atoms_in_8_domains_equal_the_unsplit_latents(tiny_models):
    atoms = cu_al((8, 8, 8))  # 2048 atoms, periodic
    extractor = LatentExtractor(tiny_models["T1"][0], "cpu", "float64")
    full = extractor(atoms)
    split = extractor.outputs_by_domains(atoms, (2, 2, 2))
    assert np.abs(full - split["latent"]).max() < 1e-5


@pytest.mark.parametrize(
    "atoms",
    [
        cu_al((10, 10, 10), cubic=False),  # triclinic (primitive fcc) cell
        Atoms("Cu300", positions=np.random.default_rng(2).uniform(0, 20, (300, 3)) * [1, 1, 0.5], pbc=False),
        cu_al((6, 6, 6)).copy(),
    ],
    ids=["triclinic", "molecule-no-cell", "slab"],
)
def test_other_geometries(short_range_model, atoms):
    if len(atoms) == 864:  # make the third case a slab: periodic in x, y only
        atoms.pbc = (True, True, False)
        atoms.cell[2] *= 2.0
    extractor = LatentExtractor(short_range_model, "cpu", "float64")
    np.testing.assert_allclose(extractor.outputs_by_domains(atoms, (2, 2, 2))["latent"], extractor(atoms), atol=1e-8)


def test_forces_by_domains_use_twice_the_halo(short_range_model):
    atoms = cu_al((6, 6, 6))
    extractor = LatentExtractor(short_range_model, "cpu", "float64", compute_forces=True)
    full = extractor.outputs([extractor.graph(atoms)])[0]
    split = extractor.outputs_by_domains(atoms, (2, 1, 1))
    np.testing.assert_allclose(split["forces"], full["forces"], atol=1e-8)
    np.testing.assert_allclose(split["node_energy"], full["node_energy"], atol=1e-10)
    assert split["energy"] == pytest.approx(full["energy"], abs=1e-8)


def test_memory_budget_drives_halving_batch_one_and_domains(short_range_model, tmp_path):
    big = cu_al((8, 8, 8))  # 2048 atoms > the budget of 1500
    small = random_structures(6, seed=4, sizes=(2,))  # 32 atoms each
    data = tmp_path / "mixed.xyz"
    ase.io.write(data, small[:3] + [big] + small[3:])
    # latents only: with forces the halo doubles to 10.4 A and 1500 atoms need ~300 domains (40 s);
    # forces by domains are checked above
    settings = ExtractionSettings(device="cpu", default_dtype="float64", batch_size=8, max_atoms_per_batch=100000,
                                  chunk_atoms=256, forces=False)
    reference = extract_to_netcdf(short_range_model, [str(data)], tmp_path / "free.nc", settings)
    limited = extract_to_netcdf(short_range_model, [str(data)], tmp_path / "limited.nc", settings, max_atoms_per_forward=1500)
    assert reference.split_structures == 0 and limited.split_structures == 1
    assert limited.smallest_batch == 1
    import xarray as xr

    with xr.open_dataset(tmp_path / "free.nc") as a, xr.open_dataset(tmp_path / "limited.nc") as b:
        assert np.abs(a["latent"].values - b["latent"].values).max() < 1e-5
        np.testing.assert_array_equal(a["structure_id"].values, b["structure_id"].values)


def test_a_structure_too_large_for_any_split_is_a_clear_error(short_range_model):
    extractor = LatentExtractor(short_range_model, "cpu", "float64", max_atoms_per_forward=40)
    with pytest.raises(RuntimeError, match="does not fit even split into domains") as error:
        extractor.outputs([extractor.graph(cu_al((3, 3, 3)))], structures=[cu_al((3, 3, 3))])
    # deterministic: the Prefect retry (for out-of-memory only) must not run it again
    from mace_ood.extract.oom import is_out_of_memory

    assert not is_out_of_memory(error.value)
