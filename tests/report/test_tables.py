from __future__ import annotations

from pathlib import Path

import ase.io
import numpy as np
import openpyxl
import pandas as pd
import pytest
import xarray as xr
from ase import Atoms

from mace_ood.files import atomic_path
from mace_ood.report.excel import sheet_name, write_excel
from mace_ood.report.structures import write_selected
from mace_ood.score.compute import compute_scores
from mace_ood.score.evaluation import write_scores_netcdf
from mace_ood.score.latents import open_latents
from mace_ood.score.tables import evaluation_table
from mace_ood.select.top import select_top
from tests.synthetic import synthetic_latent_files


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "r.csv"
    try:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    except RuntimeError:
        pass
    assert not target.exists() and not list(tmp_path.iterdir())
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole"


def test_sheet_names_are_valid_and_unique():
    taken: set[str] = set()
    names = [sheet_name("A" * 40, taken), sheet_name("A" * 40, taken), sheet_name("x/y:z", taken)]
    assert all(len(n) <= 31 for n in names) and len(set(names)) == 3 and names[2] == "x_y_z"


def test_molecule_without_cell_gets_a_box_and_scores_travel(tmp_path):
    molecule = Atoms("Cu3", positions=[[0, 0, 0], [2.5, 0, 0], [0, 2.5, 0]])
    source = tmp_path / "cluster_Cu3.xyz"
    ase.io.write(source, molecule)
    paths, _, _ = synthetic_latent_files(tmp_path / "lat", sizes=(3,))
    with open_latents(paths) as latents:
        scores = compute_scores(latents, None)
        scores["source_file"] = ("structure", np.array([str(source)]))
        scores["frame_index"] = ("structure", np.array([0]))
        scores_path = write_scores_netcdf(scores, tmp_path / "scores.nc")
    table = evaluation_table(scores_path, "F", "D", False)
    selected = write_selected(select_top(table, 5), scores_path, tmp_path / "top")
    assert len(selected) == 1
    cif = ase.io.read(selected.iloc[0]["cif"])
    assert cif.cell.rank == 3 and len(cif) == 3
    xyz = ase.io.read(selected.iloc[0]["extxyz"])
    per_atom = xyz.arrays["MACE_OOD_latent_variance"]
    assert np.isclose(per_atom.mean(), table.iloc[0]["latent_variance"])
    assert selected.iloc[0]["most_uncertain_atom"] == int(np.argmax(per_atom))

    # an earlier run's picks do not stay beside the new ones (regression: they did)
    (tmp_path / "top" / "07_old_pick.cif").write_text("data_old\n")
    (tmp_path / "top" / "07_old_pick.extxyz").write_text("1\n\nCu 0 0 0\n")
    (tmp_path / "top" / "notes.txt").write_text("mine")
    again = write_selected(select_top(table, 5), scores_path, tmp_path / "top")
    left = sorted(p.name for p in (tmp_path / "top").iterdir())
    assert left == sorted([Path(again.iloc[0]["cif"]).name, Path(again.iloc[0]["extxyz"]).name, "notes.txt"])


def test_excel_layout(tmp_path):
    frame = pd.DataFrame({"rank": [1, 2], "latent_variance": [0.3, 0.1], "structure_id": ["a", "b"]})
    summary = pd.DataFrame({"evaluation": ["F__D"], "max_latent_variance": [0.3]})
    path = write_excel(tmp_path / "r.xlsx", summary, {"F__D": frame}, pd.DataFrame(columns=["reason"]))
    book = openpyxl.load_workbook(path)
    assert book.sheetnames == ["summary", "F__D", "skipped"]
    sheet = book["F__D"]
    assert sheet.freeze_panes == "A2"
    assert [c.value for c in sheet[1]] == ["rank", "latent_variance", "structure_id"]
    rules = list(sheet.conditional_formatting)
    assert rules and str(rules[0].sqref) == "B2:B3"


@pytest.mark.parametrize(("gap", "max_span"), [(4096, 1 << 18), (3, 50), (0, 1)])
def test_rows_read_in_slices_equal_numpy_indexing(tmp_path, gap, max_span):
    """Selected atoms are read as contiguous slices (runs); any order, repeats and both ends."""
    from mace_ood.report.tables import read_rows

    rng = np.random.default_rng(2)
    values = rng.normal(size=(2000, 4))
    xr.Dataset({"latent": (("atom", "feature"), values)}).to_netcdf(tmp_path / "l.nc")
    index = np.r_[rng.integers(0, 2000, 300), 0, 1999, 5, 5, np.arange(700, 760)[::-1]]
    with xr.open_dataset(tmp_path / "l.nc") as ds:
        np.testing.assert_array_equal(read_rows(ds["latent"], index, gap, max_span), values[index])
        np.testing.assert_array_equal(read_rows(ds["latent"][:, 2], index, gap, max_span), values[index, 2])
        assert read_rows(ds["latent"], np.zeros(0, dtype=int)).shape == (0, 4)
