"""Graphs for the model, built with vesin's neighbour list and collated without mace's data objects.

mace's own pipeline (``config_from_atoms``, ``AtomicData.from_config``, ``Batch.from_data_list``)
builds about twenty tensors per structure and a matscipy neighbour list: 3.5 ms of Python for a
32-atom cell on this project's 2-core machine, on the same cores and GIL as the model
(``benchmarks/extraction.py``). A :class:`Graph` holds only what :func:`prepare_graph` and the
forward pass of ``MACE`` and ``ScaleShiftMACE`` read (positions, one-hot species, edges and their
shifts, the cell, the head), as numpy arrays until :func:`collate` makes one set of tensors per
batch. Its edges are mace's (``mace.data.neighborhood.get_neighborhood``): every pair within the
cutoff, periodic images included, no atom with itself in its own cell, shifts ``S @ cell`` and a
non-periodic direction's cell vector stretched as mace stretches it (``tests/extract/test_graphs.py``
compares both on periodic, non-periodic, mixed, skewed and smaller-than-cutoff cells).

Other model classes (a joint embedding reads more of the data, a dipole model reads charges) keep
mace's pipeline: :func:`reads_only_the_graph` says which.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# the model classes whose forward pass reads nothing but a Graph's fields
GRAPH_MODELS = ("MACE", "ScaleShiftMACE")


def reads_only_the_graph(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward pass reads only what a :class:`Graph` holds."""
    return type(model).__name__ in GRAPH_MODELS and not hasattr(model, "joint_embedding")


@dataclass
class Graph:
    """One structure's graph: numpy arrays, in the model's dtype where they are real numbers."""

    positions: np.ndarray  # (n_atoms, 3)
    species: np.ndarray  # (n_atoms,) index into the model's atomic-number table
    edge_index: np.ndarray  # (2, n_edges): sender, receiver
    unit_shifts: np.ndarray  # (n_edges, 3) whole cell vectors crossed
    shifts: np.ndarray  # (n_edges, 3) unit_shifts @ cell, in Å
    cell: np.ndarray  # (3, 3), non-periodic directions stretched as mace does
    head: int
    shortest_edge: tuple[int, int, float] | None = None  # (sender, receiver, length in Å), from vesin's distances

    @property
    def num_nodes(self) -> int:
        return len(self.positions)

    def __getitem__(self, key: str) -> torch.Tensor:
        """``graph["edge_index"]``, as for mace's data objects (:func:`mace_ood.extract.runner.close_atoms`)."""
        return torch.from_numpy(np.ascontiguousarray(getattr(self, key)))


