"""Batches by atom budget: many small structures share one forward pass; a count cap only where set."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest

from mace_ood.config import ExtractionSettings
from mace_ood.extract.batches import batches
from mace_ood.extract.stream import extract_to_netcdf
from mace_ood.testing import random_structures


def greedy_reference(sizes: list[int], batch_size: int | None, max_atoms: int) -> list[list[int]]:
    """The grouping written out as the rule says it: consecutive structures, a new batch when the next
    one would pass the budget (or the count), a too-large structure alone."""
    groups: list[list[int]] = []
    for n in sizes:
        last = groups[-1] if groups else None
        if last and sum(last) + n <= max_atoms and (batch_size is None or len(last) < batch_size):
            last.append(n)
        else:
            groups.append([n])
    return groups


class _Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("batch_size", [None, 1, 3, 16])
@pytest.mark.parametrize("max_atoms", [1, 40, 100, 4096])
def test_batches_follow_the_atom_budget_and_a_count_only_where_set(batch_size, max_atoms):
    sizes = [int(n) for n in np.random.default_rng(batch_size or 0).integers(1, 120, size=200)]
    got = [[len(item["atoms"]) for item in batch]
           for batch in batches(iter([{"atoms": _Sized(n)} for n in sizes]), batch_size, max_atoms)]
    assert got == greedy_reference(sizes, batch_size, max_atoms)
    assert [n for batch in got for n in batch] == sizes
    if batch_size is None and max_atoms == 4096:
        assert max(len(batch) for batch in got) > 16  # the old fixed count of 16 no longer caps it


def test_default_batches_hold_many_small_structures_with_the_same_latents(tiny_models, tmp_path):
    import netCDF4

    data = tmp_path / "small.xyz"
    ase.io.write(data, random_structures(40, seed=3))
    model = tiny_models["T1"][0]
    default = ExtractionSettings(device="cpu", default_dtype="float64", chunk_atoms=64)
    assert default.batch_size is None
    n_atoms = sum(len(a) for a in ase.io.read(data, ":"))
    by_budget = extract_to_netcdf(model, [str(data)], tmp_path / "budget.nc", default)
    one_by_one = extract_to_netcdf(model, [str(data)], tmp_path / "one.nc", default.model_copy(update={"batch_size": 1}))
    assert n_atoms <= default.max_atoms_per_batch and by_budget.forward_passes == 1
    assert by_budget.smallest_batch == 40 and one_by_one.smallest_batch == 1
    assert one_by_one.forward_passes == 40
    arrays = []
    for name in ("budget.nc", "one.nc"):
        with netCDF4.Dataset(tmp_path / name) as ds:
            arrays.append({k: np.asarray(ds[k][:]) for k in ("latent", "forces", "energy")})
    for key in ("latent", "forces", "energy"):
        np.testing.assert_allclose(arrays[0][key], arrays[1][key], rtol=1e-10, atol=1e-12)
