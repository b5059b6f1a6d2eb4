"""Benchmark 8: the reference fit plus the calibration of a family's training set, out of fold
against a baseline checkout (e.g. the frame-block split before runs were found), on the same latent files.

    .venv/bin/python benchmarks/reference_fit.py --baseline /path/to/old/checkout [--atoms 100000 1000000]

Writes S seed files of N atoms x F float32 latents (structures of 32 atoms, every run of
``--run-frames`` structures its own formula label so that runs are found without the source
files), then, each in a fresh process of the same interpreter with ``PYTHONPATH`` set to the code
under test, times ``fit_family_reference`` + ``score_evaluation`` of the training set +
``calibrate_run`` (the ``ood`` flag's p-values of every training structure), with the peak RSS.
Prints a markdown table with the ratio of this checkout's time to the baseline's.
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

import numpy as np

from mace_ood.runtime import apply_environment_defaults

ATOMS_PER_STRUCTURE = 32
HERE = Path(__file__).resolve().parents[1]


def write_files(directory: Path, n_atoms: int, seeds: int, features: int, run_frames: int) -> list[str]:
    from mace_ood.extract.store import LatentWriter

    rng = np.random.default_rng(0)
    n_structures = n_atoms // ATOMS_PER_STRUCTURE
    centres = rng.standard_normal((n_structures // run_frames + 1, features)).astype(np.float32)
    paths = []
    for s in range(seeds):
        path = directory / f"seed-{s}.nc"
        mix = np.linalg.qr(np.random.default_rng(100 + s).standard_normal((features, features)))[0].astype(np.float32)
        with LatentWriter(path, features, "float32", chunk_atoms=16384) as writer:
            for i in range(n_structures):
                run = i // run_frames
                block = centres[run] + 0.3 * rng.standard_normal((ATOMS_PER_STRUCTURE, features)).astype(np.float32)
                writer.append(f"s{i}", "/gone/train.extxyz", i, block @ mix, formula=f"Cu32_run{run}")
        paths.append(str(path))
    return paths


def child(directory: str, paths: list[str]) -> None:
    """Runs in a fresh process, under the code on PYTHONPATH."""
    import dask

    from mace_ood.config import ScoresConfig, SelectConfig
    from mace_ood.records import EvaluationPlan
    from mace_ood.score.calibrate import calibrate_run
    from mace_ood.score.evaluation import fit_family_reference, score_evaluation
    from mace_ood.score.tables import evaluation_table

    dask.config.set(scheduler="synchronous")
    own = EvaluationPlan("F", "train", True, tuple(paths))
    scores = ScoresConfig(gmm_components=[1, 2])
    select = SelectConfig(combine=["mahalanobis_max", "knn_distance_max"])
    started = time.perf_counter()
    reference = fit_family_reference(own, directory, scores)
    fitted = time.perf_counter()
    scores_file = score_evaluation(own, directory, 16384, reference)
    scored = time.perf_counter()
    table = evaluation_table(scores_file, "F", "train", True, None, metadata=False)
    delivered = calibrate_run({own.label: table}, [own], {own.label: scores_file}, select)["F"]
    done = time.perf_counter()
    print(json.dumps({"fit": fitted - started, "score": scored - fitted, "calibrate": done - scored,
                      "total": done - started, "ood": int(table["ood"].sum()),
                      "groups": delivered.get("n_groups", delivered["n_calibration"]),
                      "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def measure(code: Path, directory: Path, paths: list[str]) -> dict:
    env = {**apply_environment_defaults(dict(os.environ)), "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", str(directory), *paths], env=env, check=True,
                         capture_output=True, text=True, cwd=str(code))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout of the code to compare against")
    parser.add_argument("--atoms", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--run-frames", type=int, default=100)
    args = parser.parse_args()
    print("| atoms | runs | code | fit | score training set | calibrate | total | ratio | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n_atoms in args.atoms:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "latents"
            data.mkdir()
            paths = write_files(data, n_atoms, args.seeds, args.features, args.run_frames)
            results = {}
            for name, code in (("baseline", args.baseline.resolve()), ("this checkout", HERE)):
                work = Path(tmp) / name.replace(" ", "_")
                work.mkdir()
                results[name] = r = measure(code, work, paths)
                ratio = r["total"] / results["baseline"]["total"]
                runs = n_atoms // ATOMS_PER_STRUCTURE // args.run_frames
                print(f"| {n_atoms:,} | {runs} | {name} | {r['fit']:.1f} s | {r['score']:.1f} s | {r['calibrate']:.1f} s "
                      f"| {r['total']:.1f} s | {ratio:.2f} | {r['rss_gib']:.2f} GiB |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
    else:
        main()
