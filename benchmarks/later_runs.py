"""A notebook's later runs: ``mace_ood.run`` called again and again in one process, no
``PREFECT_API_URL`` (each run starts its temporary Prefect server).

Each run's wall time and the pid of multiprocessing's forkserver its local workers forked from:
the same pid means the later run did not pay the preloads (torch, e3nn, mace, Prefect) again.
The project is the test suite's tiny two-family one (``tests/synthetic.make_project``: random-weight
models, 12 extraction jobs, one single-threaded worker), each run into a new output folder.

    PYTHONPATH=. python benchmarks/later_runs.py --runs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from mace_ood.runtime import apply_environment_defaults

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one worker thread: local workers fork (cluster.can_fork_workers)
apply_environment_defaults()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from multiprocessing import forkserver

    import mace_ood
    from tests.synthetic import make_project

    root = Path(tempfile.mkdtemp(prefix="mace-ood-later-runs-"))
    try:
        config = make_project(root / "project")
        print("| run | wall (s) | forkserver pid |\n|---|---|---|")
        for index in range(args.runs):
            start = time.perf_counter()
            mace_ood.run(config, output_dir=str(root / f"run{index}"))
            wall = time.perf_counter() - start
            print(f"| {index + 1} | {wall:.1f} | {forkserver._forkserver._forkserver_pid} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # workers fork or spawn: the module must not run again in them
    main()
