"""The independent units of a training set: its MD runs.

A MACE training file is usually a handful of MD runs concatenated (mace's CLI takes one
``train_file``), each at its own temperature, strain, composition or ordering. Frames of one run
are correlated; runs are what is drawn independently, so runs, not frames, are what the ``ood``
flag and the error bounds are calibrated over (:mod:`mace_ood.score.calibrate`).

:func:`run_starts` finds where a new run begins in a multi-frame file. Between consecutive frames
a run ends where

- the atom count, the species order or the periodicity changes;
- the cell jumps: its relative change is above ``JUMP_RATIO`` times the median change of the
  steps around it (NPT breathing; 0 under NVT, so any change counts), capped at
  ``CELL_JUMP_CAP`` so that a file of unrelated cells (every frame different) is split everywhere;
- the atoms jump: their RMS minimum-image displacement is above ``DISPLACEMENT_FLOOR`` Angstrom and
  above ``JUMP_RATIO`` times the file's median (farther than an MD step moves them);
- an MD counter in ``atoms.info`` (``step``, ``time``, ``md_step``, ``timestep``) does not increase.

Two runs of the same cell at nearby temperatures, each starting from the lattice, look like one run
at this level: ``scores.group_by`` names an ``atoms.info`` key (mace's ``config_type``, a trajectory
id) or ``file`` instead. When the whole training set holds one group, fixed blocks of frames are
the last resort, and the run says so.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms

from mace_ood.structures import InputError, _read_frames

JUMP_RATIO = 5.0
LOCAL_WINDOW = 5  # steps on each side whose median change is "what this stretch moves per step"
CELL_JUMP_FLOOR = 1e-6  # relative (Frobenius): rounding in a written file is below it
CELL_JUMP_CAP = 0.02  # a 2 % cell change between consecutive frames is never one MD step
DISPLACEMENT_FLOOR = 0.5  # Angstrom, RMS over atoms
MD_COUNTERS = ("step", "md_step", "timestep", "time")
AUTO, FILE, BLOCKS = "auto", "file", "blocks"


@dataclass
class Grouping:
    """Each structure's group (its independent unit) and how the groups were found."""

    labels: np.ndarray  # (structure,) str
    method: str  # "runs", "file", "blocks" or "info:<key>"
    notes: list[str] = field(default_factory=list)

    @property
    def sizes(self) -> list[int]:
        return list(Counter(self.labels.tolist()).values())

    @property
    def n_groups(self) -> int:
        return len(set(self.labels.tolist()))

    def describe(self) -> str:
        """``12 runs (found from the frames) of 4-30 frames``: for logs and ``validate``."""
        sizes = self.sizes
        what = {"runs": "runs (found from the frames)", "file": "files (scores.group_by: file)",
                "blocks": "blocks of consecutive frames (no runs found: the last resort)"}.get(
            self.method, f"groups by atoms.info[{self.method.removeprefix('info:')!r}]")
        span = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
        return f"{self.n_groups} {what} of {span} frames"


@dataclass
class _Frame:
    n: int
    species: bytes
    pbc: tuple[bool, ...]
    cell: np.ndarray
    scaled: np.ndarray
    counter: float | None


def _summary(atoms: Atoms) -> _Frame:
    counter = next((atoms.info[k] for k in MD_COUNTERS
                    if isinstance(atoms.info.get(k), int | float | np.integer | np.floating)), None)
    scaled = atoms.get_scaled_positions(wrap=False) if atoms.cell.rank == 3 else atoms.positions
    return _Frame(len(atoms), hashlib.sha1(atoms.numbers.tobytes()).digest(), tuple(bool(p) for p in atoms.pbc),
                  np.array(atoms.cell[:]), scaled, None if counter is None else float(counter))


def _changes(a: _Frame, b: _Frame) -> tuple[bool, float, float]:
    """(a hard break, relative cell change, RMS minimum-image displacement in Angstrom)."""
    if a.n != b.n or a.species != b.species or a.pbc != b.pbc:
        return True, np.nan, np.nan
    if a.counter is not None and b.counter is not None and b.counter <= a.counter:
        return True, np.nan, np.nan
    norm = max(float(np.linalg.norm(a.cell)), 1e-12)
    cell_change = float(np.linalg.norm(b.cell - a.cell)) / norm
    if np.linalg.matrix_rank(b.cell) == 3:
        delta = b.scaled - a.scaled
        periodic = np.array(b.pbc)
        delta[:, periodic] -= np.round(delta[:, periodic])
        delta = delta @ b.cell
    else:
        delta = b.scaled - a.scaled
    return False, cell_change, float(np.sqrt(np.mean(np.sum(delta**2, axis=1))))


def _local_level(changes: np.ndarray, window: int = LOCAL_WINDOW) -> np.ndarray:
    """Per step, the larger of the medians of the ``window`` steps before it and after it (itself
    left out, NaN ignored; 0 where there are none): how much this stretch of the file moves per
    step, on the side of the boundary that moves more."""
    level = np.zeros(len(changes))
    for i in range(len(changes)):
        sides = [changes[max(0, i - window) : i], changes[i + 1 : i + 1 + window]]
        medians = [np.median(side[np.isfinite(side)]) for side in sides if np.isfinite(side).any()]
        level[i] = max(medians, default=0.0)
    return level


