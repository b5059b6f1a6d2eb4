"""Local Dask workers ignore SIGINT: imported by the forkserver they fork from (its preloads,
``mace_ood.cluster``) and by each spawned worker (a Dask worker preload). A terminal's Ctrl-C reaches the
whole process group; a worker interrupted in its task logged a warning under the run's one-line message
(``Async instruction for <Task cancelled ...>``, benchmarks/interrupts.py) before the run's owner killed
it. The owner stops them: at once on a signal (:func:`mace_ood.runtime.stop_on_signals`), through their
nanny on a normal close. Importing it anywhere else would make that process ignore Ctrl-C: it is
imported only there."""

import signal
import threading


def ignore_interrupts() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


ignore_interrupts()  # the forkserver: CPython captures its handlers after the preloads, restores them in each child


def dask_setup(worker) -> None:  # a Dask worker preload: the spawned worker's own process
    ignore_interrupts()
