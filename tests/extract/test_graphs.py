"""The extraction's own graphs (vesin's neighbour list, collated without mace's data objects) are
mace's: the same edges, shifts and cells as ``mace.data.neighborhood.get_neighborhood``, and the
same latents, forces and energies as mace's pipeline."""

from __future__ import annotations

from copy import deepcopy

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule

from mace_ood.extract.graphs import GraphBuilder, reads_only_the_graph
from mace_ood.extract.runner import LatentExtractor
from mace_ood.testing import build_tiny_mace

CUTOFF = 4.0


def cells() -> dict[str, Atoms]:
    rng = np.random.default_rng(3)
    periodic = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 2, 2)
    periodic.rattle(0.1, seed=1)
    skewed = Atoms("Cu3Al", positions=rng.uniform(0, 3, (4, 3)),
                   cell=[[4.0, 0, 0], [2.5, 3.8, 0], [1.2, -1.5, 4.4]], pbc=True)
    small = bulk("Cu", "fcc", a=3.61)  # primitive cell: every vector shorter than the cutoff
    small.rattle(0.05, seed=2)
    slab = fcc111("Al", size=(2, 2, 3), vacuum=6.0)  # periodic in x and y only
    slab.rattle(0.05, seed=3)
    cluster = Atoms("Cu2Al2", positions=[[0, 0, 0], [2.4, 0, 0], [0, 2.6, 0.3], [1.1, 1.3, 2.2]])  # no cell
    boxed = molecule("CH4")  # non-periodic, in a cell
    boxed.symbols = "CuAl4"
    boxed.positions *= 2.0
    boxed.cell = [8, 8, 8]
    lone = Atoms("Cu", positions=[[0.1, 0.2, 0.3]], cell=[10, 10, 10], pbc=True)  # its only neighbours: none
    return {"periodic": periodic, "skewed": skewed, "small-cell": small, "slab": slab, "cluster": cluster,
            "non-periodic-in-a-cell": boxed, "lone-atom": lone}


@pytest.mark.parametrize("name", list(cells()))
def test_edges_shifts_and_cells_equal_mace_s(name):
    from mace.data.neighborhood import get_neighborhood

    atoms = cells()[name]
    edge_index, shifts, unit_shifts, cell = get_neighborhood(
        positions=atoms.positions, cutoff=CUTOFF, pbc=deepcopy(tuple(bool(p) for p in atoms.pbc)),
        cell=deepcopy(np.array(atoms.cell.array)))
    graph = GraphBuilder([13, 29, 6, 1], CUTOFF, torch.float64, head=0)(atoms)
    theirs = {(int(s), int(r), *map(int, u)): shift for s, r, u, shift in zip(*edge_index, unit_shifts, shifts, strict=True)}
    ours = {(int(s), int(r), *map(int, u)): shift
            for s, r, u, shift in zip(*graph.edge_index, graph.unit_shifts, graph.shifts, strict=True)}
    assert len(ours) == graph.edge_index.shape[1]  # no edge twice
    assert set(ours) == set(theirs), (len(ours), len(theirs))
    for key, shift in theirs.items():
        np.testing.assert_allclose(ours[key], shift, atol=1e-9)
    np.testing.assert_allclose(graph.cell, cell, atol=1e-9)
    np.testing.assert_array_equal(graph.positions, atoms.positions)
    if name == "small-cell":
        assert any(s == r for s, r, *_ in ours)  # an atom's own periodic images are its neighbours
    # the shortest edge (the close-atoms check reads it) against lengths from mace's own edges
    if len(theirs) == 0:
        assert graph.shortest_edge is None
        return
    lengths = np.linalg.norm(atoms.positions[edge_index[1]] - atoms.positions[edge_index[0]] + shifts, axis=1)
    sender, receiver, length = graph.shortest_edge
    assert length == pytest.approx(lengths.min(), abs=1e-9)
    pair_lengths = lengths[(edge_index[0] == sender) & (edge_index[1] == receiver)]
    assert np.isclose(pair_lengths, length, atol=1e-9).any()


def test_an_element_outside_the_model_s_table_is_named():
    builder = GraphBuilder([13, 29], CUTOFF, torch.float32, head=0)
    with pytest.raises(KeyError, match=r"atomic numbers \[26\]"):
        builder(Atoms("CuFe", positions=[[0, 0, 0], [2, 0, 0]]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_latents_forces_and_energies_equal_mace_s_pipeline(tmp_path, dtype):
    """A batch of every cell above through the model: our graphs against mace's AtomicData/Batch."""
    torch_dtype = torch.float32 if dtype == "float32" else torch.float64
    model = build_tiny_mace(0, atomic_numbers=(1, 6, 13, 29), dtype=torch_dtype, heads=["Default", "pt_head"])
    assert reads_only_the_graph(model)
    torch.save(model, tmp_path / "m.model")
    ours = LatentExtractor(tmp_path / "m.model", "cpu", dtype, compute_forces=True, head="pt_head")
    mace_s = LatentExtractor(tmp_path / "m.model", "cpu", dtype, compute_forces=True, head="pt_head")
    mace_s._graph_builder = None  # mace's own pipeline
    structures = list(cells().values())
    ours_graphs, their_graphs = [ours.graph(a) for a in structures], [mace_s.graph(a) for a in structures]
    assert type(ours_graphs[0]).__name__ == "Graph" and type(their_graphs[0]).__name__ == "AtomicData"
    tolerance = 2e-5 if dtype == "float32" else 1e-10
    for a, b in zip(ours.outputs(ours_graphs), mace_s.outputs(their_graphs), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=tolerance, rtol=tolerance, err_msg=key)


def test_other_model_classes_keep_mace_s_pipeline():
    class AtomicDipolesMACE(torch.nn.Module):
        pass

    assert not reads_only_the_graph(AtomicDipolesMACE())
    model = build_tiny_mace(0)
    model.joint_embedding = torch.nn.Identity()  # reads more of the data than a graph holds
    assert not reads_only_the_graph(model)
