"""Bad structures are skipped with a reason naming the file; the rest of the run goes on."""

from __future__ import annotations

import ase.io
import pytest
from ase import Atoms

from mace_ood.config import ExtractionSettings
from mace_ood.extract.models import ModelError, check_family, describe_model
from mace_ood.extract.stream import extract_to_netcdf
from mace_ood.structures import InputError, iter_structures, resolve_files
from mace_ood.testing import random_structures, save_tiny_family

SETTINGS = ExtractionSettings(device="cpu", default_dtype="float64", batch_size=4, chunk_atoms=64)


@pytest.fixture
def messy(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    good = random_structures(3, seed=1)
    ase.io.write(d / "good.xyz", good)
    ase.io.write(d / "good.cif", good[0])  # same stem, other format: both kept, distinct ids
    (d / "corrupt.xyz").write_text("this is not\na structure file\n")
    (d / "empty.xyz").write_text("")
    ase.io.write(d / "iron.xyz", Atoms("Fe2", positions=[[0, 0, 0], [1.4, 1.4, 1.4]], cell=[2.8] * 3, pbc=True))
    nan = random_structures(1, seed=2, sizes=(1,))[0]
    ase.io.write(d / "nan.xyz", nan)
    text = (d / "nan.xyz").read_text().splitlines()
    parts = text[2].split()
    parts[1] = "nan"
    text[2] = " ".join(parts)
    (d / "nan.xyz").write_text("\n".join(text) + "\n")
    ase.io.write(d / "close.xyz", Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 0.05]], cell=[5] * 3, pbc=True))
    ase.io.write(d / "truncated.xyz", random_structures(2, seed=3))
    with open(d / "truncated.xyz", "a") as handle:
        handle.write("7\nbroken frame\nCu 0 0\n")
    ase.io.write(d / "x.xyz", random_structures(2, seed=4))  # ids x@0, x@1
    ase.io.write(d / "x@1.xyz", random_structures(1, seed=5)[0])  # id x@1 again
    return sorted(str(p) for p in d.iterdir())


def test_each_bad_structure_is_skipped_with_its_reason(tiny_models, messy, tmp_path):
    summary = extract_to_netcdf(tiny_models["T1"][0], messy, tmp_path / "seed-0.nc", SETTINGS)
    reasons = {s["structure_id"]: s["reason"] for s in summary.skipped}
    assert "cannot be read" in reasons["corrupt"]
    assert reasons["empty"] == "is empty"
    assert "Fe" in reasons["iron"]
    assert "NaN" in reasons["nan"]
    assert "0.050 A apart" in reasons["close"]
    assert "cannot be read" in reasons["truncated@2"]
    assert reasons["x@1"] == "duplicate structure id"
    assert all(s["source_file"].endswith(".xyz") for s in summary.skipped)
    # good.xyz (3) + good.cif (1) + truncated (2 readable frames) + x (2) = 8
    assert summary.n_structures == 8


def test_count_structures(messy):
    from mace_ood.structures import count_structures

    by_name = {p.rsplit("/", 1)[1]: p for p in messy}
    assert count_structures([by_name["good.xyz"], by_name["good.cif"], by_name["x.xyz"]]) == 3 + 1 + 2
    assert count_structures([by_name["corrupt.xyz"], by_name["empty.xyz"]]) == 0


def test_iter_structures_raises_without_a_handler(messy):
    corrupt = [p for p in messy if p.endswith("corrupt.xyz")]
    with pytest.raises(InputError, match="corrupt.xyz: cannot be read"):
        list(iter_structures(corrupt))


def test_glob_that_matches_nothing(tmp_path):
    with pytest.raises(InputError, match=r"dataset 'T1': .*\*.xyz: matches no file"):
        resolve_files([str(tmp_path / "*.xyz")], "T1")


def test_families_must_agree(tmp_path, tiny_models):
    base = describe_model(tiny_models["T1"][0])
    far = describe_model(save_tiny_family(tmp_path / "a", "far", 1, r_max=5.0)[0])
    other = describe_model(save_tiny_family(tmp_path / "b", "zn", 1, atomic_numbers=(13, 30))[0])
    with pytest.raises(ModelError, match="r_max=5.0"):
        check_family("F", [base, far])
    with pytest.raises(ModelError, match="atomic_numbers"):
        check_family("F", [base, other])
    with pytest.raises(ModelError, match="listed twice"):
        check_family("F", [base, base])


def test_a_dataset_with_nothing_scorable_is_an_error(tiny_models, tmp_path):
    ase.io.write(tmp_path / "iron.xyz", Atoms("Fe", cell=[3] * 3, pbc=True))
    with pytest.raises(InputError, match="no structure could be scored"):
        extract_to_netcdf(tiny_models["T1"][0], [str(tmp_path / "iron.xyz")], tmp_path / "s.nc", SETTINGS)
    assert not (tmp_path / "s.nc").exists()


def test_structures_the_model_gives_non_finite_outputs_for_are_skipped(tmp_path):
    """An Al embedding of 1e308 overflows to inf/NaN on any structure with Al (0 * 1e308 = 0
    elsewhere): those are skipped with the reason, the pure-Cu ones are written, all finite."""
    import numpy as np
    import torch
    import xarray as xr

    from mace_ood.testing import build_tiny_mace

    model = build_tiny_mace(0)
    assert model.atomic_numbers.tolist() == [13, 29]
    with torch.no_grad():
        model.node_embedding.linear.weight.view(2, -1)[0] = 1e308
    torch.save(model, tmp_path / "overflowing.model")
    copper = random_structures(4, seed=1, symbols=("Cu",))
    mixed = [s for s in random_structures(6, seed=2) if 13 in s.numbers]
    path = tmp_path / "data.xyz"
    ase.io.write(path, copper + mixed)
    settings = SETTINGS.model_copy(update={"forces": True})
    summary = extract_to_netcdf(tmp_path / "overflowing.model", [str(path)], tmp_path / "out.nc", settings)
    assert summary.n_structures == len(copper)
    assert [s["frame_index"] for s in summary.skipped] == list(range(len(copper), len(copper) + len(mixed)))
    assert all("is not finite on" in s["reason"] for s in summary.skipped)
    with xr.open_dataset(tmp_path / "out.nc") as ds:
        assert all(np.isfinite(ds[name].values).all() for name in ds.data_vars if ds[name].dtype.kind == "f")
