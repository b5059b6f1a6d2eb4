"""Multi-head models (fine-tuned foundation models, mace's multihead replay): the head is checked,
listed, and used for forces and energies; the latents do not depend on it."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from mace_ood.cli import app
from mace_ood.config import ExtractionSettings
from mace_ood.extract.models import ModelError, check_family, describe_model
from mace_ood.extract.runner import LatentExtractor
from mace_ood.extract.stream import extract_to_netcdf
from mace_ood.testing import build_tiny_mace, random_structures

HEADS = ["Default", "pt_head"]


@pytest.fixture(scope="module")
def multihead(tmp_path_factory):
    directory = tmp_path_factory.mktemp("multihead")
    paths = []
    for seed in range(2):
        path = directory / f"mh_seed{seed}.model"
        torch.save(build_tiny_mace(seed, heads=HEADS), path)
        paths.append(path)
    return paths


def test_latents_do_not_depend_on_the_head_but_forces_do(multihead, tmp_path):
    atoms = random_structures(1, seed=1)[0]
    default = LatentExtractor(multihead[0], "cpu", "float64", compute_forces=True)
    other = LatentExtractor(multihead[0], "cpu", "float64", compute_forces=True, head="pt_head")
    assert default.head == "Default" and other.head == "pt_head"
    a, b = default.outputs([default.graph(atoms)])[0], other.outputs([other.graph(atoms)])[0]
    np.testing.assert_array_equal(a["latent"], b["latent"])
    assert np.abs(a["forces"] - b["forces"]).max() > 1e-6 and a["energy"] != b["energy"]
    # the head's forces are the model's own for that head (mace's calculator as the reference)
    from mace.calculators import MACECalculator

    calculator = MACECalculator(model_paths=str(multihead[0]), device="cpu", default_dtype="float64", head="pt_head")
    copy = atoms.copy()
    copy.calc = calculator
    np.testing.assert_allclose(b["forces"], copy.get_forces(), atol=1e-8)


def test_unknown_head_is_refused_with_the_heads_listed(multihead):
    infos = [describe_model(p) for p in multihead]
    assert infos[0].heads == tuple(HEADS)
    check_family("F", infos, "pt_head")
    with pytest.raises(ModelError, match=r"has no head 'mp' \(heads: Default, pt_head\)"):
        check_family("F", infos, "mp")


def test_head_is_in_the_file_and_changes_the_reuse_key(multihead, tmp_path):
    """Latents do not depend on the head, but the stored layer energies (LLPR) and forces do: a file
    of another head is recomputed, and only its head-dependent variables differ."""
    import netCDF4

    data = tmp_path / "d.xyz"
    ase.io.write(data, random_structures(3, seed=2))
    settings = ExtractionSettings(device="cpu", chunk_atoms=64, forces=False)
    default, other = tmp_path / "default.nc", tmp_path / "other.nc"
    extract_to_netcdf(multihead[0], [str(data)], default, settings)
    extract_to_netcdf(multihead[0], [str(data)], other, settings, head="pt_head")
    again = extract_to_netcdf(multihead[0], [str(data)], default, settings, head="pt_head")
    assert again.computed_structures == 3 and not again.reused
    extract_to_netcdf(multihead[0], [str(data)], default, settings)
    with netCDF4.Dataset(default) as a, netCDF4.Dataset(other) as b:
        assert (a.getncattr("head"), b.getncattr("head")) == ("Default", "pt_head")
        np.testing.assert_array_equal(a["latent"][:], b["latent"][:])
        assert np.abs(a["layer_energy"][:] - b["layer_energy"][:]).max() > 1e-6
    forces = settings.model_copy(update={"forces": True})
    first = extract_to_netcdf(multihead[0], [str(data)], default, forces)
    again = extract_to_netcdf(multihead[0], [str(data)], default, forces, head="pt_head")
    assert first.computed_structures == 3 and again.computed_structures == 3 and not again.reused
    with netCDF4.Dataset(default) as ds:
        assert ds.getncattr("head") == "pt_head"


def test_validate_lists_the_heads_and_checks_the_chosen_one(multihead, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    ase.io.write(data / "a.xyz", random_structures(2, seed=3))
    ase.io.write(data / "b.xyz", random_structures(2, seed=4))
    config = {
        "output_dir": str(tmp_path / "run"), "device": "cpu",
        "datasets": {"A": [str(data / "a.xyz")], "B": [str(data / "b.xyz")]},
        "model_families": {"F": {"trained_on": "A", "models": [str(p) for p in multihead], "head": "pt_head"}},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "heads=['Default', 'pt_head']" in result.output and "from head 'pt_head'" in result.output
    config["model_families"]["F"]["head"] = "mp"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "has no head 'mp'" in result.output
