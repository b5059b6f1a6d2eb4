"""Remake the committed trained test models: ``python -m tests.data.make_models [FAMILY ...]`` (about 2
min on 2 cores). Each family's training file (:data:`tests.trained.TRAINING_SETS`) is trained with mace's own
CLI, ``N_SEEDS`` seeds, tiny settings (8 scalar channels, 2 layers), and the file's fingerprint is
written to ``manifest.json`` so tests can tell when their regenerated data no longer match."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mace_ood.runtime import apply_environment_defaults
from tests.trained import (
    MANIFEST,
    MODELS_DIR,
    N_SEEDS,
    TRAINING_SETS,
    fingerprint,
    training_frames,
    write_training_file,
)

TRAIN_ARGS = (
    "--model=ScaleShiftMACE", "--num_channels=8", "--max_L=0", "--num_interactions=2",
    "--correlation=2", "--r_max=4.0", "--batch_size=8", "--max_num_epochs=12", "--lr=0.01",
    "--energy_weight=10", "--forces_weight=100", "--E0s=average", "--energy_key=REF_energy",
    "--forces_key=REF_forces", "--default_dtype=float32", "--device=cpu", "--save_cpu",
    "--valid_fraction=0.1", "--eval_interval=4",
)


def train(train_file: Path, family: str, seed: int) -> tuple[Path, float]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mace-ood-test-model-") as work:
        command = [sys.executable, "-m", "mace.cli.run_train", f"--name={family}", f"--train_file={train_file}",
                   f"--seed={seed}", f"--work_dir={work}", *TRAIN_ARGS]
        env = {**apply_environment_defaults(dict(os.environ)), "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"mace_run_train failed for {family} seed {seed}:\n{result.stdout[-3000:]}")
        target = MODELS_DIR / f"{family}_seed{seed}.model"
        shutil.copyfile(Path(work) / f"{family}.model", target)
    return target, time.perf_counter() - started


def main(families: list[str]) -> None:
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}
    with tempfile.TemporaryDirectory() as data:
        jobs = []
        for family in families or TRAINING_SETS:
            path = write_training_file(family, Path(data), check=False)
            manifest[family] = {"fingerprint": fingerprint(training_frames(family)), "train_args": list(TRAIN_ARGS)}
            jobs += [(path, family, seed) for seed in range(N_SEEDS)]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for target, seconds in pool.map(lambda job: train(*job), jobs):
                print(f"{target.name}: {seconds:.0f} s, {target.stat().st_size / 1024:.0f} kB", flush=True)
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])  # the families to remake (default all)
