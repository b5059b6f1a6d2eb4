"""One extraction job: stream a model's latents over a dataset into a netCDF file.

Never computes twice what is on disk: finished files are reused, killed runs resume,
and structures whose content is in an earlier file of the same model are copied.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mace_ood.config import ExtractionSettings
from mace_ood.extract.batches import batches, collated, prefetch
from mace_ood.extract.models import ModelError, sha256_of
from mace_ood.extract.reuse import PreviousLatents, inputs_fingerprint, structure_hash
from mace_ood.extract.runner import LatentExtractor, close_atoms
from mace_ood.extract.store import LatentWriter, read_attrs
from mace_ood.files import write_text
from mace_ood.metadata import info_fields
from mace_ood.paths import partial_path, progress_path
from mace_ood.runtime import hdf5_in_this_thread
from mace_ood.structures import InputError, StructureRef, check_structure, iter_structures

log = logging.getLogger(__name__)

FORMAT_VERSION = "4"  # 4: layer_energy (LLPR) stored
# What changes the numbers (the reuse key) and what only changes how they are stored.
NUMERIC_SETTINGS = ("default_dtype", "layers", "forces")
LAYOUT_SETTINGS = ("chunk_atoms", "compression")
# A partial file is made durable after each whole chunk and at least this often: a job killed by its
# walltime or `scancel` loses at most this long of model time (and one batch), whatever the file's
# size. A checkpoint costs 36 ms at 128 latent channels, 66 ms at 256 (forces on; 2-core machine,
# `benchmarks/checkpoint.py`): 0.4-0.7 % of the time at 10 s, against 0.06-0.11 % at the 60 s before.
CHECKPOINT_SECONDS = 10.0


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


def reuse_key(
    model_sha256: str, files: list[str], settings: ExtractionSettings, head: str | None = None,
    llpr_forces: bool = False,
) -> dict[str, str]:
    """What a finished latent file must match for its numbers to be reused: the model's content,
    the inputs' content, what changes the latents (dtype, layers, forces) and the format.
    Batch size, chunking and compression change none of them; the head changes the layer energies
    (LLPR, stored for every model with MACE's readouts), forces and energies, not the latents."""
    numbers = {k: getattr(settings, k) for k in NUMERIC_SETTINGS}
    numbers["head"] = head
    if llpr_forces:  # only when asked: the files of every committee keep their key
        numbers["llpr_forces"] = True
    return {
        "model_sha256": model_sha256,
        "inputs_fingerprint": inputs_fingerprint(files),
        "numeric_settings": json.dumps(numbers, sort_keys=True),
        "format_version": FORMAT_VERSION,
    }


def layout_of(settings: ExtractionSettings) -> str:
    return json.dumps({k: getattr(settings, k) for k in LAYOUT_SETTINGS}, sort_keys=True)


class ResumeRecord:
    """``<out>.progress.json``: how far a killed run may skip (structures durable on disk,
    inputs read up to them, and what was skipped before that point)."""

    def __init__(self, out_path: Path, key: dict[str, str]) -> None:
        self.path = progress_path(out_path)
        self.key = key

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        state = json.loads(self.path.read_text())
        return state if state.get("key") == self.key else None

    def save(self, n_structures: int, n_atoms: int, consumed: int, skipped: list[dict]) -> None:
        state = {
            "key": self.key, "n_structures": n_structures, "n_atoms": n_atoms, "n_consumed": consumed,
            "skipped": [s for s in skipped if s["consumed"] <= consumed],
        }
        write_text(json.dumps(state), self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class StructureFeed:
    """The structures of a job in input order, checked, with the skipped ones recorded.

    Each item is a dict with ``ref``, ``atoms``, ``hash``, ``consumed`` (inputs read so far)
    and either ``graph`` (to compute) or ``copy`` (found in ``previous``).
    """

    def __init__(
        self, files: list[str], extractor: LatentExtractor, previous: PreviousLatents | None,
        skip_inputs: int = 0, skipped: list[dict] | None = None, seen_ids: set[str] | None = None,
    ) -> None:
        self.files = files
        self.extractor = extractor
        self.previous = previous
        self.skip_inputs = skip_inputs
        self.skipped: list[dict] = skipped if skipped is not None else []
        self.consumed = skip_inputs
        self.allowed = set(extractor.atomic_numbers)
        self.seen_ids: set[str] = set(seen_ids or ())  # on resume: every id read before the kill
        self._formulas: dict[bytes, str] = {}

    def formula(self, atoms) -> str:
        """``atoms.get_chemical_formula()``, once per composition (the frames of an MD run share one)."""
        key = atoms.numbers.tobytes()
        if key not in self._formulas:
            if len(self._formulas) > 4096:
                self._formulas.clear()
            self._formulas[key] = atoms.get_chemical_formula()
        return self._formulas[key]

    def skip(self, ref: StructureRef, reason: str, consumed: int) -> None:
        self.skipped.append({**asdict(ref), "reason": reason, "consumed": consumed})
        log.warning("skipped %s (%s): %s", ref.structure_id, ref.source_file, reason)

    def _unreadable(self, ref: StructureRef, reason: str) -> None:
        self.skip(ref, reason, self.consumed)

    def __iter__(self) -> Iterator[dict]:
        for index, (ref, atoms) in enumerate(iter_structures(self.files, on_error=self._unreadable)):
            if index < self.skip_inputs:
                continue
            self.consumed = index + 1
            reason = check_structure(atoms, self.allowed)
            if ref.structure_id in self.seen_ids:
                reason = "duplicate structure id"
            self.seen_ids.add(ref.structure_id)
            if reason is not None:
                self.skip(ref, reason, index + 1)
                continue
            content = structure_hash(atoms)
            # the table's text is made here, in the loader thread, not on the model's thread
            item = {"ref": ref, "atoms": atoms, "hash": content, "output": None, "consumed": index + 1,
                    "formula": self.formula(atoms), "info_json": json.dumps(info_fields(atoms.info))}
            if self.previous is not None and self.previous.has(content):
                item["copy"] = True  # read in the main thread: HDF5 is not thread-safe
            else:
                try:
                    item["graph"] = self.extractor.graph(atoms)
                    reason = close_atoms(item["graph"])
                except Exception as exc:  # noqa: BLE001 - any failure skips this structure only
                    reason = f"graph construction failed: {exc}"
                if reason is not None:
                    self.skip(ref, reason, index + 1)
                    continue
            yield item


def _reused_summary(out_path: Path, model_path: str | Path, model_sha: str, attrs: dict) -> ExtractionSummary:
    return ExtractionSummary(
        path=str(out_path), model_path=str(model_path), model_sha256=model_sha,
        n_structures=int(attrs["n_structures"]), n_atoms=int(attrs["n_atoms"]),
        skipped=json.loads(attrs.get("skipped_json", "[]")), reused=True,
    )


def _file_attrs(key: dict, model_path: str | Path, settings: ExtractionSettings, extractor: LatentExtractor,
                extra: dict | None) -> dict:
    import mace

    return {
        "title": "mace-ood per-atom invariant latents",
        **key,
        "layout": layout_of(settings),
        "extraction_settings": settings.model_dump_json(exclude={"device", "refresh"}),
        "model_file": str(model_path),
        "mace_torch_version": getattr(mace, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "default_dtype": settings.default_dtype,
        "layers": settings.layers,
        "device": extractor.device,
        "head": extractor.head,
        "r_max": extractor.r_max,
        "llpr": extractor.llpr_unsupported or "supported",
        "atomic_numbers": json.dumps(extractor.atomic_numbers),
        **(extra or {}),
    }


def _open_writer(
    out_path: Path, extractor: LatentExtractor, settings: ExtractionSettings, attrs: dict,
    record: ResumeRecord, summary: ExtractionSummary, on_durable: Callable,
) -> tuple[LatentWriter, int]:
    """A writer resuming the ``.partial`` file when its record matches, else a fresh one;
    returns it and the number of inputs to skip."""
    state = record.load() if partial_path(out_path).is_file() else None
    arguments = (out_path, extractor.n_features, settings.default_dtype, attrs, settings.chunk_atoms,
                 settings.compression, settings.forces, on_durable)
    extra = {"n_layer_energies": extractor.n_layer_energies, "n_llpr_jacobian": extractor.n_llpr_jacobian}
    if state is not None:
        try:
            writer = LatentWriter(*arguments, (state["n_structures"], state["n_atoms"]), **extra)
            summary.skipped = state["skipped"]
            summary.resumed_structures = state["n_structures"]
            log.info("resuming %s after %d structures", out_path.name, state["n_structures"])
            return writer, state["n_consumed"]
        except Exception as exc:  # noqa: BLE001 - an unreadable partial file means starting over
            log.warning("cannot resume %s (%s); starting over", partial_path(out_path), exc)
    return LatentWriter(*arguments, **extra), 0


@hdf5_in_this_thread()
def extract_to_netcdf(
    model_path: str | Path,
    files: list[str],
    out_path: str | Path,
    settings: ExtractionSettings,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_atoms_per_forward: int | None = None,
    attrs: dict | None = None,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
    expected_sha256: str | None = None,
    head: str | None = None,
    llpr_forces: bool = False,
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
        Overrides ``settings.batch_size`` (Prefect retries halve it); neither set: batches are
        bounded by ``settings.max_atoms_per_batch`` alone.
    progress
        Called as ``progress(n_structures_done, n_atoms_done)`` after each batch.
    head
        Readout head for forces and energies of a multi-head model (see ``LatentExtractor``).
    llpr_forces
        Also store the LLPR force Jacobian (with ``settings.forces``; see ``LatentExtractor``): for a
        family of one model.
    expected_sha256
        The model file's SHA-256 when the run was planned; a file that changed since is refused
        before it is unpickled.
    """
    out_path = Path(out_path)
    started = time.perf_counter()
    model_sha = sha256_of(model_path)
    if expected_sha256 is not None and model_sha != expected_sha256.lower():
        raise ModelError(
            f"{model_path}: SHA-256 is {model_sha}, but {expected_sha256.lower()} was planned; the file changed "
            "since the run was planned, not loading it"
        )
    llpr_forces = llpr_forces and settings.forces
    key = reuse_key(model_sha, files, settings, head, llpr_forces)
    record = ResumeRecord(out_path, key)
    previous_file = None
    if settings.refresh:
        record.remove()
    elif out_path.is_file():
        existing = read_attrs(out_path)
        same_numbers = all(existing.get(k) == v for k, v in key.items())
        if same_numbers and existing.get("layout") == layout_of(settings):
            return _reused_summary(out_path, model_path, model_sha, existing)
        if all(existing.get(k) == key[k] for k in ("model_sha256", "numeric_settings", "format_version")):
            previous_file = out_path  # same model and numbers: copy what is there, by content

    extractor = LatentExtractor(
        model_path, settings.device, settings.default_dtype, settings.layers, max_atoms_per_forward,
        compute_forces=settings.forces, expected_sha256=model_sha, head=head, llpr_forces=llpr_forces,
    )
    batch_size = batch_size or settings.batch_size
    summary = ExtractionSummary(path=str(out_path), model_path=str(model_path), model_sha256=model_sha)

    def on_durable(n_structures: int, n_atoms: int, consumed: int) -> None:
        record.save(n_structures, n_atoms, consumed, summary.skipped)

    writer, skip_inputs = _open_writer(
        out_path, extractor, settings, _file_attrs(key, model_path, settings, extractor, attrs),
        record, summary, on_durable,
    )
    previous = PreviousLatents(previous_file) if previous_file else None
    seen = set(writer.written_ids()) | {s["structure_id"] for s in summary.skipped} if skip_inputs else set()
    feed = StructureFeed(files, extractor, previous, skip_inputs, summary.skipped, seen)
    try:
        _stream(feed, extractor, writer, summary, batch_size, settings.max_atoms_per_batch,
                progress, checkpoint_seconds)
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
        record.remove()
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


def non_finite_output(output: dict) -> str | None:
    """Why a model output cannot be scored (a NaN or inf latent, force or energy), else None: a
    NaN would otherwise rank as the most unusual structure or poison the reference statistics."""
    for name in ("latent", "forces", "node_energy", "energy", "layer_energy"):
        value = output.get(name)
        if value is None:
            continue
        finite = np.isfinite(np.asarray(value, dtype=float))
        if finite.all():
            continue
        if finite.ndim == 0:
            return f"the model's {name} is not finite"
        bad_atoms = int((~finite.reshape(len(finite), -1).all(axis=1)).sum())
        return f"the model's {name.replace('_', ' ')} is not finite on {bad_atoms} of {len(finite)} atoms"
    return None


def _stream(
    feed: StructureFeed, extractor: LatentExtractor, writer: LatentWriter, summary: ExtractionSummary,
    batch_size: int | None, max_atoms: int, progress: Callable[[int, int], None] | None, checkpoint_seconds: float,
) -> None:
    """Compute (or copy) every structure of ``feed`` batch by batch and append it to ``writer``;
    ``summary.smallest_batch`` is the largest batch computed, or, after an out-of-memory, the
    smallest the back-off split one to."""
    backed_off = False

    def on_backoff(size: int) -> None:
        nonlocal backed_off
        summary.smallest_batch = max(size, 1) if not backed_off else min(summary.smallest_batch, max(size, 1))
        backed_off = True
        if size:
            log.warning("out of memory: batch split to %d structures", size)
        else:
            summary.split_structures += 1
            log.warning("out of memory on a single structure: computing it by spatial domains")

    last_checkpoint = time.monotonic()
    # reading, checks and neighbour lists run in a background thread, overlapping the model
    for batch, collated_batch in prefetch(collated(batches(iter(feed), batch_size, max_atoms), extractor.collate)):
        todo = [item for item in batch if "graph" in item]
        graphs = [item["graph"] for item in todo]
        structures = [item["atoms"] for item in todo]
        if not backed_off:
            summary.smallest_batch = max(summary.smallest_batch, len(graphs))
        computed = extractor.outputs(graphs, on_backoff, structures, collated_batch) if graphs else []
        for item, output in zip(todo, computed, strict=True):
            item["output"] = output
        summary.computed_structures += len(todo)
        for item in batch:
            if item.get("copy"):
                item["output"] = feed.previous.get(item["hash"])
                summary.copied_structures += 1
            output = item["output"]
            ref = item["ref"]
            reason = non_finite_output(output)
            if reason is not None:
                feed.skip(ref, reason, item["consumed"])
                continue
            writer.append(
                ref.structure_id, ref.source_file, ref.frame_index, output["latent"],
                formula=item["formula"], info_json=item["info_json"],
                structure_hash=item["hash"], forces=output.get("forces"),
                node_energy=output.get("node_energy"), energy=output.get("energy"), tag=item["consumed"],
                layer_energy=output.get("layer_energy"), llpr_force_jacobian=output.get("llpr_force_jacobian"),
            )
        if time.monotonic() - last_checkpoint > checkpoint_seconds:
            writer.checkpoint()
            last_checkpoint = time.monotonic()
        summary.n_structures = writer.n_structures
        summary.n_atoms = writer.n_atoms_total
        if progress is not None:
            progress(summary.n_structures, summary.n_atoms)
