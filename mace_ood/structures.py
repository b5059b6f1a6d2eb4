"""Datasets: globs to files, files to structures with stable ids."""

from __future__ import annotations

import glob
import itertools
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ase.data
import ase.io
import numpy as np
from ase import Atoms


class InputError(ValueError):
    """Bad input data; the message names the file and what is wrong."""


@dataclass(frozen=True)
class StructureRef:
    """Where a structure comes from: enough to read it again, no atoms held."""

    structure_id: str
    source_file: str
    frame_index: int


def resolve_files(patterns: Iterable[str], dataset: str = "") -> list[str]:
    """Expand files and globs into a sorted list of unique existing files.

    Raises
    ------
    InputError
        When a pattern matches nothing.
    """
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            where = f"dataset {dataset!r}: " if dataset else ""
            raise InputError(f"{where}{pattern}: matches no file")
        files.extend(os.path.abspath(m) for m in matches)
    return list(dict.fromkeys(files))


def file_labels(files: list[str]) -> dict[str, str]:
    """A short unique label per file: its stem, or its path below the common folder when stems clash."""
    stems = [Path(f).stem for f in files]
    stem_counts = Counter(stems)  # O(F): list.count in a loop took 40 min for 300,000 files
    clashing = {s for s, n in stem_counts.items() if n > 1}
    if not clashing:
        return dict(zip(files, stems, strict=True))
    common = Path(os.path.commonpath([os.path.dirname(f) for f in files]))

    def longer(path: str, keep_suffix: bool) -> str:
        relative = Path(path).relative_to(common)
        return str(relative if keep_suffix else relative.with_suffix("")).replace(os.sep, "__")

    labels = {f: (longer(f, False) if s in clashing else s) for f, s in zip(files, stems, strict=True)}
    label_counts = Counter(labels.values())
    return {  # a.xyz beside a.cif: keep the suffix too
        f: longer(f, True) if label_counts[label] > 1 else label for f, label in labels.items()
    }


def _read_frames(path: str) -> Iterator[Atoms]:
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: is empty")
    try:
        yield from ase.io.iread(path, index=":", do_not_split_by_at_sign=True)
    except StopIteration:
        return
    except Exception as exc:  # ase raises many types for unreadable input
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: cannot be read as a structure file ({reason})") from exc


def iter_structures(
    files: list[str], on_error: Callable[[StructureRef, str], None] | None = None
) -> Iterator[tuple[StructureRef, Atoms]]:
    """Yield every frame of every file, with its id.

    A single-frame file's id is its label; frames of a multi-frame file are ``label@frame``.
    The atoms come one by one (``ase.io.iread``) so a large trajectory is never held whole.
    A file that cannot be read (or its unreadable rest) raises :class:`InputError`, or with
    ``on_error`` is reported there (ref of the first frame not read, reason) and skipped.
    """
    labels = file_labels(files)
    for path in files:
        label = labels[path]
        n_read = 0
        try:
            frames = _read_frames(path)
            first = next(frames, None)
            if first is None:
                raise InputError(f"{path}: contains no structure")
            second = next(frames, None)
            if second is None:
                n_read = 1
                yield StructureRef(label, path, 0), first
                continue
            for index, atoms in enumerate(itertools.chain([first, second], frames)):
                n_read = index + 1
                yield StructureRef(f"{label}@{index}", path, index), atoms
        except InputError as exc:
            if on_error is None:
                raise
            where = f"{label}@{n_read}" if n_read else label
            on_error(StructureRef(where, path, n_read), str(exc).removeprefix(f"{path}: "))


def count_structures(files: list[str]) -> int:
    """How many frames the files hold (for progress bars): XYZ files by skipping lines, other
    formats through ASE. Unreadable files count 0 (extraction reports them)."""
    total = 0
    for path in files:
        try:
            if path.endswith((".xyz", ".extxyz")):
                with open(path, "rb") as handle:
                    for line in handle:
                        if not line.strip():
                            continue
                        n = int(line.split()[0])
                        for _ in range(n + 1):
                            next(handle)
                        total += 1
            else:
                total += sum(1 for _ in ase.io.iread(path, index=":", do_not_split_by_at_sign=True))
        except Exception:  # noqa: BLE001 - a count is only an estimate
            continue
    return total


def read_structures(refs: list[tuple[str, int]]) -> list[Atoms]:
    """Read many (source_file, frame_index) frames back, each file read once, in the given order.

    (Extended) XYZ files are scanned line by line and only the wanted frames are parsed (parsing
    every frame before the last wanted one took 44 s for 4,000 picks from 100-frame files)."""
    wanted: dict[str, dict[int, list[int]]] = {}
    for position, (source, frame) in enumerate(refs):
        wanted.setdefault(source, {}).setdefault(int(frame), []).append(position)
    out: list[Atoms | None] = [None] * len(refs)
    for source, frames in wanted.items():
        if Path(source).suffix.lower() in (".xyz", ".extxyz"):
            found = _xyz_frames(source, set(frames))
        else:
            last = max(frames)
            found = {i: atoms for i, atoms in enumerate(
                ase.io.iread(source, index=f":{last + 1}", do_not_split_by_at_sign=True)) if i in frames}
        for index, atoms in found.items():
            for n, position in enumerate(frames[index]):
                out[position] = atoms if n == 0 else atoms.copy()
    missing = [refs[i] for i, atoms in enumerate(out) if atoms is None]
    if missing:
        raise InputError(f"{missing[0][0]}: frame {missing[0][1]} not found (has the file changed since the run?)")
    return out  # type: ignore[return-value]


def _xyz_frames(path: str, frames: set[int]) -> dict[int, Atoms]:
    """The ``frames`` of an (extended) XYZ file: frames are counted from their atom-count lines and
    skipped unparsed; each wanted one is parsed by ASE's extxyz reader alone."""
    import io

    out: dict[int, Atoms] = {}
    last = max(frames)
    with open(path, "rb") as handle:
        for index in range(last + 1):
            count_line = handle.readline()
            if not count_line.strip():
                break
            n_atoms = int(count_line)
            lines = [handle.readline() for _ in range(n_atoms + 1)]
            if index in frames:
                out[index] = ase.io.read(io.StringIO((count_line + b"".join(lines)).decode()), format="extxyz")
    return out


MIN_DISTANCE_A = 0.1


def check_structure(atoms: Atoms, allowed_numbers: set[int] | None = None) -> str | None:
    """Why a structure cannot be scored, or None when it can (too-close atoms: see
    :func:`mace_ood.latents.close_atoms`, which reuses the model's neighbour list)."""
    if len(atoms) == 0:
        return "has no atoms"
    positions = atoms.get_positions()
    if not np.all(np.isfinite(positions)):
        return "has NaN or infinite positions"
    if atoms.pbc.any() and atoms.cell.rank < 3:
        return "is periodic but has no full cell"
    if allowed_numbers is not None:
        unknown = sorted(set(atoms.numbers.tolist()) - allowed_numbers)
        if unknown:
            symbols = ", ".join(ase.data.chemical_symbols[z] for z in unknown)
            return f"contains elements the model was not trained on: {symbols}"
    return None

