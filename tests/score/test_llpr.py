"""LLPR against an independent computation: readout features hooked out of mace's own calculator,
F^T F and the quadratic forms in plain numpy (float64)."""

from __future__ import annotations

import ase.io
import mace  # noqa: F401  (before e3nn: mace makes e3nn's constants loadable)
import numpy as np
import pytest
import torch
import xarray as xr

from mace_ood.config import ExtractionSettings, ScoresConfig
from mace_ood.extract.store import read_structure_table
from mace_ood.extract.stream import extract_to_netcdf
from mace_ood.records import EvaluationPlan
from mace_ood.score.evaluation import fit_family_reference, score_evaluation
from mace_ood.score.llpr import calibrate, regularised_inverse
from mace_ood.score.reference import FamilyReference, llpr_calibration_folds
from mace_ood.testing import build_tiny_mace, random_structures, write_dataset

LAMBDA = 1e-6  # the documented default without labels


def hooked_features(model_path, structures, head: str | None) -> list[np.ndarray]:
    """Per structure, (n_atoms, D): every earlier readout's output for the head, then the last
    readout's masked hidden activation (the input of its linear_2), the head's block."""
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64",
                          **({"head": head} if head else {}))
    model = calc.models[0]
    heads = list(getattr(model, "heads", None) or ["Default"])
    h = heads.index(head) if head else 0
    captured: dict[str, torch.Tensor] = {}
    handles = [readout.register_forward_hook(lambda _m, _i, out, i=i: captured.__setitem__(f"e{i}", out.detach()))
               for i, readout in enumerate(model.readouts[:-1])]
    handles.append(model.readouts[-1].linear_2.register_forward_pre_hook(
        lambda _m, args: captured.__setitem__("hidden", args[0].detach())))
    out = []
    try:
        for atoms in structures:
            atoms = atoms.copy()
            atoms.calc = calc
            atoms.get_potential_energy()
            width = captured["hidden"].shape[1] // len(heads)
            columns = [captured[f"e{i}"][:, h : h + 1] for i in range(len(model.readouts) - 1)]
            columns.append(captured["hidden"][:, h * width : (h + 1) * width])
            out.append(torch.cat(columns, dim=1).double().numpy())
    finally:
        for handle in handles:
            handle.remove()
    return out


@pytest.fixture(scope="module", params=[None, "pt_head"], ids=["plain", "multihead"])
def llpr_run(request, tmp_path_factory):
    head = request.param
    root = tmp_path_factory.mktemp("llpr")
    heads = ["Default", "pt_head"] if head else None
    models = []
    for seed in range(2):
        path = root / f"m{seed}.model"
        torch.save(build_tiny_mace(seed, heads=heads), path)
        models.append(path)
    files = {"train": write_dataset(root, "train", random_structures(36, seed=1)),
             "test": write_dataset(root, "test", random_structures(8, seed=2))}
    # as the run read them (the file rounds positions)
    train, test = (ase.io.read(files[name], ":") for name in ("train", "test"))
    settings = ExtractionSettings(device="cpu", forces=False)
    latents = {
        name: tuple(str(extract_to_netcdf(m, [str(f)], root / f"{name}_{i}.nc", settings, head=head).path)
                    for i, m in enumerate(models))
        for name, f in files.items()
    }
    own = EvaluationPlan("F", "train", True, latents["train"])
    reference_file = fit_family_reference(own, root, ScoresConfig())
    scores = score_evaluation(EvaluationPlan("F", "test", False, latents["test"]), root, 16, reference_file)
    train_ids = [str(i) for i in read_structure_table(latents["train"][0])["structure_id"]]
    return {"models": models, "train": train, "test": test, "head": head, "train_ids": train_ids,
            "reference": FamilyReference.load(reference_file), "scores": scores}


