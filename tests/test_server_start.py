"""Prefect's temporary server on a busy machine: a longer start-up timeout unless the user set
one, one retry, then one line that says what to do (never a traceback)."""

from __future__ import annotations

import os
import subprocess
import sys

from mace_ood.flows.server import DEFAULT_STARTUP_TIMEOUT_S, TIMEOUT_ENV, startup_timeout


def test_the_start_up_timeout_is_raised_unless_the_user_set_one(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert startup_timeout() == DEFAULT_STARTUP_TIMEOUT_S > 20
    monkeypatch.setenv(TIMEOUT_ENV, "7")
    assert startup_timeout() == 7.0


def run_in_a_shell(project, tmp_path, **env) -> subprocess.CompletedProcess:
    """`mace-ood run` as a user starts it: no Prefect API configured, ``env`` added."""
    environment = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    environment.update({"PREFECT_HOME": str(tmp_path / ".prefect"), **env})
    return subprocess.run(
        [sys.executable, "-m", "mace_ood.cli", "run", str(project), "--output-dir", str(tmp_path / "run")],
        env=environment, capture_output=True, text=True, timeout=600,
    )


def test_a_server_too_slow_to_start_is_retried_then_explained_in_one_line(project, tmp_path):
    result = run_in_a_shell(project, tmp_path, **{TIMEOUT_ENV: "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "did not start within 1 s; retrying with 2 s" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "prefect server start" in errors[0] and "PREFECT_API_URL" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "latents").exists()  # stopped before any work


def test_a_failed_task_is_one_line_naming_it_with_its_cause(project, tmp_path):
    """Every extraction runs out of memory, whatever the retries do: one `error:` line naming each
    failed job and the cause, and no traceback anywhere in the terminal. One family of one model
    (2 jobs, 5 attempts each: the whole project's 12 jobs took 2.5 of the suite's minutes)."""
    import yaml

    from tests.oom_injection import worker_preload_env

    config = yaml.safe_load(project.read_text())
    root = project.parent
    config["datasets"] = {name: [str(root / pattern) for pattern in patterns]
                          for name, patterns in config["datasets"].items()}
    config["model_families"] = {"MACE_T1": {"trained_on": "T1", "models": [str(root / "models" / "T1_seed0.model")]}}
    small = tmp_path / "config.yaml"
    small.write_text(yaml.safe_dump(config))
    result = run_in_a_shell(small, tmp_path, **worker_preload_env(1, tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "2 of 2 extraction(s) failed" in errors[0]
    assert "MACE_T1-seed0-T1:" in errors[0] and "MACE_T1-seed0-T2:" in errors[0]
    assert "out of memory" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
