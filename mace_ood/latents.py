"""Per-atom invariant latents of a MACE model, streamed to a netCDF file.

The latents are the 0e columns of the model's own ``node_feats`` output (no change to
mace), computed on graphs built by mace's data pipeline in the model's dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from ase import Atoms

from mace_ood.config import ExtractionSettings
from mace_ood.metadata import info_fields
from mace_ood.models import DTYPES, cached_model, invariant_columns, resolve_device, sha256_of
from mace_ood.oom import OutOfMemoryError, free_device_memory, is_out_of_memory
from mace_ood.store import LatentWriter, partial_path, read_attrs
from mace_ood.structures import MIN_DISTANCE_A, InputError, check_structure, iter_structures

log = logging.getLogger(__name__)

FORMAT_VERSION = "2"


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
    compute_forces
        Also return forces, per-atom energies and the energy from the same forward pass
        (needs autograd: roughly 2-3x the cost and memory of a latent-only pass).
    """

    def __init__(
        self,
        model_path: str | Path,
        device: str = "auto",
        default_dtype: str = "float64",
        layers: str = "last",
        max_atoms_per_forward: int | None = None,
        compute_forces: bool = False,
    ) -> None:
        import mace.data
        from mace.tools import AtomicNumberTable

        self._mace_data = mace.data
        self.model_path = str(model_path)
        self.model_sha256 = sha256_of(model_path)
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
        self.heads = list(getattr(self.model, "heads", None) or ["Default"])
        self.head = next((h for h in self.heads if h.lower() == "default"), self.heads[-1])
        self.max_atoms_per_forward = max_atoms_per_forward
        self.compute_forces = compute_forces
        self.forward_passes = 0

    def graph(self, atoms: Atoms):
        """mace's AtomicData for one structure, in the model's dtype."""
        from mace.tools.torch_tools import default_dtype

        with default_dtype(self.dtype):
            config = self._mace_data.config_from_atoms(atoms, head_name=self.head)
            return self._mace_data.AtomicData.from_config(
                config, z_table=self.z_table, cutoff=self.r_max, heads=self.heads
            )

    @staticmethod
    def collate(graphs: list):
        """mace's batch of several graphs (on the CPU; done ahead of time by the loader thread)."""
        from mace.tools.torch_geometric.batch import Batch

        return Batch.from_data_list(graphs)

    def _forward(self, graphs: list, batch=None) -> list[dict[str, np.ndarray]]:
        n_atoms = sum(int(g.num_nodes) for g in graphs)
        if self.max_atoms_per_forward is not None and n_atoms > self.max_atoms_per_forward:
            raise OutOfMemoryError(
                f"out of memory: {n_atoms} atoms exceed the budget of {self.max_atoms_per_forward}"
            )
        batch = (batch if batch is not None else self.collate(graphs)).to(self.device)
        if self.compute_forces:
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

    def outputs(
        self,
        graphs: list,
        on_backoff: Callable[[int], None] | None = None,
        structures: list[Atoms] | None = None,
        batch=None,
    ) -> list[dict[str, np.ndarray]]:
        """Per graph: ``latent`` (and ``forces``, ``node_energy``, ``energy`` with compute_forces).

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
        from mace_ood.domains import decompose, grids

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
            log.info("%d atoms computed in %d domains (grid %s, halo %.1f A)", len(atoms), len(domains), candidate, halo)
            return out
        raise OutOfMemoryError(
            f"out of memory: a structure of {len(atoms)} atoms does not fit even split into domains "
            f"(halo {halo:.1f} A); use a device with more memory"
        )

    def latents(self, graphs: list, on_backoff: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """Latents of each graph, shape (n_atoms, n_features)."""
        return [item["latent"] for item in self.outputs(graphs, on_backoff)]

    def __call__(self, atoms: Atoms) -> np.ndarray:
        """Latents of a single structure, shape (n_atoms, n_features)."""
        return self.latents([self.graph(atoms)])[0]


@dataclass
class ExtractionSummary:
    """Small, serialisable result of one extraction (what a task returns)."""

    path: str
    model_path: str
    model_sha256: str
    n_structures: int = 0
    n_atoms: int = 0
    skipped: list[dict] = field(default_factory=list)
    forward_passes: int = 0
    computed_structures: int = 0
    copied_structures: int = 0
    resumed_structures: int = 0
    split_structures: int = 0
    wall_s: float = 0.0
    smallest_batch: int = 0
    reused: bool = False

    @property
    def atoms_per_s(self) -> float:
        return self.n_atoms / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        data = asdict(self)
        data["atoms_per_s"] = round(self.atoms_per_s, 1)
        return data


def inputs_fingerprint(files: Iterable[str]) -> str:
    """Content hash of a dataset's files (order-sensitive)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(Path(path).name.encode())
        digest.update(sha256_of(path).encode())
    return digest.hexdigest()