def test_llpr_equals_numpy_from_hooked_readout_features(llpr_run):
    reference = llpr_run["reference"]
    # LLPR is fitted without its calibration folds (its alpha calibrated there when no validation set is given)
    first = llpr_calibration_folds(len(reference.folds))
    excluded = {i for i, fold in reference.structure_fold.items() if fold < first} if reference.folds else set()
    assert len(llpr_run["train_ids"]) == len(llpr_run["train"])
    with xr.open_dataset(llpr_run["scores"]) as ds:
        expected_structure, expected_atom = ds["llpr_energy_std"].values, ds["atom_llpr"].values
    structure_std, atom_scores = [], []
    for model_path in llpr_run["models"]:
        train = hooked_features(model_path, llpr_run["train"], llpr_run["head"])
        test = hooked_features(model_path, llpr_run["test"], llpr_run["head"])
        fit = [f for f, sid in zip(train, llpr_run["train_ids"], strict=True) if sid not in excluded]
        sums = np.stack([f.sum(axis=0) for f in fit])
        gram = sums.T @ sums
        inverse = np.linalg.inv(gram + LAMBDA * np.trace(gram) / len(gram) * np.eye(len(gram)))
        atoms = np.concatenate(fit)
        atom_gram = atoms.T @ atoms / len(atoms)
        atom_inverse = np.linalg.inv(atom_gram + LAMBDA * np.trace(atom_gram) / len(atom_gram) * np.eye(len(atom_gram)))
        test_sums = np.stack([f.sum(axis=0) for f in test])
        structure_std.append(np.sqrt(np.einsum("ij,jk,ik->i", test_sums, inverse, test_sums)))
        test_atoms = np.concatenate(test)
        atom_scores.append(np.sqrt(np.einsum("ij,jk,ik->i", test_atoms, atom_inverse, test_atoms)))
    assert 0 < len(fit) < len(train) or reference.calibration_in_sample
    assert all(s.calibrated_on == "none" and s.alpha == 1.0 for s in reference.llpr)
    np.testing.assert_allclose(expected_structure, np.mean(structure_std, axis=0), rtol=1e-8)
    np.testing.assert_allclose(expected_atom, np.mean(atom_scores, axis=0), rtol=1e-8)


def test_hooked_features_rebuild_the_models_energy(llpr_run):
    """The features are the right ones: the model's interaction energy is linear in them."""
    from mace.calculators import MACECalculator

    head = llpr_run["head"]
    model_path = llpr_run["models"][0]
    calc = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64",
                          **({"head": head} if head else {}))
    model = calc.models[0]
    heads = list(getattr(model, "heads", None) or ["Default"])
    h = heads.index(head) if head else 0
    weights = model.readouts[-1].linear_2(torch.eye(model.readouts[-1].linear_2.irreps_in.dim, dtype=torch.float64))
    width = weights.shape[0] // len(heads)
    w = np.concatenate([np.ones(len(model.readouts) - 1), weights[h * width : (h + 1) * width, h].detach().numpy()])
    scale, shift = float(np.atleast_1d(model.scale_shift.scale.numpy())[h]), float(np.atleast_1d(model.scale_shift.shift.numpy())[h])
    for atoms, features in zip(llpr_run["test"][:3], hooked_features(model_path, llpr_run["test"][:3], head), strict=True):
        atoms = atoms.copy()
        atoms.calc = calc
        energy = atoms.get_potential_energy()
        e0 = sum(float(model.atomic_energies_fn.atomic_energies.numpy().reshape(len(heads), -1)[h][
            list(model.atomic_numbers.numpy()).index(z)]) for z in atoms.numbers)
        rebuilt = e0 + scale * float((features @ w).sum()) + shift * len(atoms)
        assert rebuilt == pytest.approx(energy, rel=1e-9, abs=1e-9)


def test_calibration_recovers_a_known_alpha():
    """Errors drawn with variance alpha^2 f^T (G + lam I)^-1 f: the maximum-likelihood alpha comes back."""
    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 6)) @ np.diag([3, 2, 1, 0.5, 0.2, 0.1])
    gram = train.T @ train
    features = rng.normal(size=(20000, 6)) @ np.diag([3, 2, 1, 0.5, 0.2, 0.1])
    variance = np.einsum("ij,jk,ik->i", features, regularised_inverse(gram, 1e-6), features)
    errors = rng.normal(size=20000) * 0.05 * np.sqrt(variance)
    alpha, lam = calibrate(gram, features, errors)
    # the grid's neighbours of the true lambda give nearly the same variances; a large one does not
    assert lam <= 1e-3
    # the MLE from 20000 draws: relative standard error sqrt(2/20000)/2 = 0.5 % on alpha; 3 of them
    assert alpha == pytest.approx(0.05, rel=0.015)
    assert calibrate(gram, features, errors * 3)[0] == pytest.approx(3 * alpha, rel=1e-9)


