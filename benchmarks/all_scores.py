"""Every default score at scale, against the floors it cannot beat, each in a fresh process.

    .venv/bin/python benchmarks/all_scores.py [--atoms 1000000] [--seeds 4] [--features 128] [--reference 20000]
        [--only faiss --only "a run's"]

Writes S seed files of N atoms x F float32 latents and a training set of R atoms, fits the
family reference on it (timed apart), then times with peak RSS:

- ``read floor``: one plain read of every seed file (netCDF4, chunk by chunk);
- ``torch k-NN floor``: exact ``torch.cdist`` + ``topk`` k-NN of every atom of every seed
  against the reference sample, the latents read in chunks (mace-ood's kernel, torch backend);
- ``faiss IndexFlatL2``: the bare faiss exact search of the same rows, when it is installed
  (the fastest exact search here: the floor the default scores are measured against);
- mace-ood: ``latent_variance`` alone (no reference), and every default score together
  (``compute_scores(...)`` then ``write_scores_netcdf`` on one thread, as a run's score task does). The reference scores share one
  block computation (alignment, Mahalanobis, k-NN, GMM), so they are timed together.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mace_ood.runtime import apply_environment_defaults

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scoring import write_files  # noqa: E402

CHUNK = 16384


def _latent_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("seed-*.nc"))


def method_read(directory: Path, reference: Path) -> None:
    import netCDF4

    for path in _latent_paths(directory):
        with netCDF4.Dataset(path) as ds:
            ds.set_auto_mask(False)
            n = ds["latent"].shape[0]
            for start in range(0, n, CHUNK):
                ds["latent"][start : start + CHUNK].sum()


def method_torch_knn(directory: Path, reference: Path) -> None:
    import netCDF4

    from mace_ood.score.neighbours import knn
    from mace_ood.score.reference import FamilyReference

    ref = FamilyReference.load(reference)
    for path, seed in zip(_latent_paths(directory), ref.seeds, strict=True):
        with netCDF4.Dataset(path) as ds:
            ds.set_auto_mask(False)
            for start in range(0, ds["latent"].shape[0], CHUNK):
                knn(ds["latent"][start : start + CHUNK], seed.sample, ref.knn_k, backend="torch")[1].mean(axis=1)


def method_faiss(directory: Path, reference: Path) -> None:
    import faiss
    import netCDF4
    import numpy as np

    from mace_ood.score.reference import FamilyReference

    ref = FamilyReference.load(reference)
    for path, seed in zip(_latent_paths(directory), ref.seeds, strict=True):
        index = faiss.IndexFlatL2(seed.sample.shape[1])
        index.add(np.ascontiguousarray(seed.sample, dtype=np.float32))
        with netCDF4.Dataset(path) as ds:
            ds.set_auto_mask(False)
            for start in range(0, ds["latent"].shape[0], CHUNK):
                distances, _ = index.search(np.ascontiguousarray(ds["latent"][start : start + CHUNK]), ref.knn_k)
                np.sqrt(np.maximum(distances, 0)).mean(axis=1)


def _scores(directory: Path, reference: Path, backend: str = "auto") -> None:
    """As a run's score task does it: one thread (HDF5 is not thread-safe), its writer."""
    from mace_ood.runtime import hdf5_in_this_thread
    from mace_ood.score.compute import compute_scores
    from mace_ood.score.evaluation import write_scores_netcdf
    from mace_ood.score.latents import open_latents
    from mace_ood.score.reference import FamilyReference

    ref = FamilyReference.load(reference) if reference.name != "none" else None
    if backend != "auto":
        os.environ["MACE_OOD_KNN_BACKEND"] = backend
    with hdf5_in_this_thread(), open_latents(_latent_paths(directory), chunk_atoms=CHUNK) as latents:
        scores = compute_scores(latents, ref)
        with tempfile.TemporaryDirectory() as out:
            write_scores_netcdf(scores, Path(out) / "scores.nc")


METHODS = {
    "read floor (plain netCDF4 read)": method_read,
    "torch k-NN floor (cdist + topk)": method_torch_knn,
    "faiss IndexFlatL2 k-NN": method_faiss,
    "latent_variance only (no reference)": lambda d, r: _scores(d, Path("none")),
    "all default scores (a run's scoring)": lambda d, r: _scores(d, r),
    "all default scores, torch k-NN (faiss not installed)": lambda d, r: _scores(d, r, backend="torch"),
}


def run_child(name: str, directory: str, reference: str) -> None:
    started = time.perf_counter()
    METHODS[name](Path(directory), Path(reference))
    wall = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "peak_rss_mib": rss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", type=int, default=1_000_000)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--reference", type=int, default=20_000)
    parser.add_argument("--only", action="append", help="run only the methods whose name contains this text (repeatable)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(*args.child)
        return
    from mace_ood.config import ScoresConfig
    from mace_ood.records import EvaluationPlan
    from mace_ood.score.evaluation import fit_family_reference

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "data").mkdir()
        (tmp / "train").mkdir()
        write_files(tmp / "data", args.atoms, args.seeds, args.features, CHUNK, "zstd")
        write_files(tmp / "train", int(args.reference / 0.8), args.seeds, args.features, CHUNK, "zstd")
        started = time.perf_counter()
        plan = EvaluationPlan("F", "train", True, tuple(str(p) for p in _latent_paths(tmp / "train")))
        reference = fit_family_reference(plan, tmp, ScoresConfig(reference_max_atoms=args.reference))
        fit_s = time.perf_counter() - started
        print(f"{args.atoms:,} atoms x {args.seeds} seeds x {args.features} channels, reference {args.reference:,} "
              f"atoms (fit: {fit_s:.0f} s); each in a fresh process, under mace-ood's environment defaults\n")
        print("| method | wall | atoms/s | x the torch k-NN | x the faiss k-NN | peak RSS |")
        print("|---|---|---|---|---|---|")
        floor, faiss_floor = None, None
        for name in METHODS:
            if args.only and not any(text in name for text in args.only):
                continue
            if name.startswith("faiss"):
                try:
                    import faiss  # noqa: F401
                except ImportError:
                    print(f"| {name} | not installed | | | | |")
                    continue
            out = subprocess.run([sys.executable, __file__, "--child", name, str(tmp / "data"), reference],
                                 capture_output=True, text=True, env=apply_environment_defaults(dict(os.environ)))
            if out.returncode != 0:
                print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} | | | | |")
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            if name.startswith("torch"):
                floor = result["wall_s"]
            if name.startswith("faiss"):
                faiss_floor = result["wall_s"]
            ratio = f"{result['wall_s'] / floor:.2f}" if floor else ""
            faiss_ratio = f"{result['wall_s'] / faiss_floor:.2f}" if faiss_floor else ""
            print(f"| {name} | {result['wall_s']:.1f} s | {args.atoms / result['wall_s']:,.0f} | {ratio} "
                  f"| {faiss_ratio} | {result['peak_rss_mib']:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
