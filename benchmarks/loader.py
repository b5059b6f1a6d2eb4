"""Benchmark: what the extraction's loader costs per atom, beside the model it feeds.

    .venv/bin/python benchmarks/loader.py [--repeats 5] [--sizes 32 256 2048]

mace-ood reads, checks and builds graphs in a thread beside the model (``StructureFeed``,
``batches``, ``collate`` of ``mace_ood.extract``). On a machine whose cores the model's threads
already fill, every microsecond of it adds to the run; on a GPU it bounds the run. For each size,
on the structures of ``benchmarks/extraction.py`` and its tiny C16 L0 float32 model, this prints
the median microseconds per atom (range in brackets) of each stage run alone, one thread:

- reading the extxyz file (``ase.io.iread``, what ``iter_structures`` uses);
- the structure checks and the content hash;
- the graph (vesin's neighbour list, the arrays the model reads), and mace's own pipeline
  (``config_from_atoms``, ``AtomicData.from_config``) for comparison;
- the close-atoms check on the graph;
- the formula (once per composition) and the info columns of the table;
- the whole loader as it runs (reading to collated batches);
- the model's forward pass over those batches, latents only and forces on, at the process's torch
  threads (the bare loop of ``benchmarks/extraction.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from mace_ood.runtime import apply_environment_defaults

apply_environment_defaults()  # before torch starts OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from extraction import BUDGET, SIZES, bare_loop, dataset, timed  # noqa: E402

from mace_ood.extract.batches import batches, collated  # noqa: E402
from mace_ood.extract.reuse import structure_hash  # noqa: E402
from mace_ood.extract.runner import LatentExtractor, close_atoms  # noqa: E402
from mace_ood.extract.stream import StructureFeed  # noqa: E402
from mace_ood.metadata import info_fields  # noqa: E402
from mace_ood.structures import check_structure, iter_structures  # noqa: E402
from mace_ood.testing import build_tiny_mace  # noqa: E402


def per_atom(seconds: list[float], atoms: int) -> str:
    values = [1e6 * s / atoms for s in seconds]
    return f"{np.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--atoms-per-size", type=int, default=16000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mace-ood-loader-"))
    model_path = workdir / "model.model"
    torch.save(build_tiny_mace(0, atomic_numbers=(29,), channels=16, max_l=0, dtype=torch.float32), model_path)
    extractor = LatentExtractor(model_path, "cpu", "float32")
    import mace.data
    from mace.tools import AtomicNumberTable
    from mace.tools.torch_tools import default_dtype

    table = AtomicNumberTable([29])
    print(f"# loader benchmark: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"C16 L0 float32, microseconds per atom, median of {args.repeats} (range)\n")
    print("| atoms/structure | read (ase) | checks, hash | graph (vesin) | graph (mace's pipeline) | close atoms | "
          "formula, info | whole loader | model, latents only | model, forces on |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n_atoms in args.sizes:
        frames, data = dataset(workdir, n_atoms, args.atoms_per_size)
        total = n_atoms * len(frames)
        read = [a for _, a in iter_structures([str(data)])]
        graphs = [extractor.graph(a) for a in read]

        def mace_graphs(read=read):
            with default_dtype(torch.float32):
                for a in read:
                    mace.data.AtomicData.from_config(mace.data.config_from_atoms(a), z_table=table, cutoff=4.0)

        feed = StructureFeed([str(data)], extractor, None)
        # code before 2026-12-08 made the formula for every structure
        formula = getattr(feed, "formula", lambda atoms: atoms.get_chemical_formula())
        stages = {
            "read": lambda data=data: [a for _, a in iter_structures([str(data)])],
            "checks": lambda read=read: [(check_structure(a, {29}), structure_hash(a)) for a in read],
            "graph": lambda read=read: [extractor.graph(a) for a in read],
            "mace": mace_graphs,
            "close": lambda graphs=graphs: [close_atoms(g) for g in graphs],
            "table": lambda read=read, formula=formula: [(formula(a), json.dumps(info_fields(a.info))) for a in read],
            "loader": lambda data=data: list(collated(batches(iter(StructureFeed([str(data)], extractor, None)),
                                                              None, BUDGET), extractor.collate)),
        }
        times: dict[str, list[float]] = {k: [] for k in [*stages, "latents", "forces"]}
        for _ in range(args.repeats):
            for name, fn in stages.items():
                times[name].append(timed(fn))
            times["latents"].append(bare_loop(model_path, frames, "cpu", "float32", BUDGET // n_atoms, False))
            times["forces"].append(bare_loop(model_path, frames, "cpu", "float32", BUDGET // n_atoms, True))
        print(f"| {n_atoms} | " + " | ".join(per_atom(times[k], total) for k in times) + " |", flush=True)


if __name__ == "__main__":
    main()
