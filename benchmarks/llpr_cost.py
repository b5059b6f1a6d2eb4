"""What LLPR adds to extraction: wall time and latent file size, with and without ``layer_energy``.

    .venv/bin/python benchmarks/llpr_cost.py [--repeats 3] [--forces | --jacobian]

Runs ``extract_to_netcdf`` of the demo's first T1 model over the demo's T1 training set (run
``make demo`` first: it trains and caches the models and writes ``demo_work/``), alternating
with LLPR's stored layer energies and without them (the model reported unsupported), each
``--repeats`` times in this process; prints the medians as a markdown table. ``--jacobian``:
forces with and without the LLPR force Jacobian (``llpr_forces``, what a family of one model stores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

from mace_ood.runtime import apply_environment_defaults

apply_environment_defaults()  # before torch starts OpenMP

import yaml  # noqa: E402

from mace_ood.config import ExtractionSettings  # noqa: E402
from mace_ood.extract.stream import extract_to_netcdf  # noqa: E402

DEMO = Path("demo_work")


def demo_inputs() -> tuple[Path, list[str]]:
    config = yaml.safe_load((DEMO / "config.yaml").read_text())
    model = Path(config["model_families"]["MACE_T1"]["models"][0])
    files = sorted(str(p) for pattern in config["datasets"]["T1"] for p in DEMO.glob(pattern))
    return (model if model.is_absolute() else DEMO / model), files


def one(model: Path, files: list[str], settings: ExtractionSettings, llpr: bool, out: Path,
        jacobian: bool = False) -> tuple[float, int]:
    out.unlink(missing_ok=True)
    patch = (mock.patch("mace_ood.extract.runner.llpr_unsupported", return_value="benchmark: off")
             if not llpr and not jacobian else mock.patch.dict(os.environ, {}))
    with patch:
        started = time.perf_counter()
        extract_to_netcdf(model, files, out, settings, llpr_forces=jacobian and llpr)
        return time.perf_counter() - started, out.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forces", action="store_true", help="extract forces too (the run's default)")
    parser.add_argument("--jacobian", action="store_true",
                        help="forces, without and with the LLPR force Jacobian (a family of one model)")
    args = parser.parse_args()
    model, files = demo_inputs()
    args.forces = args.forces or args.jacobian
    settings = ExtractionSettings(device="cpu", default_dtype="float64", forces=args.forces)
    times: dict[bool, list[float]] = {True: [], False: []}
    sizes: dict[bool, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for llpr in (False, True):
                wall, size = one(model, files, settings, llpr, Path(tmp) / f"llpr_{llpr}.nc", args.jacobian)
                times[llpr].append(wall)
                sizes[llpr] = size
    base, with_llpr = statistics.median(times[False]), statistics.median(times[True])
    print(f"model {model.name}, {len(files)} file(s), float64, forces={args.forces}, {args.repeats} repeats (median)\n")
    print("| extraction | wall (s) | file (kB) |")
    print("|---|---|---|")
    names = ("forces, layer_energy", "+ llpr_force_jacobian") if args.jacobian else ("latents only", "+ layer_energy (LLPR)")
    print(f"| {names[0]} | {base:.2f} | {sizes[False] / 1024:.0f} |")
    print(f"| {names[1]} | {with_llpr:.2f} | {sizes[True] / 1024:.0f} |")
    print(f"| ratio | {with_llpr / base:.3f} | {sizes[True] / sizes[False]:.3f} |")


if __name__ == "__main__":
    main()
