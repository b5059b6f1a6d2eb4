"""An out-of-memory error while a batch is collated, before the model runs (a device whose memory a
big batch exhausts there, where the in-process back-off cannot help): the extraction's ``collated``
replaced by one that raises above an atom budget. In this process through ``monkeypatch``; in a
run's Dask workers through a Dask worker preload (Dask's own ``distributed.worker.preload``)."""

from __future__ import annotations

from pathlib import Path

from mace_ood.extract import batches
from mace_ood.extract.oom import OutOfMemoryError


def budgeted_collated(budget: int):
    def collated(groups, collate):
        for batch, collated_batch in batches.collated(groups, collate):
            n_atoms = int(collated_batch.num_nodes) if collated_batch is not None else 0
            if n_atoms > budget:
                raise OutOfMemoryError(f"out of memory collating {n_atoms} atoms (injected budget {budget})")
            yield batch, collated_batch

    return collated


def inject(budget: int, monkeypatch) -> None:
    """In this process: collating more than ``budget`` atoms runs out of memory."""
    from mace_ood.extract import stream

    monkeypatch.setattr(stream, "collated", budgeted_collated(budget))


def worker_preload_env(budget: int, folder: Path) -> dict[str, str]:
    """Environment for a ``mace-ood run`` subprocess whose Dask workers collate at most ``budget`` atoms."""
    preload = folder / "inject_collation_oom.py"
    preload.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from mace_ood.extract import stream\n"
        "from tests.oom_injection import budgeted_collated\n\n"
        f"stream.collated = budgeted_collated({budget})\n"
    )
    return {"DASK_DISTRIBUTED__WORKER__PRELOAD": f'["{preload}"]'}