def structure_hash(atoms: Atoms) -> str:
    """Content hash of what the model sees: species, positions, cell, periodicity."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(atoms.numbers, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(atoms.positions, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(atoms.cell.array, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(atoms.pbc, dtype=np.int8).tobytes())
    return digest.hexdigest()[:32]


def close_atoms(graph) -> str | None:
    """Why a graph's atoms are too close (< MIN_DISTANCE_A), from its own edges; else None."""
    edges = graph["edge_index"]
    if edges.shape[1] == 0:
        return None
    positions = graph["positions"]
    vectors = positions[edges[1]] - positions[edges[0]] + graph["shifts"]
    lengths = torch.linalg.vector_norm(vectors, dim=1)
    k = int(torch.argmin(lengths))
    if float(lengths[k]) >= MIN_DISTANCE_A:
        return None
    i, j = int(edges[0, k]), int(edges[1, k])
    return f"atoms {min(i, j)} and {max(i, j)} are {float(lengths[k]):.3f} A apart (< {MIN_DISTANCE_A} A)"


def progress_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".progress.json")


class _PreviousLatents:
    """Latents of an earlier file made by the same model and settings, found by structure content."""

    def __init__(self, path: Path) -> None:
        import netCDF4

        self._ds = netCDF4.Dataset(path)
        self._ds.set_auto_mask(False)
        hashes = self._ds["structure_hash"][:]
        self._index = {
            h: (int(o), int(n), i)
            for i, (h, o, n) in enumerate(zip(hashes, self._ds["atom_offset"][:], self._ds["n_atoms"][:], strict=True))
        }
        self.with_forces = "forces" in self._ds.variables

    def has(self, key: str) -> bool:
        return key in self._index

    def get(self, key: str) -> dict | None:
        found = self._index.get(key)
        if found is None:
            return None
        offset, n, row = found
        item = {"latent": self._ds["latent"][offset : offset + n]}
        if self.with_forces:
            item["forces"] = self._ds["forces"][offset : offset + n]
            item["node_energy"] = self._ds["node_energy"][offset : offset + n]
            item["energy"] = float(self._ds["energy"][row])
        return item

    def close(self) -> None:
        self._ds.close()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Run ``iterator`` in a background thread, ``depth`` items ahead; its errors re-raise here."""
    import queue
    import threading

    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            items.put(_Failed(exc))

    thread = threading.Thread(target=produce, name="mace-ood-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _collated(batches: Iterator[list[dict]]) -> Iterator[tuple[list[dict], object]]:
    from mace.tools.torch_geometric.batch import Batch

    for batch in batches:
        graphs = [item["graph"] for item in batch if "graph" in item]
        yield batch, Batch.from_data_list(graphs) if graphs else None


def _batches(items: Iterator[dict], batch_size: int, max_atoms: int) -> Iterator[list[dict]]:
    batch: list = []
    atoms_in_batch = 0
    for item in items:
        n_atoms = len(item["atoms"])
        if batch and (len(batch) >= batch_size or atoms_in_batch + n_atoms > max_atoms):
            yield batch
            batch, atoms_in_batch = [], 0
        batch.append(item)
        atoms_in_batch += n_atoms
    if batch:
        yield batch


def extract_to_netcdf(
    model_path: str | Path,
    files: list[str],
    out_path: str | Path,
    settings: ExtractionSettings,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_atoms_per_forward: int | None = None,
    attrs: dict | None = None,
    checkpoint_seconds: float = 60.0,
) -> ExtractionSummary:
    """Run one model over every structure of ``files`` and stream latents to ``out_path``.

    Never computes twice what is on disk:

    - a finished file with the same model hash, input fingerprint and settings is reused;
    - a run that was killed resumes after the last durable structure of its ``.partial``
      file (recorded in ``<out>.progress.json`` after each synced chunk, and at least every
      ``checkpoint_seconds``);
    - when only the inputs changed, structures whose content is already in the previous
      file (same model and settings) are copied from it, not recomputed.

    Structures that cannot be scored are skipped and listed (with the reason) in the
    summary and the file's ``skipped_json`` attribute.

    Parameters
    ----------
    batch_size
        Overrides ``settings.batch_size`` (Prefect retries halve it).
    progress
        Called as ``progress(n_structures_done, n_atoms_done)`` after each batch.
    """
    out_path = Path(out_path)
    started = time.perf_counter()
    settings_json = settings.model_dump_json(exclude={"device", "refresh"})
    model_sha = sha256_of(model_path)
    key = {
        "model_sha256": model_sha,
        "inputs_fingerprint": inputs_fingerprint(files),
        "extraction_settings": settings_json,
        "format_version": FORMAT_VERSION,
    }
    previous_file = None
    if settings.refresh:
        progress_path(out_path).unlink(missing_ok=True)
    elif out_path.is_file():
        existing = read_attrs(out_path)
        if all(existing.get(k) == v for k, v in key.items()):
            return ExtractionSummary(
                path=str(out_path), model_path=str(model_path), model_sha256=model_sha,
                n_structures=int(existing["n_structures"]), n_atoms=int(existing["n_atoms"]),
                skipped=json.loads(existing.get("skipped_json", "[]")), reused=True,
            )
        if all(existing.get(k) == key[k] for k in ("model_sha256", "extraction_settings", "format_version")):
            previous_file = out_path

    extractor = LatentExtractor(
        model_path, settings.device, settings.default_dtype, settings.layers, max_atoms_per_forward,
        compute_forces=settings.forces,
    )
    batch_size = batch_size or settings.batch_size
    summary = ExtractionSummary(
        path=str(out_path), model_path=str(model_path), model_sha256=model_sha, smallest_batch=batch_size
    )
    allowed = set(extractor.atomic_numbers)
    import mace

    file_attrs = {
        "title": "mace-ood per-atom invariant latents",
        **key,
        "model_file": str(model_path),
        "mace_torch_version": getattr(mace, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "default_dtype": settings.default_dtype,
        "layers": settings.layers,
        "device": extractor.device,
        "r_max": extractor.r_max,
        "atomic_numbers": json.dumps(extractor.atomic_numbers),
        **(attrs or {}),
    }
    record = progress_path(out_path)

    def on_durable(n_structures: int, n_atoms: int, consumed: int) -> None:
        """Record how far a restart may skip: structures on disk and inputs read up to them."""
        state = {
            "key": key, "n_structures": n_structures, "n_atoms": n_atoms, "n_consumed": consumed,
            "skipped": [s for s in summary.skipped if s["consumed"] <= consumed],
        }
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, record)

    writer, n_skip_inputs = None, 0
    if record.is_file() and partial_path(out_path).is_file():
        state = json.loads(record.read_text())
        if state.get("key") == key:
            try:
                writer = LatentWriter(
                    out_path, extractor.n_features, settings.default_dtype, file_attrs, settings.chunk_atoms,
                    settings.compression, settings.forces, on_durable, (state["n_structures"], state["n_atoms"]),
                )
                n_skip_inputs = state["n_consumed"]
                summary.skipped = state["skipped"]
                summary.resumed_structures = state["n_structures"]
                log.info("resuming %s after %d structures", out_path.name, state["n_structures"])
            except Exception as exc:  # noqa: BLE001 - an unreadable partial file means starting over
                log.warning("cannot resume %s (%s); starting over", partial_path(out_path), exc)
    if writer is None:
        writer = LatentWriter(
            out_path, extractor.n_features, settings.default_dtype, file_attrs, settings.chunk_atoms,
            settings.compression, settings.forces, on_durable,
        )
    previous = _PreviousLatents(previous_file) if previous_file else None

    seen_ids: set[str] = set()
    consumed = [n_skip_inputs]

    def unreadable(ref, reason: str) -> None:
        summary.skipped.append({**asdict(ref), "reason": reason, "consumed": consumed[0]})
        log.warning("skipped %s: %s", ref.source_file, reason)

    def items() -> Iterator[dict]:
        for index, (ref, atoms) in enumerate(iter_structures(files, on_error=unreadable)):
            if index < n_skip_inputs:
                continue
            consumed[0] = index + 1
            reason = check_structure(atoms, allowed)
            if ref.structure_id in seen_ids:
                reason = "duplicate structure id"
            seen_ids.add(ref.structure_id)
            if reason is not None:
                summary.skipped.append({**asdict(ref), "reason": reason, "consumed": index + 1})
                log.warning("skipped %s (%s): %s", ref.structure_id, ref.source_file, reason)
                continue
            content = structure_hash(atoms)
            item = {"ref": ref, "atoms": atoms, "hash": content, "output": None, "consumed": index + 1}
            if previous is not None and previous.has(content):
                item["copy"] = True  # read in the main thread: HDF5 is not thread-safe
            else:
                try:
                    item["graph"] = extractor.graph(atoms)
                    reason = close_atoms(item["graph"])
                except Exception as exc:  # noqa: BLE001 - any failure skips this structure only
                    reason = f"graph construction failed: {exc}"
                if reason is not None:
                    summary.skipped.append({**asdict(ref), "reason": reason, "consumed": index + 1})
                    log.warning("skipped %s (%s): %s", ref.structure_id, ref.source_file, reason)
                    continue
            yield item

    def on_backoff(size: int) -> None:
        summary.smallest_batch = min(summary.smallest_batch, max(size, 1))
        if size:
            log.warning("out of memory: batch split to %d structures", size)
        else:
            summary.split_structures += 1
            log.warning("out of memory on a single structure: computing it by spatial domains")

    last_checkpoint = time.monotonic()
    try:
        # reading, checks and neighbour lists run in a background thread, overlapping the model
        for batch, collated in prefetch(_collated(_batches(items(), batch_size, settings.max_atoms_per_batch))):
            todo = [item for item in batch if "graph" in item]
            graphs = [item["graph"] for item in todo]
            structures = [item["atoms"] for item in todo]
            computed = extractor.outputs(graphs, on_backoff, structures, collated) if graphs else []
            for item, output in zip(todo, computed, strict=True):
                item["output"] = output
            summary.computed_structures += len(todo)
            for item in batch:
                if item.get("copy"):
                    item["output"] = previous.get(item["hash"])
                    summary.copied_structures += 1
                output = item["output"]
                ref, atoms = item["ref"], item["atoms"]
                writer.append(
                    ref.structure_id, ref.source_file, ref.frame_index, output["latent"],
                    formula=atoms.get_chemical_formula(), info_json=json.dumps(info_fields(atoms.info)),
                    structure_hash=item["hash"], forces=output.get("forces"),
                    node_energy=output.get("node_energy"), energy=output.get("energy"), tag=item["consumed"],
                )
            if time.monotonic() - last_checkpoint > checkpoint_seconds:
                writer.checkpoint()
                last_checkpoint = time.monotonic()
            summary.n_structures = writer.n_structures
            summary.n_atoms = writer.n_atoms_total
            if progress is not None:
                progress(summary.n_structures, summary.n_atoms)
        if writer.n_structures == 0:
            raise InputError(f"{out_path.name}: no structure could be scored ({len(summary.skipped)} skipped)")
        skipped = [{k: v for k, v in s.items() if k != "consumed"} for s in summary.skipped]
        writer.set_attrs({
            "n_structures": writer.n_structures,
            "n_atoms": writer.n_atoms_total,
            "skipped_json": json.dumps(skipped),
        })
        summary.skipped = skipped
        writer.close()
        record.unlink(missing_ok=True)
    except BaseException:
        writer.abort()
        raise
    finally:
        if previous is not None:
            previous.close()
    summary.n_structures = writer.n_structures
    summary.n_atoms = writer.n_atoms_total
    summary.forward_passes = extractor.forward_passes
    summary.wall_s = time.perf_counter() - started
    return summary
