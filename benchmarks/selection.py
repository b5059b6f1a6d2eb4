"""Diverse selection at scale: 10^6 synthetic candidates, K = 1000, on this machine.

Prints a markdown table: wall time and peak RSS of ``select_diverse`` against a plain
top-K (``np.argpartition``) in the same process, for N candidates x d channels with a
preloaded training set of T structures.

    python benchmarks/selection.py [--n 1000000] [--k 1000] [--d 128] [--training 10000]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from mace_ood.select.diverse import select_diverse


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--training", type=int, default=10_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(200, args.d)).astype(np.float32) * 3
    candidates = centres[rng.integers(0, 200, args.n)] + rng.normal(size=(args.n, args.d)).astype(np.float32)
    training = rng.normal(size=(args.training, args.d)).astype(np.float32)
    scores = rng.random(args.n)
    rss_data = peak_rss_gib()
    started = time.perf_counter()
    top = np.argpartition(-scores, args.k)[: args.k]
    top_s = time.perf_counter() - started
    started = time.perf_counter()
    picks = select_diverse(candidates, scores, args.k, training)
    diverse_s = time.perf_counter() - started
    assert len(set(picks.order)) == args.k and len(top) == args.k
    print("| N candidates | d | T training | K | top-K (argpartition) | diverse | peak RSS (data alone) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.n:,} | {args.d} | {args.training:,} | {args.k} | {top_s:.2f} s | {diverse_s:.0f} s "
          f"| {peak_rss_gib():.2f} GiB ({rss_data:.2f} GiB) |")


if __name__ == "__main__":
    main()
