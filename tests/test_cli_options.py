"""The CLI's shared options: both spellings, choices from the config's Literals, clear errors."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import pytest
import yaml
from typer.testing import CliRunner

from mace_ood.cli import app
from mace_ood.cli.types import spellings
from mace_ood.config import DefaultDtype, ScoreName

runner = CliRunner()


def test_spellings_give_underscores_and_dashes():
    assert spellings("batch_size") == ("--batch_size", "--batch-size")
    assert spellings("device") == ("--device",)


@pytest.mark.parametrize("command", ["run", "validate", "evaluate", "demo"])
def test_every_multi_word_option_has_both_spellings(command):
    import typer.main

    click_command = typer.main.get_command(app).commands[command]
    for option in click_command.params:
        long_names = [o for o in option.opts if o.startswith("--")]
        multi = [o for o in long_names if "-" in o[2:] or "_" in o[2:]]
        if multi:
            assert {o.replace("-", "_")[2:] for o in long_names} == {multi[0].replace("-", "_")[2:]}
            assert any("_" in o[2:] for o in long_names) and any("-" in o[2:] for o in long_names), long_names


@pytest.mark.parametrize(("flag", "literal"), [("--default_dtype", DefaultDtype), ("--score", ScoreName)])
def test_choices_are_the_config_literals(flag, literal, tmp_path):
    """Every value of the config's Literal parses (the run then stops at the missing config);
    anything else is refused by the option parser, before any work."""
    missing = str(tmp_path / "missing.yaml")
    for value in get_args(literal):
        result = runner.invoke(app, ["run", missing, flag, value])
        assert "config file not found" in result.output, (value, result.output)
    result = runner.invoke(app, ["run", missing, flag, "bogus"])
    assert result.exit_code == 2 and "config file not found" not in result.output
    assert "bogus" in result.output


def test_help_lists_the_choices():
    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "cuda:N" in result.output and "float32|float64" in result.output


@pytest.mark.parametrize(("device", "ok"), [("cuda:1", True), ("cpu", True), ("gpu", False), ("cuda:x", False)])
def test_device_accepts_cuda_n_and_names_a_bad_one(project, device, ok):
    from mace_ood.config import load_config

    if ok:
        assert load_config(project, {"device": device}).device == device
    else:
        result = runner.invoke(app, ["validate", str(project), "--device", device])
        assert result.exit_code == 2 and "device" in result.output


@pytest.mark.parametrize("flag", ["--batch_size", "--batch-size"])
def test_both_spellings_override_the_config(project, flag):
    result = runner.invoke(app, ["validate", str(project), flag, "3", "--default-dtype", "float32"])
    assert result.exit_code == 0, result.output


def test_invalid_choice_is_rejected_before_any_work(project):
    result = runner.invoke(app, ["run", str(project), "--default_dtype", "float16"])
    assert result.exit_code == 2
    assert "float16" in result.output


def test_force_score_without_forces_is_a_config_error(project):
    config = yaml.safe_load(project.read_text())
    config["forces"] = False
    latents_only = project.parent / "latents_only.yaml"
    latents_only.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["validate", str(latents_only)])
    assert result.exit_code == 0
    result = runner.invoke(app, ["run", str(latents_only), "--score", "force_deviation_max"])
    assert result.exit_code == 2
    assert "needs `forces: true`" in result.output


def test_importing_the_package_changes_no_process_state():
    """Importing every module leaves the umask, the environment and the HDF5 cache alone."""
    code = """
import os, importlib, pkgutil, netCDF4
import mace_ood, mace_ood.flows, mace_ood.tasks
os.umask(0o027)
before = (0o027, dict(os.environ), netCDF4.get_chunk_cache())
names = [m.name for p in (mace_ood, mace_ood.flows, mace_ood.tasks) for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
after = (os.umask(0o027), dict(os.environ), netCDF4.get_chunk_cache())
assert before == after, [k for k in set(before[1]) ^ set(after[1])] or (before[0], after[0], before[2], after[2])
print(len(names))
"""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OMP_WAIT_POLICY",)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) > 30


def test_import_contract_holds():
    """`lint-imports` (import-linter) keeps the layers cli -> flows -> tasks -> stages -> config/files."""
    from pathlib import Path

    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip("import-linter not installed")
    out = subprocess.run([str(exe)], capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "broken" in out.stdout and "0 broken" in out.stdout
