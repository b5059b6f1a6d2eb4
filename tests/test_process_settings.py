"""One table of process settings (``mace_ood.runtime.ENVIRONMENT_DEFAULTS``): the workers get it, the
user's own values win, and no other file of the project sets its keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mace_ood.cluster import worker_environment
from mace_ood.runtime import ENVIRONMENT_DEFAULTS

ROOT = Path(__file__).parents[1]


def test_workers_get_every_default_and_the_users_values_win(monkeypatch):
    for key in ENVIRONMENT_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setenv("DASK_LOGGING__DISTRIBUTED", "info")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")

    local = worker_environment(2, "http://127.0.0.1:1/api", cores=8)
    remote = worker_environment(2, None, cores=8, inherit=False)

    assert {k: local[k] for k in ENVIRONMENT_DEFAULTS} == {**ENVIRONMENT_DEFAULTS, "OMP_WAIT_POLICY": "ACTIVE",
                                                             "DASK_LOGGING__DISTRIBUTED": "info"}
    assert local["OMP_NUM_THREADS"] == "3" and local["PREFECT_API_URL"] == "http://127.0.0.1:1/api"
    # a job on another node: this machine's OpenMP settings do not apply there, the rest does
    assert {k: remote[k] for k in ENVIRONMENT_DEFAULTS} == {**ENVIRONMENT_DEFAULTS, "DASK_LOGGING__DISTRIBUTED": "info"}
    assert remote["OMP_NUM_THREADS"] == "4" and "PREFECT_API_URL" not in remote


def test_make_runs_scripts_under_the_table():
    words = subprocess.run([sys.executable, "-m", "mace_ood.runtime"], capture_output=True, text=True, check=True,
                           env={"PATH": "/usr/bin:/bin", "OMP_WAIT_POLICY": "ACTIVE"}).stdout.split()
    assert dict(w.split("=", 1) for w in words) == {k: v for k, v in ENVIRONMENT_DEFAULTS.items()
                                                    if k != "OMP_WAIT_POLICY"}


def test_no_other_file_sets_a_key_of_the_table():
    files = [*(ROOT / "mace_ood").rglob("*.py"), ROOT / "Makefile", *(ROOT / "tests").glob("*.py"),
             *(ROOT / "benchmarks").glob("*.py"), ROOT / ".ci" / "run"]
    setting = {}
    for path in files:
        if path.name in ("runtime.py", Path(__file__).name):
            continue
        text = path.read_text()
        for key in ENVIRONMENT_DEFAULTS:
            for form in (f'"{key}": "', f"{key}=", f"{key} :=", f"{key} ?=", f'setdefault("{key}"',
                         f'environ["{key}"] ='):
                if form in text:
                    setting.setdefault(str(path.relative_to(ROOT)), []).append(key)
    assert not setting, setting