def test_alpha_is_calibrated_on_the_validation_energies(tmp_path):
    """With a labelled validation dataset, each seed's (alpha, varsigma) is the likelihood maximum for
    that seed's energy errors there, on features hooked out of mace's calculator."""
    from mace.calculators import MACECalculator

    models = []
    for seed in range(2):
        path = tmp_path / f"m{seed}.model"
        torch.save(build_tiny_mace(seed), path)
        models.append(path)
    train_file = write_dataset(tmp_path, "train", random_structures(24, seed=1))
    labelled = ase.io.read(write_dataset(tmp_path, "tmp", random_structures(12, seed=5)), ":")
    reference_calc = MACECalculator(model_paths=str(models[0]), device="cpu", default_dtype="float64")
    rng = np.random.default_rng(3)
    for atoms in labelled:
        atoms.calc = reference_calc
        atoms.info["REF_energy"] = atoms.get_potential_energy() + float(rng.normal(scale=0.05))
        atoms.calc = None
    valid_file = tmp_path / "valid.extxyz"
    ase.io.write(valid_file, labelled)
    settings = ExtractionSettings(device="cpu", forces=True)
    paths = {name: tuple(str(extract_to_netcdf(m, [str(f)], tmp_path / f"{name}_{i}.nc", settings).path)
                         for i, m in enumerate(models))
             for name, f in (("train", train_file), ("valid", valid_file))}
    reference = FamilyReference.load(fit_family_reference(
        EvaluationPlan("F", "train", True, paths["train"]), tmp_path, ScoresConfig(),
        validation=EvaluationPlan("F", "valid", False, paths["valid"]),
    ))
    valid = ase.io.read(valid_file, ":")
    for model_path, seed in zip(models, reference.llpr, strict=True):
        calc = MACECalculator(model_paths=str(model_path), device="cpu", default_dtype="float64")
        errors = []
        for atoms in valid:
            truth = atoms.info["REF_energy"]
            atoms = atoms.copy()
            atoms.calc = calc
            errors.append(atoms.get_potential_energy() - truth)
        sums = np.stack([f.sum(axis=0) for f in hooked_features(model_path, valid, None)])
        alpha, lam = calibrate(seed.gram, sums, np.array(errors))
        assert seed.calibrated_on == "validation valid" and seed.n_calibration == len(valid)
        assert (seed.alpha, seed.lam) == (pytest.approx(alpha, rel=1e-8), lam)
        assert seed.alpha != 1.0


def test_a_model_without_mace_s_readouts_gets_every_score_but_llpr(tmp_path):
    """A last readout that is not MACE's non-linear one: no layer energies stored, no LLPR columns,
    and `validate`'s score list says why."""
    from e3nn import o3
    from mace.modules.blocks import LinearReadoutBlock

    from mace_ood.config import RunConfig
    from mace_ood.extract.models import describe_model
    from mace_ood.plan import family_scores

    model = build_tiny_mace(0)
    model.readouts[-1] = LinearReadoutBlock(o3.Irreps("8x0e")).double()
    path = tmp_path / "linear.model"
    torch.save(model, path)
    info = describe_model(path)
    assert info.llpr_unsupported == "its last readout is LinearReadoutBlock, not NonLinearReadoutBlock"
    data = write_dataset(tmp_path, "train", random_structures(12, seed=1))
    latents = (str(extract_to_netcdf(path, [str(data)], tmp_path / "train_0.nc",
                                     ExtractionSettings(device="cpu")).path),)
    with xr.open_dataset(latents[0]) as ds:
        assert "layer_energy" not in ds and ds.attrs["llpr"] == info.llpr_unsupported
    plan = EvaluationPlan("F", "train", True, latents)
    reference_file = fit_family_reference(plan, tmp_path, ScoresConfig())
    assert FamilyReference.load(reference_file).llpr is None
    with xr.open_dataset(score_evaluation(plan, tmp_path, 16, reference_file)) as scores:
        assert "mahalanobis" in scores and not [v for v in scores.data_vars if "llpr" in str(v)]
    config = RunConfig.model_validate({
        "output_dir": str(tmp_path / "run"), "datasets": {"T": [str(data)]},
        "model_families": {"F": {"trained_on": "T", "models": [str(path)]}},
    })
    names, missing = family_scores(config, 1, info.llpr_unsupported)
    assert "llpr" not in names and "mahalanobis_max" in names and "LLPR: its last readout" in missing


