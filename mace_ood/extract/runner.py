"""The forward runner: one MACE model, batches of graphs in, per-atom latents out.

The latents are the 0e columns of the model's own ``node_feats`` output (no change to
mace), computed on graphs built in the model's dtype (:mod:`mace_ood.extract.graphs`, or mace's
data pipeline for the model classes that read more than a graph). Out of
memory, a batch is halved down to one structure, and one structure is split into
spatial domains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from mace_ood.extract.graphs import Graph, GraphBuilder, collate, reads_only_the_graph
from mace_ood.extract.models import (
    DTYPES,
    cached_model,
    choose_head,
    invariant_columns,
    model_heads,
    resolve_device,
    sha256_of,
)
from mace_ood.extract.oom import (
    DoesNotFitError,
    OutOfMemoryError,
    free_device_memory,
    is_out_of_memory,
)
from mace_ood.extract.readout import (
    earlier_readout_energies,
    head_index,
    hidden_width,
    llpr_force_jacobian,
    llpr_unsupported,
)
from mace_ood.structures import MIN_DISTANCE_A

log = logging.getLogger(__name__)


class LatentExtractor:
    """Runs one MACE model and returns per-atom invariant latents.

    Parameters
    ----------
    model_path
        MACE ``.model`` file.
    device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    default_dtype
        ``float32`` or ``float64``; the model and the graphs are both cast to it.
    layers
        ``last`` (the readout's input) or ``all`` layers' invariants.
    max_atoms_per_forward
        Injectable memory budget: a forward pass over more atoms raises the same
        out-of-memory error a GPU would. ``None``: no budget.
    head
        Readout head for forces and energies (default: ``Default``, else the last); the
        latents (``node_feats``) do not depend on it.
    expected_sha256
        The model file's planned SHA-256: the bytes loaded must have it (default: whatever the
        file holds now).
    compute_forces
        Also return forces, per-atom energies and the energy from the same forward pass
        (needs autograd: roughly 2-3x the cost and memory of a latent-only pass).
    llpr_forces
        With ``compute_forces``, also return ``llpr_force_jacobian`` (LLPR propagated to the forces,
        :mod:`mace_ood.score.llpr`): one more backward pass per LLPR feature (17 for a two-layer
        model with 16 hidden channels). Asked for a family of one model, which has no committee.
    """

    def __init__(
        self,
        model_path: str | Path,
        device: str = "auto",
        default_dtype: str = "float64",
        layers: str = "last",
        max_atoms_per_forward: int | None = None,
        compute_forces: bool = False,
        expected_sha256: str | None = None,
        head: str | None = None,
        llpr_forces: bool = False,
    ) -> None:
        import mace.data
        from mace.tools import AtomicNumberTable

        self._mace_data = mace.data
        self.model_path = str(model_path)
        self.model_sha256 = expected_sha256 or sha256_of(model_path)
        self.device = resolve_device(device)
        self.default_dtype = default_dtype
        self.dtype = DTYPES[default_dtype]
        self.model = cached_model(self.model_path, self.device, default_dtype, self.model_sha256)
        self.columns = torch.tensor(invariant_columns(self.model, layers), device=self.device)
        self.layers = layers
        self.n_features = len(self.columns)
        self.atomic_numbers = [int(z) for z in self.model.atomic_numbers]
        self.z_table = AtomicNumberTable(self.atomic_numbers)
        self.r_max = float(self.model.r_max)
        self.heads = model_heads(self.model)
        self.head = choose_head(self.heads, head, self.model_path)
        self.max_atoms_per_forward = max_atoms_per_forward
        self.compute_forces = compute_forces
        self.forward_passes = 0
        # LLPR (mace_ood.score.llpr) needs the earlier readouts' per-atom outputs for the head
        self.llpr_unsupported = llpr_unsupported(self.model)
        self.n_layer_energies = len(self.model.readouts) - 1 if self.llpr_unsupported is None else 0
        self._head_index = head_index(self.model, self.head)
        self.n_llpr_jacobian = 0
        if llpr_forces and compute_forces and self.llpr_unsupported is None:
            self.n_llpr_jacobian = 3 * (self.n_layer_energies + hidden_width(self.model))
        self._graph_builder = None
        if reads_only_the_graph(self.model):
            head = self.heads.index(self.head) if self.head in self.heads else len(self.heads) - 1  # as AtomicData
            # on the CPU the loader runs beside the model, whose threads have the cores
            threads = 1 if self.device == "cpu" else 0
            self._graph_builder = GraphBuilder(self.atomic_numbers, self.r_max, self.dtype, head, threads)

    def graph(self, atoms: Atoms):
        """One structure's graph in the model's dtype: a :class:`~mace_ood.extract.graphs.Graph` (vesin's
        neighbour list) for the model classes whose forward reads only that, else mace's AtomicData."""
        if self._graph_builder is not None:
            return self._graph_builder(atoms)
        from mace.tools.torch_tools import default_dtype

        with default_dtype(self.dtype):
            config = self._mace_data.config_from_atoms(atoms, head_name=self.head)
            return self._mace_data.AtomicData.from_config(
                config, z_table=self.z_table, cutoff=self.r_max, heads=self.heads
            )

    def collate(self, graphs: list):
        """Several graphs as one batch on the CPU (done ahead of time by the loader thread)."""
        if self._graph_builder is not None:
            return collate(graphs, len(self.atomic_numbers))
        from mace.tools.torch_geometric.batch import Batch

        return Batch.from_data_list(graphs)

    def _forward(self, graphs: list, batch=None) -> list[dict[str, np.ndarray]]:
        n_atoms = sum(int(g.num_nodes) for g in graphs)
        if self.max_atoms_per_forward is not None and n_atoms > self.max_atoms_per_forward:
            raise OutOfMemoryError(
                f"out of memory: {n_atoms} atoms exceed the budget of {self.max_atoms_per_forward}"
            )
        batch = (batch if batch is not None else self.collate(graphs)).to(self.device)
        if self.n_llpr_jacobian:
            arrays = self._forward_with_jacobian(batch)
            energies = arrays.pop("energy").cpu().numpy()
        elif self.compute_forces:
            with torch.enable_grad():
                out = self.model(batch.to_dict(), compute_force=True)
            arrays = {
                "latent": out["node_feats"].detach().index_select(1, self.columns),
                "forces": out["forces"].detach(),
                "node_energy": out["node_energy"].detach(),
            }
            energies = out["energy"].detach().cpu().numpy()
        else:
            with torch.inference_mode():
                out = self.model(batch.to_dict(), compute_force=False)
                arrays = {"latent": out["node_feats"].index_select(1, self.columns)}
            energies = None
        if self.n_layer_energies and "layer_energy" not in arrays:
            with torch.inference_mode():
                arrays["layer_energy"] = earlier_readout_energies(
                    self.model, out["node_feats"].detach(), self._head_index
                )
        arrays = {name: value.cpu().numpy() for name, value in arrays.items()}
        self.forward_passes += 1
        bounds = batch.ptr.cpu().numpy()
        results = []
        for i in range(len(graphs)):
            item = {name: value[bounds[i] : bounds[i + 1]] for name, value in arrays.items()}
            if energies is not None:
                item["energy"] = float(energies[i])
            results.append(item)
        return results

    def _forward_with_jacobian(self, batch) -> dict[str, torch.Tensor]:
        """Latents, forces (-dE/dr, as mace computes them), energies, layer energies and the LLPR force
        Jacobian from one forward pass whose graph is kept for the feature gradients."""
        data = batch.to_dict()
        with torch.enable_grad():
            out = self.model(data, compute_force=False)  # mace makes the positions require grad
            positions, node_feats = data["positions"], out["node_feats"]
            forces = -torch.autograd.grad(out["energy"].sum(), positions, retain_graph=True)[0]
            features, jacobian = llpr_force_jacobian(self.model, node_feats, positions, data["batch"],
                                                     int(batch.num_graphs), self._head_index)
        arrays = {
            "latent": node_feats.detach().index_select(1, self.columns), "forces": forces.detach(),
            "node_energy": out["node_energy"].detach(), "energy": out["energy"].detach(),
            "llpr_force_jacobian": jacobian.detach(),
        }
        if self.n_layer_energies:  # the features' first columns: each earlier readout's output
            arrays["layer_energy"] = features[:, : self.n_layer_energies].detach()
        return arrays

    def outputs(
        self,
        graphs: list,
        on_backoff: Callable[[int], None] | None = None,
        structures: list[Atoms] | None = None,
        batch=None,
    ) -> list[dict[str, np.ndarray]]:
        """Per graph: ``latent``, ``layer_energy`` (LLPR's earlier readout outputs, when the model
        supports LLPR and has several layers) and ``forces``, ``node_energy``, ``energy`` with compute_forces.

        On out-of-memory the batch is split in halves, down to one graph; a single graph
        that still does not fit is computed by spatial domains (when its ``structures``
        are given), which gives the same result. ``batch``: ``graphs`` already collated.
        """
        try:
            return self._forward(graphs, batch)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            free_device_memory()
            if len(graphs) == 1:
                if structures is None:
                    raise
                if on_backoff is not None:
                    on_backoff(0)
                return [self.outputs_by_domains(structures[0])]
            half = len(graphs) // 2
            if on_backoff is not None:
                on_backoff(half)
            first = structures[:half] if structures is not None else None
            rest = structures[half:] if structures is not None else None
            return self.outputs(graphs[:half], on_backoff, first) + self.outputs(graphs[half:], on_backoff, rest)

    @property
    def receptive_field(self) -> float:
        """Distance beyond which atoms cannot change an atom's last-layer features (Å)."""
        return int(self.model.num_interactions) * self.r_max

    def outputs_by_domains(self, atoms: Atoms, grid: tuple[int, int, int] | None = None) -> dict[str, np.ndarray]:
        """One structure computed domain by domain, each with a halo of the receptive field
        (twice that for forces); the finest grid needed to fit is found by trying."""
        from mace_ood.extract.domains import decompose, grids

        halo = self.receptive_field * (2 if self.compute_forces else 1)
        candidates = [grid] if grid is not None else grids(atoms)
        for candidate in candidates:
            domains = list(decompose(atoms, candidate, halo))
            if self.max_atoms_per_forward is not None and max(len(d.cluster) for d in domains) > self.max_atoms_per_forward:
                continue
            try:
                results = [(d, self._forward([self.graph(d.cluster)])[0]) for d in domains]
            except Exception as exc:
                if not is_out_of_memory(exc) or grid is not None:
                    raise
                free_device_memory()
                continue
            out: dict[str, np.ndarray] = {}
            for domain, result in results:
                for name, values in result.items():
                    if name == "energy":
                        continue
                    if name not in out:
                        out[name] = np.empty((len(atoms), *values.shape[1:]), dtype=values.dtype)
                    out[name][domain.core_in_structure] = values[domain.core_in_cluster]
            if self.compute_forces:
                out["energy"] = float(out["node_energy"].sum())
            if "llpr_force_jacobian" in out:  # a domain's gradients miss its halo's share: not computed
                out["llpr_force_jacobian"][:] = np.nan
                log.warning("LLPR force Jacobian not computed for a structure split into domains: its "
                            "llpr_force_std and predicted force error are NaN")
            log.info("%d atoms computed in %d domains (grid %s, halo %.1f A)", len(atoms), len(domains), candidate, halo)
            return out
        raise DoesNotFitError(
            f"a structure of {len(atoms)} atoms does not fit even split into domains "
            f"(halo {halo:.1f} A); use a device with more memory"
        )

    def latents(self, graphs: list, on_backoff: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """Latents of each graph, shape (n_atoms, n_features)."""
        return [item["latent"] for item in self.outputs(graphs, on_backoff)]

    def __call__(self, atoms: Atoms) -> np.ndarray:
        """Latents of a single structure, shape (n_atoms, n_features)."""
        return self.latents([self.graph(atoms)])[0]



def close_atoms(graph) -> str | None:
    """Why a graph's atoms are too close (< MIN_DISTANCE_A), from its own edges; else None."""
    if isinstance(graph, Graph):
        if graph.shortest_edge is None:
            return None
        i, j, length = graph.shortest_edge
    else:  # mace's AtomicData: lengths from its edges
        edges = np.asarray(graph["edge_index"])  # numpy: for a small cell, torch's per-call cost dominated
        if edges.shape[1] == 0:
            return None
        positions = np.asarray(graph["positions"])
        vectors = positions[edges[1]] - positions[edges[0]] + np.asarray(graph["shifts"])
        lengths = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
        k = int(np.argmin(lengths))
        i, j, length = int(edges[0, k]), int(edges[1, k]), float(lengths[k])
    if length >= MIN_DISTANCE_A:
        return None
    return f"atoms {min(i, j)} and {max(i, j)} are {length:.3f} A apart (< {MIN_DISTANCE_A} A)"
