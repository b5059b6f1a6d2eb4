"""The Python API against a finished run: in-memory scores equal the run's, and an MD loop stops
at the first frame flagged ood."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from ase import units
from ase.md.verlet import VelocityVerlet

import mace_ood
from mace_ood.structures import iter_structures


@pytest.fixture(scope="module")
def run(finished_run):
    work, result = finished_run
    assert result.exit_code == 0, result.output
    return mace_ood.open_run(work / "run")


def test_in_memory_scores_equal_the_runs(run):
    """The Python tutorial's snippet, executed: frames held in memory, scored against the run."""
    import glob

    files = sorted(glob.glob(str(run.path.parent / "data" / "T2" / "*.xyz")) + glob.glob(
        str(run.path.parent / "data" / "T2" / "*.cif")))
    expected = run.scores[(run.scores.family == "MACE_T1") & (run.scores.dataset == "T2")].set_index("structure_id")
    refs, frames = zip(*[(r, a) for r, a in iter_structures(files) if r.structure_id in expected.index], strict=True)
    table = run.score(list(frames), family="MACE_T1", ids=[r.structure_id for r in refs]).set_index("structure_id")
    assert len(table) == len(expected) == 5
    numeric = [c for c in expected.columns if c in table.columns and pd.api.types.is_float_dtype(expected[c])
               and c not in ("frame_index",) and expected[c].notna().any()]
    assert {"combined", "combined_pvalue", "mahalanobis_max", "force_deviation_mean", "latent_variance"} <= set(numeric)
    for column in numeric:
        np.testing.assert_allclose(table.loc[expected.index, column], expected[column], rtol=1e-10, atol=1e-300,
                                   err_msg=column)
    assert (table.loc[expected.index, "ood"] == expected["ood"]).all()
    assert (table.loc[expected.index, "rank"] == expected["rank"]).all()
    assert run.selected("MACE_T1", "T2")["selected"].tolist() == [1, 2]
    decided = run.selection("MACE_T1", "T2").set_index("structure_id")
    np.testing.assert_array_equal(decided.loc[expected.index, "combined_pvalue"], expected["combined_pvalue"])


def test_unknown_family_and_unscorable_structures_are_one_line(run):
    from ase import Atoms

    with pytest.raises(mace_ood.RunError, match="no family 'nope'"):
        run.score([Atoms("Cu", cell=[3] * 3, pbc=True)], family="nope")
    iron = Atoms("Fe2", positions=[[0, 0, 0], [1.4, 1.4, 1.4]], cell=[2.8] * 3, pbc=True)
    with pytest.raises(ValueError, match="iron: .*Fe"):
        run.score([iron], family="MACE_T1", ids=["iron"])


def test_md_stops_at_the_first_frame_flagged_ood(run):
    """The documented pattern (mace_ood.api.OODCalculator): a cell expanded 3 % a step leaves the
    training distribution; the loop stops there, and scoring the frames afterwards agrees."""
    start = next(a for r, a in iter_structures(sorted(str(p) for p in (run.path.parent / "data" / "T1").glob("*.xyz"))))
    atoms = start.copy()
    atoms.calc = mace_ood.OODCalculator(run, "MACE_T1")
    dynamics = VelocityVerlet(atoms, 0.1 * units.fs)
    frames, stopped = [], None
    for step, _ in enumerate(dynamics.irun(steps=40)):
        assert atoms.get_forces().shape == (len(atoms), 3)  # computed now (cached if already)
        frames.append(atoms.copy())
        if atoms.calc.results["ood"]:
            stopped = step
            break
        atoms.set_cell(atoms.cell * 1.03, scale_atoms=True)  # the ramp, after this frame was judged
    assert stopped is not None and stopped > 0, "the ramp never left (or started outside) the distribution"
    table = run.score(frames, family="MACE_T1")
    by_frame = np.zeros(len(frames), dtype=bool)
    by_frame[table["structure_id"].str.removeprefix("memory@").astype(int).to_numpy()] = table["ood"].to_numpy()
    assert by_frame[-1] and not by_frame[:-1].any()
    # ensemble-mean forces, independently from the models' own calculators
    from mace.calculators import MACECalculator

    models = run.models("MACE_T1")
    calculators = [MACECalculator(model_paths=path, device="cpu", default_dtype="float64") for path in models.files]
    mean = np.mean([c.get_forces(frames[-1].copy()) for c in calculators], axis=0)
    np.testing.assert_allclose(atoms.calc.results["forces"], mean, rtol=1e-8, atol=1e-10)


def test_the_python_tutorial_snippets_run(run, tmp_path, monkeypatch):
    """docs/tutorials/python.md, executed against the tiny run (paths swapped, the MD loop shortened)."""
    import re
    from pathlib import Path

    section = (Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "python.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    code = "\n".join(blocks)
    code = code.replace('"demo_work/run"', repr(str(run.path)))
    code = code.replace('"demo_work/data/T2/md_Cu32_T1200K.extxyz"', repr(str(run.path.parent / "data" / "T2" / "slab_CuAl_T600K.xyz")))
    code = code.replace("steps=10_000", "steps=3")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/tutorials/python.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert {"combined", "combined_pvalue", "ood"} <= set(namespace["table"].columns)
    assert len(namespace["table"]) == 4