def run_starts(frames: Iterable[Atoms]) -> np.ndarray:
    """Per frame, True where a new run begins (the first frame always does)."""
    hard, cell, moved = [True], [np.nan], [np.nan]
    previous = None
    for atoms in frames:
        current = _summary(atoms)
        if previous is not None:
            h, c, d = _changes(previous, current)
            hard.append(h), cell.append(c), moved.append(d)
        previous = current
    hard_arr, cell_arr, moved_arr = np.array(hard), np.array(cell), np.array(moved)
    starts = hard_arr.copy()
    breathing = _local_level(cell_arr)  # 0 under NVT: any change is a new run
    starts |= cell_arr > np.maximum(CELL_JUMP_FLOOR, np.minimum(JUMP_RATIO * breathing, CELL_JUMP_CAP))
    if np.isfinite(moved_arr).any():
        starts |= moved_arr > max(DISPLACEMENT_FLOOR, JUMP_RATIO * float(np.nanmedian(moved_arr)))
    return starts


def find_groups(
    source_files: np.ndarray, frame_index: np.ndarray, group_by: str = AUTO, block_frames: int = 10,
    n_atoms: np.ndarray | None = None, formula: np.ndarray | None = None, info_json: np.ndarray | None = None,
    found_runs: dict[str, np.ndarray] | None = None,
) -> Grouping:
    """Each structure's group, structures given by their source file and frame index (and, from the
    latent files, their atom counts, formulas and ``atoms.info`` as JSON).

    ``group_by``: ``auto`` (runs found by :func:`run_starts` in each file, read again; a file that
    is gone falls back to changes of atom count and formula), ``file``, ``blocks``
    (``block_frames`` consecutive frames of a file), or an ``atoms.info`` key (its value names the
    group, across files). ``auto`` falls back to blocks when the whole set is one run.
    ``found_runs``: per file, each frame's run where the file was already read (:func:`file_runs`).
    """
    files = np.asarray(source_files).astype(str)
    frames = np.asarray(frame_index, dtype=np.int64)
    names = np.array([Path(f).name for f in files], dtype=object)
    if group_by == FILE:
        return Grouping(names.astype(str), FILE)
    if group_by == BLOCKS:
        return _blocks(names, frames, block_frames, BLOCKS)
    if group_by != AUTO:
        return Grouping(_info_groups(files, frames, group_by, info_json), f"info:{group_by}")
    labels = np.empty(len(files), dtype=object)
    notes = []
    for path in dict.fromkeys(files.tolist()):
        rows = np.flatnonzero(files == path)
        rows = rows[np.argsort(frames[rows], kind="stable")]
        if found_runs is not None and path in found_runs or Path(path).is_file():
            run_of_frame = found_runs[path] if found_runs and path in found_runs else file_runs(path)
            if frames[rows].max() >= len(run_of_frame):
                raise InputError(f"{path}: frame {frames[rows].max()} not found (has the file changed since extraction?)")
            run = run_of_frame[frames[rows]]
        else:
            if n_atoms is None or formula is None:
                raise InputError(f"{path}: cannot be read to find its MD runs (scores.group_by: auto)")
            keys = [f"{n}|{f}" for n, f in zip(np.asarray(n_atoms)[rows], np.asarray(formula)[rows], strict=True)]
            run = np.cumsum([True] + [a != b for a, b in zip(keys[:-1], keys[1:], strict=True)]) - 1
            notes.append(f"{path}: not readable now; its runs were found from atom counts and formulas only")
        labels[rows] = [f"{Path(path).name}#run{int(r)}" for r in run]
    grouping = Grouping(labels.astype(str), "runs", notes)
    if grouping.n_groups == 1 and len(files) > block_frames:
        blocks = _blocks(names, frames, block_frames, BLOCKS)
        blocks.notes.append(
            f"no run boundary found in {len(files)} frames: calibrated over {blocks.n_groups} blocks of {block_frames} "
            "consecutive frames, which are not independent; the stated rates are optimistic. Name the runs with "
            "scores.group_by (an atoms.info key such as config_type) or give each run its own file")
        return blocks
    return grouping


def file_runs(path: str) -> np.ndarray:
    """Each frame's run (0, 1, ...) in one file, read once, frame by frame."""
    return np.cumsum(run_starts(_read_frames(path))) - 1


def groups_of_files(files: list[str], group_by: str = AUTO, block_frames: int = 10) -> Grouping:
    """:func:`find_groups` of every frame of a dataset's files, each file read once (``mace-ood
    validate``, before anything is extracted)."""
    source, index, info, runs = [], [], [], {}
    for path in files:
        values: list[str] = []

        def frames(path: str = path, values: list[str] = values):
            for atoms in _read_frames(path):
                values.append(json.dumps({group_by: str(atoms.info[group_by])} if group_by in atoms.info else {}))
                yield atoms

        runs[path] = np.cumsum(run_starts(frames())) - 1
        source += [path] * len(values)
        index += list(range(len(values)))
        info += values
    return find_groups(np.array(source), np.array(index), group_by, block_frames, info_json=np.array(info),
                       found_runs=runs)


def _info_groups(files: np.ndarray, frames: np.ndarray, key: str, info_json: np.ndarray | None) -> np.ndarray:
    """Each structure's ``atoms.info[key]``, from the latent files' JSON copy of ``atoms.info``."""
    if info_json is None:
        raise InputError(f"scores.group_by: {key}: the latent files hold no atoms.info to read it from")
    labels = []
    for path, frame, text in zip(files, frames, np.asarray(info_json).astype(str), strict=True):
        info = json.loads(text) if text else {}
        if key not in info:
            raise InputError(f"{path}: frame {frame} has no atoms.info[{key!r}] (scores.group_by: {key})")
        labels.append(str(info[key]))
    return np.array(labels, dtype=str)


def _blocks(names: np.ndarray, frames: np.ndarray, block_frames: int, method: str) -> Grouping:
    return Grouping(np.array([f"{n}#block{int(i) // block_frames}" for n, i in zip(names, frames, strict=True)]),
                    method)