class GraphBuilder:
    """Builds :class:`Graph` objects for one model: its atomic numbers, cutoff, dtype and head."""

    def __init__(self, atomic_numbers: list[int], cutoff: float, dtype: torch.dtype, head: int,
                 threads: int = 0) -> None:
        """``threads``: vesin's threads (0: all cores); 1 where the model runs on the same CPU."""
        from vesin import NeighborList

        self.cutoff = float(cutoff)
        self.dtype = np.float64 if dtype == torch.float64 else np.float32
        self.head = int(head)
        self._index = np.full(max(atomic_numbers) + 1, -1, dtype=np.int64)
        self._index[np.asarray(atomic_numbers)] = np.arange(len(atomic_numbers))
        self._neighbours = NeighborList(cutoff=self.cutoff, full_list=True, n_threads=threads)

    def __call__(self, atoms) -> Graph:
        numbers = atoms.numbers
        if numbers.max(initial=0) >= len(self._index) or (self._index[numbers] < 0).any():
            unknown = sorted(set(numbers.tolist()) - set(np.flatnonzero(self._index >= 0).tolist()))
            raise KeyError(f"atomic numbers {unknown} are not in the model's table")
        positions = np.asarray(atoms.positions, dtype=np.float64)
        pbc = np.asarray(atoms.pbc, dtype=bool)
        cell = np.array(atoms.cell.array, dtype=np.float64)
        if not cell.any():
            cell = np.identity(3)
        # mace's stretch of a non-periodic direction (mace.data.neighborhood.get_neighborhood)
        stretch = (np.max(np.abs(positions)) + 1) * 5 * self.cutoff if len(positions) else 1.0
        for axis in np.flatnonzero(~pbc):
            cell[axis] = 0.0
            cell[axis, axis] = stretch
        if len(positions):
            sender, receiver, unit_shifts, lengths = self._neighbours.compute(
                points=positions, box=cell, periodic=pbc.tolist(), quantities="ijSd")
        else:
            sender = receiver = np.zeros(0, dtype=np.int64)
            unit_shifts = np.zeros((0, 3), dtype=np.int64)
            lengths = np.zeros(0)
        # vesin keeps no pair of an atom with itself in its own cell already; mace drops them too
        self_pairs = (sender == receiver) & ~unit_shifts.any(axis=1)
        if self_pairs.any():
            keep = ~self_pairs
            sender, receiver, unit_shifts, lengths = sender[keep], receiver[keep], unit_shifts[keep], lengths[keep]
        shortest = None
        if len(lengths):
            k = int(np.argmin(lengths))
            shortest = (int(sender[k]), int(receiver[k]), float(lengths[k]))
        unit_shifts = unit_shifts.astype(np.float64)
        return Graph(
            positions=positions.astype(self.dtype),
            species=self._index[numbers],
            edge_index=np.stack((sender, receiver)).astype(np.int64, copy=False),
            unit_shifts=unit_shifts.astype(self.dtype),
            shifts=(unit_shifts @ cell).astype(self.dtype),
            cell=cell.astype(self.dtype),
            head=self.head,
            shortest_edge=shortest,
        )


class GraphBatch(dict):
    """Several graphs as the model's input dict (``positions``, ``node_attrs``, ``edge_index``,
    ``shifts``, ``unit_shifts``, ``cell``, ``batch``, ``ptr``, ``head``), with the ``ptr``,
    ``num_graphs``, ``num_nodes`` and ``to(device)`` of mace's Batch."""

    @property
    def ptr(self) -> torch.Tensor:
        return self["ptr"]

    @property
    def num_graphs(self) -> int:
        return int(self["ptr"].numel() - 1)

    @property
    def num_nodes(self) -> int:
        return int(self["ptr"][-1])

    def to(self, device: str | torch.device) -> GraphBatch:
        if str(device) == "cpu":
            return self
        cuda = str(device).startswith("cuda")
        # pinned host memory lets the copies run asynchronously with the model's work
        return GraphBatch({k: (v.pin_memory() if cuda else v).to(device, non_blocking=cuda) for k, v in self.items()})

    def to_dict(self) -> dict[str, torch.Tensor]:
        return dict(self)


def collate(graphs: list[Graph], n_species: int) -> GraphBatch:
    """One :class:`GraphBatch` of ``graphs`` (on the CPU)."""
    sizes = np.array([g.num_nodes for g in graphs], dtype=np.int64)
    ptr = np.concatenate(([0], np.cumsum(sizes)))
    offsets = np.repeat(ptr[:-1], [g.edge_index.shape[1] for g in graphs])
    species = np.concatenate([g.species for g in graphs])
    node_attrs = np.zeros((len(species), n_species), dtype=graphs[0].positions.dtype)
    node_attrs[np.arange(len(species)), species] = 1.0
    return GraphBatch(
        positions=torch.from_numpy(np.concatenate([g.positions for g in graphs])),
        node_attrs=torch.from_numpy(node_attrs),
        edge_index=torch.from_numpy(np.concatenate([g.edge_index for g in graphs], axis=1) + offsets),
        shifts=torch.from_numpy(np.concatenate([g.shifts for g in graphs])),
        unit_shifts=torch.from_numpy(np.concatenate([g.unit_shifts for g in graphs])),
        cell=torch.from_numpy(np.concatenate([g.cell for g in graphs])),
        batch=torch.from_numpy(np.repeat(np.arange(len(graphs)), sizes)),
        ptr=torch.from_numpy(ptr),
        head=torch.tensor([g.head for g in graphs], dtype=torch.long),
    )
