"""CPU-seconds of every process on the machine while a command runs, by kind of process.

Samples every process each 0.3 s (psutil), keeps each one's last CPU time (a process seen
before the command started counts only what it used since), and sums them by kind, named from
the command line (Dask workers, Prefect servers, pytest-xdist workers, ...). What the README's
"what takes the time" for `make test` comes from:

    python benchmarks/cpu_by_process.py make test

``CPU_BY_PROCESS_TOP=N`` lists the N processes that used the most, with their command lines.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time

import psutil

KINDS = (  # first match wins
    (("spawn_main", "forkserver"), "Dask worker processes (spawned or forked) and forkservers"),
    (("uvicorn", "server start"), "Prefect servers"),
    (("distributed.cli",), "`dask worker`/`dask scheduler` processes"),
    (("mace_ood.cli serve",), "`mace-ood serve`"),
    (("mace_ood.cli", "mace-ood"), "`mace-ood` processes"),
    (("exec(eval(sys.stdin",), "pytest-xdist workers"),
    (("chrom",), "chromium"),  # before pytest: its --user-data-dir is a pytest temporary folder
    (("pytest",), "pytest"),
    (("gpu_check",), "`make gpu-check --quick`"),
)


def kind(command_line: str) -> str:
    for needles, name in KINDS:
        if any(needle in command_line for needle in needles):
            return name
    return command_line[:70] or "(exited before its command line was read)"


def main() -> None:
    started = time.time()
    process = subprocess.Popen(sys.argv[1:])
    seen: dict[tuple[int, float], tuple[float, str, float]] = {}  # (pid, created) -> (cpu, command, base)
    while process.poll() is None:
        for proc in psutil.process_iter(["pid", "cmdline", "cpu_times", "create_time"]):
            try:
                times, created = proc.info["cpu_times"], proc.info["create_time"]
                cpu = times.user + times.system
                key = (proc.info["pid"], created)
                old = seen.get(key)
                base = old[2] if old else (cpu if created < started else 0.0)
                seen[key] = (cpu - base, " ".join(proc.info["cmdline"] or []) or (old[1] if old else ""), base)
            except (psutil.Error, TypeError):
                pass
        time.sleep(0.3)
    by_kind, count = collections.Counter(), collections.Counter()
    for cpu, command, _ in seen.values():
        by_kind[kind(command)] += cpu
        count[kind(command)] += 1
    print(f"\n{time.time() - started:.0f} s wall; CPU-s by kind of process:\n")
    print("| CPU-s | processes | kind |\n|---|---|---|")
    for name, cpu in by_kind.most_common(20):
        print(f"| {cpu:.1f} | {count[name]} | {name} |")
    print(f"| {sum(by_kind.values()):.1f} | {sum(count.values())} | all |")
    top = int(os.environ.get("CPU_BY_PROCESS_TOP", "0"))
    if top:
        print(f"\nThe {top} processes that used the most CPU:\n")
        for cpu, command, _ in sorted(seen.values(), key=lambda v: -v[0])[:top]:
            print(f"{cpu:7.1f}  {command[:160]}")
    sys.exit(process.returncode)


if __name__ == "__main__":
    main()