@pytest.fixture(scope="module", params=[None, "pt_head"], ids=["plain", "multihead"])
def one_model_run(request, tmp_path_factory):
    """A family of one model, extracted as a run extracts it (forces and the LLPR force Jacobian)."""
    head = request.param
    root = tmp_path_factory.mktemp("llpr_forces")
    model = root / "m.model"
    torch.save(build_tiny_mace(3, heads=["Default", "pt_head"] if head else None), model)
    files = {"train": write_dataset(root, "train", random_structures(24, seed=1)),
             "test": write_dataset(root, "test", random_structures(6, seed=2))}
    settings = ExtractionSettings(device="cpu", forces=True, batch_size=4)  # several graphs a forward pass
    latents = {name: (str(extract_to_netcdf(model, [str(f)], root / f"{name}.nc", settings, head=head,
                                            llpr_forces=True).path),)
               for name, f in files.items()}
    own = EvaluationPlan("F", "train", True, latents["train"])
    reference_file = fit_family_reference(own, root, ScoresConfig())
    scores = score_evaluation(EvaluationPlan("F", "test", False, latents["test"]), root, 16, reference_file)
    train, test = (ase.io.read(files[name], ":") for name in ("train", "test"))
    return {"model": model, "head": head, "latents": latents, "train": train, "test": test, "scores": scores,
            "reference": FamilyReference.load(reference_file),
            "train_ids": [str(i) for i in read_structure_table(latents["train"][0])["structure_id"]]}


def test_the_force_jacobian_is_the_finite_difference_of_hooked_features(one_model_run):
    """Each stored column is d(sum over the structure of an LLPR feature) / d(an atom's position), as
    central differences of the features hooked out of mace's calculator give it; the forces stored with
    it are the calculator's."""
    from mace.calculators import MACECalculator

    run, step = one_model_run, 1e-5
    with xr.open_dataset(run["latents"]["test"][0]) as ds:
        jacobian, forces = ds["llpr_force_jacobian"].values, ds["forces"].values
        offsets = ds["atom_offset"].values
    width = jacobian.shape[1] // 3
    calc = MACECalculator(model_paths=str(run["model"]), device="cpu", default_dtype="float64",
                          **({"head": run["head"]} if run["head"] else {}))
    for index in (0, 5):
        atoms = run["test"][index]
        probe = atoms.copy()
        probe.calc = calc
        np.testing.assert_allclose(forces[offsets[index]:offsets[index] + len(atoms)], probe.get_forces(), atol=1e-9)
        for atom in (0, len(atoms) - 1):
            for axis in range(3):
                moved = []
                for sign in (1, -1):
                    shifted = atoms.copy()
                    shifted.positions[atom, axis] += sign * step
                    moved.append(hooked_features(run["model"], [shifted], run["head"])[0].sum(axis=0))
                expected = (moved[0] - moved[1]) / (2 * step)
                stored = jacobian[offsets[index] + atom].reshape(3, width)[axis]
                np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max())


def test_llpr_force_std_equals_numpy_over_the_fit_structures(one_model_run):
    """sqrt(mean over x, y, z of J^T (sum J J^T + varsigma^2 I)^-1 J) per atom, structure mean, with the
    sum over the fit structures' stored Jacobians (the calibration folds left out) in plain numpy."""
    run, reference = one_model_run, one_model_run["reference"]
    first = llpr_calibration_folds(len(reference.folds))
    excluded = {i for i, fold in reference.structure_fold.items() if fold < first} if reference.folds else set()
    with xr.open_dataset(run["latents"]["train"][0]) as ds:
        train_j, train_offsets, train_counts = (ds[v].values for v in ("llpr_force_jacobian", "atom_offset", "n_atoms"))
    width = train_j.shape[1] // 3
    rows = np.concatenate([train_j[o:o + n].reshape(-1, width) for o, n, sid in
                           zip(train_offsets, train_counts, run["train_ids"], strict=True) if sid not in excluded])
    gram = rows.T @ rows
    inverse = np.linalg.inv(gram + LAMBDA * np.trace(gram) / width * np.eye(width))
    with xr.open_dataset(run["latents"]["test"][0]) as ds:
        test_j, offsets, counts = (ds[v].values for v in ("llpr_force_jacobian", "atom_offset", "n_atoms"))
    per_atom = np.sqrt(np.einsum("ij,jk,ik->i", test_j.reshape(-1, width), inverse, test_j.reshape(-1, width))
                       .reshape(-1, 3).mean(axis=1))
    expected = [per_atom[o:o + n].mean() for o, n in zip(offsets, counts, strict=True)]
    with xr.open_dataset(run["scores"]) as ds:
        np.testing.assert_allclose(ds["atom_llpr_force_std"].values, per_atom, rtol=1e-8)
        np.testing.assert_allclose(ds["llpr_force_std"].values, expected, rtol=1e-8)
    assert len(rows) < 3 * sum(train_counts) or reference.calibration_in_sample
