"""Batching ahead of the model: structures grouped by atom budget (and a count, where set), collated in a
background thread so that reading and neighbour lists overlap the forward passes."""

from __future__ import annotations

from collections.abc import Callable, Iterator


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


def collated(groups: Iterator[list[dict]], collate: Callable[[list], object]) -> Iterator[tuple[list[dict], object]]:
    """Each batch with its graphs collated into one batch by ``collate`` (None when all are copies)."""
    for batch in groups:
        graphs = [item["graph"] for item in batch if "graph" in item]
        yield batch, collate(graphs) if graphs else None


def batches(items: Iterator[dict], batch_size: int | None, max_atoms: int) -> Iterator[list[dict]]:
    """Consecutive items grouped up to ``max_atoms`` atoms and, where given, ``batch_size`` items; a
    structure larger than the budget is a batch of its own."""
    batch: list = []
    atoms_in_batch = 0
    for item in items:
        n_atoms = len(item["atoms"])
        full = batch_size is not None and len(batch) >= batch_size
        if batch and (full or atoms_in_batch + n_atoms > max_atoms):
            yield batch
            batch, atoms_in_batch = [], 0
        batch.append(item)
        atoms_in_batch += n_atoms
    if batch:
        yield batch
