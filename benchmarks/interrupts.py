"""Interrupts as a guarantee: a real `mace-ood run` stopped in the middle of its extraction, again
and again, on a loaded machine.

Cases: Ctrl-C to the process group (a terminal), SIGTERM to the group (SLURM at the walltime),
SIGTERM to the process (``kill``), SIGTERM to the group of a run against a configured Prefect server,
and a Prefect cancellation of a served deployment's run. Each CLI pass starts ``mace-ood run`` as a
user's shell does (no ``PREFECT_API_URL``: it starts its own temporary server; or the configured
one), waits until some structures are durable, sends the signal and counts: stopped within 10 s,
exit status 128 + signal (configured server: and both of the run's flow runs ``Crashed`` there),
the one-line message and nothing else on stderr after it (no filter: every traceback counts), no
process of the run left (nor a zombie). A cancellation pass
triggers the deployment that one ``mace-ood serve`` serves, waits the same way, sets the run
Cancelling through the API and counts: the run's process and workers gone within 10 s, the run
Cancelled. Every pass is then run again from this process (``mace_ood.run``) and its scores are
compared with an uninterrupted run's. ``--load N`` busy-loop processes run beside it all.

    python benchmarks/interrupts.py --repeats 10 --load 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from mace_ood.runtime import apply_environment_defaults

apply_environment_defaults()  # the harness's own server and client too
CASES = {"ctrl-c to the group": (signal.SIGINT, True, False), "SIGTERM to the group": (signal.SIGTERM, True, False),
         "SIGTERM to the process": (signal.SIGTERM, False, False),
         "SIGTERM to the group, configured server": (signal.SIGTERM, True, True),
         "Prefect cancellation": (None, False, False)}
STOP_WITHIN_S = 10.0


def burn() -> None:
    while True:
        pass


def make_big_project(folder: Path) -> Path:
    import ase.io

    from mace_ood.testing import random_structures
    from tests.synthetic import make_project

    config = make_project(folder)
    ase.io.write(config.parent / "data" / "T2" / "md_big.xyz", random_structures(120, seed=8, sizes=(2,)))
    return config


def scores_of(run_dir: Path):
    import pandas as pd

    return pd.read_csv(run_dir / "scores.csv").drop(columns=["source_file"])


def wait_for_durable(run_dir: Path, alive, timeout_s: float = 300) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        for record in run_dir.glob("latents/*/T2/*.progress.json"):
            try:
                if json.loads(record.read_text() or "{}").get("n_structures", 0) > 0:
                    return True
            except (OSError, ValueError):  # replaced while read
                pass
        time.sleep(0.05)
    return False


def living(processes) -> list:
    import psutil

    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def stop_serve(serve: subprocess.Popen) -> None:
    serve.terminate()
    try:
        serve.wait(timeout=30)
    except subprocess.TimeoutExpired:
        print("`mace-ood serve` did not exit within 30 s of SIGTERM: killed", flush=True)
        serve.kill()


def cancel_pass(client, serve_pid: int, run_dir: Path) -> dict:
    """Trigger the served deployment, cancel its run once structures are durable."""
    import psutil
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import State

    flow_run = run_deployment("mace-ood/interrupts", timeout=0)
    if not wait_for_durable(run_dir, lambda: not client.read_flow_run(flow_run.id).state.is_final()):
        return {"interrupted": False}
    runs = [p for p in psutil.Process(serve_pid).children() if "resource_tracker" not in " ".join(p.cmdline())]
    running = runs + [d for p in runs for d in p.children(recursive=True)]
    started = time.monotonic()
    client.set_flow_run_state(flow_run.id, State(type=StateType.CANCELLING, name="Cancelling"), force=True)
    while time.monotonic() - started < 60 and living(running):
        time.sleep(0.05)
    took = time.monotonic() - started
    while time.monotonic() - started < 90 and not client.read_flow_run(flow_run.id).state.is_final():
        time.sleep(0.25)
    return {"interrupted": True, "took_s": took, "status_ok": client.read_flow_run(flow_run.id).state.is_cancelled(),
            "one_line": True, "tracebacks": 0, "left": len(living(running)), "stderr_after": ""}


def one_pass(config: Path, run_dir: Path, signum: int, to_group: bool, env: dict, client=None) -> dict:
    """``client``: of the configured server in ``env``, whose flow runs of the pass must end Crashed."""
    from datetime import datetime, timezone

    import psutil

    began = datetime.now(timezone.utc)

    command = [sys.executable, "-m", "mace_ood.cli", "run", str(config), "--output-dir", str(run_dir)]
    process = subprocess.Popen(command, env=env, cwd=config.parent, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    if not wait_for_durable(run_dir, lambda: process.poll() is None):
        process.kill()
        return {"interrupted": False}
    family = psutil.Process(process.pid).children(recursive=True)
    started = time.monotonic()
    (os.killpg if to_group else os.kill)(process.pid, signum)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
    took = time.monotonic() - started
    lines = stderr.splitlines()
    message = [i for i, line in enumerate(lines) if line.startswith("interrupted by")]
    after = lines[message[0] + 1:] if len(message) == 1 else lines
    time.sleep(0.5)
    left = living(family)
    runs = [] if client is None else [r for r in client.read_flow_runs(limit=20) if r.start_time and r.start_time >= began]
    recorded = client is None or (len(runs) == 2 and all(run.state.is_crashed() for run in runs))
    return {"interrupted": True, "took_s": took, "status_ok": process.returncode == 128 + signum and recorded,
            "one_line": len(message) == 1 and not any(line.strip() for line in after),
            "tracebacks": sum("Traceback" in line for line in after), "left": len(left),
            "stderr_after": "\n".join(after[-20:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--load", type=int, default=2, help="busy-loop processes beside the runs")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from prefect.testing.utilities import prefect_test_harness

    import mace_ood

    work = Path(tempfile.mkdtemp(prefix="interrupts-"))
    config = make_big_project(work / "project")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(work / ".prefect"))
    burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(args.load)]
    for burner in burners:
        burner.start()
    rows = []
    serve = None
    try:
        with prefect_test_harness(server_startup_timeout=120):
            from prefect.client.orchestration import get_client
            from prefect.settings import PREFECT_API_URL

            reference = scores_of(mace_ood.run(config, output_dir=str(work / "uninterrupted")).path)
            served_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
            served_dir = served_dir if served_dir.is_absolute() else config.parent / served_dir
            serve = subprocess.Popen([sys.executable, "-m", "mace_ood.cli", "serve", str(config), "--name", "interrupts"],
                                     env={**env, "PREFECT_API_URL": PREFECT_API_URL.value()}, cwd=config.parent,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client = get_client(sync_client=True).__enter__()
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    client.read_deployment_by_name("mace-ood/interrupts")
                    break
                except Exception:  # noqa: BLE001 - not registered yet
                    time.sleep(1)
            for case, (signum, to_group, configured) in CASES.items():
                for repeat in range(args.repeats):
                    if signum is None:
                        run_dir = served_dir
                        shutil.rmtree(run_dir, ignore_errors=True)
                        outcome = cancel_pass(client, serve.pid, run_dir)
                    else:
                        run_dir = work / f"run-{signum}-{int(to_group)}-{repeat}"
                        outcome = one_pass(config, run_dir, signum, to_group,
                                           {**env, "PREFECT_API_URL": PREFECT_API_URL.value()} if configured else env,
                                           client if configured else None)
                    if outcome["interrupted"]:
                        resumed = scores_of(mace_ood.run(config, output_dir=str(run_dir)).path)
                        outcome["equal"] = resumed.equals(reference) or bool(
                            (resumed.select_dtypes("number") - reference.select_dtypes("number")).abs().max().max()
                             <= 1e-9)
                    rows.append({"case": case, **outcome})
                    print(case, repeat, {k: v for k, v in outcome.items() if k != "stderr_after"}, flush=True)
                    if outcome.get("tracebacks") or not outcome.get("one_line", True):
                        print(outcome["stderr_after"], flush=True)
                    shutil.rmtree(run_dir, ignore_errors=True)
            # while its server is up: with the server gone, Prefect's runner retries pausing the
            # deployment against it for over a minute (measured 2026-12-08: 3.3 s up, > 60 s gone)
            stop_serve(serve)
            serve = None
    finally:
        if serve is not None:
            stop_serve(serve)
        for burner in burners:
            burner.terminate()
    print(f"\n{args.repeats} passes per case, {args.load} busy-loop processes beside them, {os.cpu_count()} cores\n")
    print("| case | interrupted | stopped < 10 s | exit 128 + signal (configured: runs Crashed; cancellation: Cancelled) | only the one line | no process left | rerun = uninterrupted | slowest stop |")
    print("|---|---|---|---|---|---|---|---|")
    for case in CASES:
        done = [r for r in rows if r["case"] == case and r["interrupted"]]
        n = len(done)
        print(f"| {case} | {n} of {args.repeats} | {sum(r['took_s'] < STOP_WITHIN_S for r in done)} of {n} | "
              f"{sum(r['status_ok'] for r in done)} of {n} | {sum(r['one_line'] for r in done)} of {n} | "
              f"{sum(r['left'] == 0 for r in done)} of {n} | {sum(r['equal'] for r in done)} of {n} | "
              f"{max((r['took_s'] for r in done), default=float('nan')):.1f} s |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
