from __future__ import annotations

import ase.io
import numpy as np
import pytest
from ase.build import bulk

from mace_ood.config import ExtractionSettings
from mace_ood.extract.models import (
    ModelError,
    check_family,
    describe_model,
    invariant_columns,
    load_model,
)
from mace_ood.extract.runner import LatentExtractor
from mace_ood.extract.store import read_structure_table
from mace_ood.extract.stream import extract_to_netcdf
from mace_ood.testing import random_structures


@pytest.fixture(scope="module")
def structures():
    return random_structures(5, seed=7, sizes=(1, 2))


@pytest.mark.parametrize("layers", ["last", "all"])
def test_latents_equal_mace_get_descriptors(tiny_models, structures, layers):
    from mace.calculators import MACECalculator

    model_path = tiny_models["T1"][0]
    calculator = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64")
    extractor = LatentExtractor(model_path, "cpu", "float64", layers=layers)
    n_per_layer = extractor.n_features if layers == "last" else extractor.n_features // 2
    for atoms in structures:
        reference = calculator.get_descriptors(atoms, invariants_only=True, num_layers=-1)
        if layers == "last":
            reference = reference[:, -n_per_layer:]
        ours = extractor(atoms)
        assert ours.shape == reference.shape
        assert np.abs(ours - reference).max() < 1e-6


def test_batching_does_not_change_latents(tiny_models, structures):
    extractor = LatentExtractor(tiny_models["T1"][1], "cpu", "float64")
    graphs = [extractor.graph(a) for a in structures]
    batched = extractor.latents(graphs)
    for atoms, latents in zip(structures, batched, strict=True):
        np.testing.assert_allclose(latents, extractor(atoms), atol=1e-12)


def test_out_of_memory_splits_batches_down_to_one(tiny_models, structures):
    graphs_ref = LatentExtractor(tiny_models["T1"][0], "cpu", "float64")
    expected = graphs_ref.latents([graphs_ref.graph(a) for a in structures])
    # budget of one 32-atom structure: every multi-structure batch with a large cell must split
    limited = LatentExtractor(tiny_models["T1"][0], "cpu", "float64", max_atoms_per_forward=32)
    sizes = []
    result = limited.latents([limited.graph(a) for a in structures], on_backoff=sizes.append)
    assert sizes and min(sizes) == 1
    for a, b in zip(expected, result, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-12)


def test_out_of_memory_on_a_single_structure_is_raised(tiny_models):
    limited = LatentExtractor(tiny_models["T1"][0], "cpu", "float64", max_atoms_per_forward=8)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    with pytest.raises(RuntimeError, match="out of memory"):
        limited(atoms)


def test_float32_latents_are_float32_and_close(tiny_models, structures):
    e64 = LatentExtractor(tiny_models["T1"][0], "cpu", "float64")
    e32 = LatentExtractor(tiny_models["T1"][0], "cpu", "float32")
    a = structures[1]
    assert e32(a).dtype == np.float32
    np.testing.assert_allclose(e32(a), e64(a), atol=1e-4)


def test_extract_to_netcdf_streams_skips_and_reuses(tiny_models, tmp_path):
    good = random_structures(7, seed=3)
    bad = bulk("Fe", "bcc", a=2.87) * (2, 1, 1)  # Fe: not in the model's elements
    path = tmp_path / "mixed.xyz"
    ase.io.write(path, good[:3] + [bad] + good[3:], format="extxyz")
    settings = ExtractionSettings(device="cpu", default_dtype="float64", batch_size=2, chunk_atoms=64)
    out = tmp_path / "lat" / "seed-0.nc"
    summary = extract_to_netcdf(tiny_models["T1"][0], [str(path)], out, settings)
    assert out.is_file() and not (tmp_path / "lat" / "seed-0.nc.partial").exists()
    assert summary.n_structures == 7 and len(summary.skipped) == 1
    assert summary.skipped[0]["structure_id"] == "mixed@3"
    assert "Fe" in summary.skipped[0]["reason"]
    table = read_structure_table(out)
    assert list(table["structure_id"]) == [f"mixed@{i}" for i in (0, 1, 2, 4, 5, 6, 7)]
    assert table["atom_offset"][-1] + table["n_atoms"][-1] == summary.n_atoms
    again = extract_to_netcdf(tiny_models["T1"][0], [str(path)], out, settings)
    assert again.reused and again.forward_passes == 0
    changed = extract_to_netcdf(tiny_models["T1"][0], [str(path)], out, settings.model_copy(update={"layers": "all"}))
    assert not changed.reused and changed.forward_passes > 0


def test_family_checks(tiny_models, tmp_path):
    from mace_ood.testing import save_tiny_family

    infos = [describe_model(p) for p in tiny_models["T1"]]
    check_family("ok", infos)
    assert infos[0].latent_width == len(invariant_columns(load_model(tiny_models["T1"][0])))
    check_family("one", infos[:1])  # a family of one model (a fine-tuned model) is a family
    other = save_tiny_family(tmp_path, "wide", 1, channels=4)
    with pytest.raises(ModelError, match="latent_width"):
        check_family("mixed", infos[:1] + [describe_model(other[0])])
    junk = tmp_path / "junk.model"
    junk.write_text("not a model")
    with pytest.raises(ModelError, match="junk.model"):
        load_model(junk)


def test_forces_from_the_same_pass_equal_mace_calculator(tiny_models, structures, tmp_path):
    from mace.calculators import MACECalculator

    model_path = tiny_models["T1"][2]
    calculator = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64")
    extractor = LatentExtractor(model_path, "cpu", "float64", compute_forces=True)
    outputs = extractor.outputs([extractor.graph(a) for a in structures])
    for atoms, item in zip(structures, outputs, strict=True):
        atoms = atoms.copy()
        atoms.calc = calculator
        np.testing.assert_allclose(item["forces"], atoms.get_forces(), atol=1e-8)
        assert item["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
        assert item["node_energy"].sum() == pytest.approx(item["energy"], abs=1e-8)
        np.testing.assert_allclose(item["latent"], extractor(atoms), atol=1e-12)
    path = tmp_path / "s.xyz"
    ase.io.write(path, structures)
    settings = ExtractionSettings(device="cpu", forces=True, chunk_atoms=64, batch_size=2)
    out = tmp_path / "f.nc"
    extract_to_netcdf(model_path, [str(path)], out, settings)
    import xarray as xr

    with xr.open_dataset(out) as ds:
        # extxyz stores positions to ~1e-8 A, hence the tolerance
        np.testing.assert_allclose(ds["forces"].values, np.concatenate([o["forces"] for o in outputs]), atol=1e-6)
        np.testing.assert_allclose(ds["energy"].values, [o["energy"] for o in outputs], atol=1e-6)
