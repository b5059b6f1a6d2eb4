"""Last-layer prediction rigidity (LLPR): an energy uncertainty in eV from one model.

Bigi, Chong, Ceriotti & Grasselli, Mach. Learn.: Sci. Technol. 5 (2024) 045018. A MACE energy is
linear in the inputs of its readouts' last linear maps: per atom, the output of every earlier
layer's linear readout and the hidden activation of the last, non-linear readout (its block of
the chosen head),

    E = scale_h * sum_atoms (sum_i e_i + w_h . g_h) + n_atoms * shift_h + E0s,

so with f(x) = sum over atoms of [e_0, ..., e_(L-2), g_h] (the earlier readouts enter as one
feature each: LLPR over the last readout's weights and one scale per earlier readout), the LLPR
variance is

    sigma^2(x) = alpha^2 f(x)^T (F^T F + varsigma^2 I)^-1 f(x),

F the features of the fit part of the family's training set (one row per structure). alpha and
varsigma are calibrated on labelled energies by maximum likelihood (alpha^2 in closed form for
each varsigma of a grid): on the family's ``validation`` dataset when it has one, else on the
held-out calibration part of the training set, which the model was trained on (so alpha is then
too small: the caveat is stored and reported). Per atom (localisation), the same form with the
atom-level matrix F_a^T F_a / N_a over the fit atoms, unitless (a leverage, like Mahalanobis).

Forces (a family of one model, which has no committee deviation): a force is minus the gradient of
the energy, so it is linear in the same last-layer weights, with the gradient J of the summed features
by the atom's position in place of f. The training forces constrain those weights far more than the
energies (3 N labels a structure, weighted about 100x in MACE's loss), so the rigidity is the forces'
Gauss-Newton matrix, and per atom

    sigma_F^2(atom) = mean over x, y, z of J^T (sum over fit atoms and components of J J^T + varsigma^2 I)^-1 J,

``llpr_force_std`` (unscaled: the force error model, :mod:`mace_ood.score.errors`, calibrates it on
the validation forces). J is stored at extraction (``llpr_force_jacobian``, one backward pass per
feature). On the committed Pd family's first model this matrix ranked the true force error better than
F^T F or F^T F + J^T J (Spearman 0.79, 0.33, 0.66 over its validation, new and novel structures: a one-off
check when the form was chosen, not a test; tests/test_llpr_forces.py compares the error model's inputs).

Stored at extraction: only ``layer_energy`` (atom, L-1), the earlier readouts' per-atom
outputs for the head. The hidden activation is recomputed from the stored last-layer latents
with the model's own ``linear_1`` (as a matrix) and activation, which the fit keeps (a few kB) in the
reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from mace_ood.extract.readout import head_index, hidden_width, layer_slices, llpr_unsupported

log = logging.getLogger(__name__)

# varsigma^2 = LAMBDA * trace(F^T F) / D; the grid the calibration searches, and the value used
# without labels.
LAMBDA_GRID = tuple(10.0 ** k for k in range(-10, 1))
DEFAULT_LAMBDA = 1e-6


@dataclass
class HiddenMap:
    """The last readout's ``linear_1`` and activation, restricted to the chosen head's block of its
    output: last-layer latents (n, C) -> hidden activation g_h (n, d), g = cst * act(z W).

    Kept as plain arrays and torch functions, not mace/e3nn modules: a reference that unpickles
    e3nn modules made every Dask worker that loaded it take seconds to exit.
    """

    weight: np.ndarray  # (C, d): linear_1 applied to the identity (no bias), the head's columns
    activations: list  # (start, stop, function, constant or None) over the d columns

    @classmethod
    def from_model(cls, model: torch.nn.Module, head: str) -> HiddenMap:
        from e3nn import o3

        readout = model.readouts[-1]
        width = hidden_width(model)
        start = head_index(model, head) * width
        dtype = next(readout.parameters()).dtype
        with torch.inference_mode():
            eye = torch.eye(int(readout.linear_1.irreps_in.dim), dtype=dtype, device=next(readout.parameters()).device)
            weight = readout.linear_1(eye).double().cpu().numpy()[:, start : start + width]
        activations, offset = [], 0
        for (mul, irrep), act in zip(o3.Irreps(str(readout.non_linearity.irreps_in)), readout.non_linearity.acts,
                                     strict=True):
            size = mul * irrep.dim
            lo, hi = max(offset, start) - start, min(offset + size, start + width) - start
            if lo < hi:
                if act is None:
                    activations.append((lo, hi, None, None))
                else:
                    constant = None if getattr(act, "_is_id", False) else float(getattr(act, "cst", 1.0))
                    activations.append((lo, hi, getattr(act, "f", act), constant))
            offset += size
        return cls(np.ascontiguousarray(weight), activations)

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        pre = torch.as_tensor(np.asarray(latents, dtype=np.float64) @ self.weight)
        out = pre.clone()
        with torch.inference_mode():
            for lo, hi, function, constant in self.activations:
                if function is None:
                    continue
                value = function(pre[:, lo:hi])
                out[:, lo:hi] = value if constant is None else value * constant
        return out.numpy()

    @property
    def width(self) -> int:
        return self.weight.shape[1]


@dataclass
class ReadoutMap:
    """What turns a seed's stored latents and ``layer_energy`` into its LLPR features, on the CPU."""

    hidden: HiddenMap
    latent_columns: slice  # the last layer's columns among the stored latents
    n_earlier: int

    @classmethod
    def from_model(cls, model: torch.nn.Module, head: str, n_latent: int) -> ReadoutMap:
        reason = llpr_unsupported(model)
        if reason is not None:
            raise ValueError(f"LLPR needs MACE's standard readouts: {reason}")
        hidden = HiddenMap.from_model(model, head)
        width = layer_slices(model)[-1].stop - layer_slices(model)[-1].start
        return cls(hidden, slice(n_latent - width, n_latent), len(model.readouts) - 1)

    @property
    def width(self) -> int:
        return self.n_earlier + self.hidden.width

    def features(self, latents: np.ndarray, layer_energy: np.ndarray | None) -> np.ndarray:
        """(n, D) per-atom LLPR features from (n, F) latents and (n, L-1) ``layer_energy``."""
        hidden = self.hidden(latents[:, self.latent_columns])
        if self.n_earlier == 0:
            return hidden
        earlier = np.asarray(layer_energy, dtype=np.float64).reshape(len(hidden), self.n_earlier)
        return np.concatenate([earlier, hidden], axis=1)


@dataclass
class SeedLLPR:
    """One seed's LLPR: feature map, structure-level (F^T F + varsigma^2 I)^-1 with its alpha, and the
    atom-level inverse."""

    readout: ReadoutMap
    structure_inverse: np.ndarray  # (D, D)
    atom_inverse: np.ndarray  # (D, D)
    alpha: float = 1.0
    lam: float = DEFAULT_LAMBDA
    calibrated_on: str = "none"  # "validation <dataset>", "training runs of the first folds (trained on)", "none"
    n_calibration: int = 0
    gram: np.ndarray = field(default=None, repr=False)  # F^T F (kept to recalibrate)
    force_inverse: np.ndarray | None = None  # (sum J J^T + varsigma^2 I)^-1 where the Jacobian was stored

    def structure_std(self, structure_features: np.ndarray) -> np.ndarray:
        """alpha sqrt(f^T (F^T F + varsigma^2 I)^-1 f) per row of (k, D) summed features (eV when calibrated)."""
        return self.alpha * np.sqrt(_quadratic(structure_features, self.structure_inverse))

    def atom_score(self, atom_features: np.ndarray) -> np.ndarray:
        return np.sqrt(_quadratic(atom_features, self.atom_inverse))

    def atom_force_std(self, jacobian: np.ndarray) -> np.ndarray:
        """sqrt(mean over x, y, z of J^T (sum J J^T + varsigma^2 I)^-1 J) per row of (n, 3 D) Jacobians."""
        rows = np.asarray(jacobian, dtype=np.float64).reshape(len(jacobian) * 3, -1)
        return np.sqrt(_quadratic(rows, self.force_inverse).reshape(len(jacobian), 3).mean(axis=1))


def _quadratic(rows: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return np.maximum(np.einsum("ij,jk,ik->i", rows, matrix, rows), 0.0)


def regularised_inverse(gram: np.ndarray, lam: float) -> np.ndarray:
    """(G + lam * mean(diag G) I)^-1, symmetric."""
    scale = float(np.trace(gram)) / len(gram) if len(gram) else 1.0
    inverse = np.linalg.inv(gram + lam * max(scale, np.finfo(float).tiny) * np.eye(len(gram)))
    return (inverse + inverse.T) / 2


def calibrate(gram: np.ndarray, features: np.ndarray, errors: np.ndarray) -> tuple[float, float]:
    """(alpha, lambda) maximising the Gaussian likelihood of energy ``errors`` (eV) with variances
    alpha^2 f^T (G + lambda mean(diag G) I)^-1 f over rows ``features``; alpha^2 is the
    closed-form maximum for each lambda of ``LAMBDA_GRID``."""
    errors = np.asarray(errors, dtype=float)
    best = (np.inf, 1.0, DEFAULT_LAMBDA)
    for lam in LAMBDA_GRID:
        variance = _quadratic(features, regularised_inverse(gram, lam))
        usable = variance > 0
        if not usable.any():
            continue
        alpha2 = float(np.mean(errors[usable] ** 2 / variance[usable]))
        if alpha2 <= 0:
            continue
        nll = 0.5 * float(np.mean(np.log(2 * np.pi * alpha2 * variance[usable]))) + 0.5
        if nll < best[0]:
            best = (nll, float(np.sqrt(alpha2)), lam)
    return best[1], best[2]


class GramAccumulator:
    """F^T F over structures (features summed per structure) and over atoms, fed block by block."""

    def __init__(self, width: int) -> None:
        self.structure = np.zeros((width, width))
        self.atom = np.zeros((width, width))
        self.n_atoms = 0

    def add(self, atom_features: np.ndarray, structure_features: np.ndarray) -> None:
        self.atom += atom_features.T @ atom_features
        self.structure += structure_features.T @ structure_features
        self.n_atoms += len(atom_features)

    def seed_llpr(self, readout: ReadoutMap, lam: float = DEFAULT_LAMBDA) -> SeedLLPR:
        atom_gram = self.atom / max(self.n_atoms, 1)
        return SeedLLPR(
            readout, regularised_inverse(self.structure, lam), regularised_inverse(atom_gram, DEFAULT_LAMBDA),
            lam=lam, gram=self.structure.copy(),
        )


def structure_sums(atom_features: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(k, D) sums of consecutive atom rows, ``counts`` atoms per structure (all whole)."""
    counts = np.asarray(counts, dtype=np.int64)
    if len(counts) == 0:
        return np.zeros((0, atom_features.shape[1]))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.add.reduceat(atom_features, starts, axis=0)


def reference_energy(atoms, key: str) -> float | None:
    """The labelled energy of a frame: ``atoms.info[key]``, else a calculator's energy, else None."""
    if key in atoms.info:
        return float(atoms.info[key])
    if atoms.calc is not None and "energy" in getattr(atoms.calc, "results", {}):
        return float(atoms.calc.results["energy"])
    return None


def reference_energies(sources: np.ndarray, frames: np.ndarray, rows: np.ndarray, key: str) -> np.ndarray:
    """Labelled energies of structures ``rows`` (NaN where a frame has none), each file read once."""
    from mace_ood.structures import read_structures

    refs = list(zip(np.asarray(sources)[rows], np.asarray(frames)[rows], strict=True))
    energies = [reference_energy(atoms, key) for atoms in read_structures(refs)]
    return np.array([np.nan if e is None else e for e in energies], dtype=float)


def seed_readout(seed_file: str, n_latent: int) -> ReadoutMap | None:
    """The LLPR feature map of the model that wrote ``seed_file`` (its attributes name the model
    file, hash, dtype and head); None when the model's readouts are not supported."""
    from mace_ood.extract.models import cached_model
    from mace_ood.extract.store import read_attrs

    attrs = read_attrs(seed_file)
    if attrs.get("llpr") != "supported":  # unsupported readouts, or a file not written by an extraction
        return None
    model = cached_model(str(attrs["model_file"]), "cpu", str(attrs["default_dtype"]), str(attrs["model_sha256"]))
    return ReadoutMap.from_model(model, str(attrs["head"]), n_latent)


def _structure_blocks(offsets: np.ndarray, counts: np.ndarray, rows: np.ndarray, block_atoms: int):
    """Runs of consecutive structure rows whose atoms make about ``block_atoms`` rows."""
    rows = np.asarray(rows, dtype=np.int64)
    start = 0
    while start < len(rows):
        stop, atoms = start, 0
        while stop < len(rows) and (stop == start or (atoms + counts[rows[stop]] <= block_atoms
                                                       and rows[stop] == rows[stop - 1] + 1)):
            atoms += int(counts[rows[stop]])
            stop += 1
        yield rows[start:stop]
        start = stop


def jacobian_gram(latents, seed: int, rows: np.ndarray, block_atoms: int = 65536) -> np.ndarray:
    """sum over the atoms of structures ``rows`` and x, y, z of J J^T, from the stored Jacobian."""
    offsets, counts = latents["atom_offset"].values, latents["n_atoms"].values
    width = latents.sizes["llpr_jacobian"] // 3
    gram = np.zeros((width, width))
    for block in _structure_blocks(offsets, counts, rows, block_atoms):
        a, b = int(offsets[block[0]]), int(offsets[block[-1]] + counts[block[-1]])
        values = latents["llpr_force_jacobian"].isel(seed=seed, atom=slice(a, b)).values
        rows_xyz = np.asarray(values, dtype=np.float64).reshape(-1, width)
        rows_xyz = rows_xyz[np.isfinite(rows_xyz).all(axis=1)]  # computed in domains: not stored
        gram += rows_xyz.T @ rows_xyz
    return gram


def seed_features(latents, seed: int, readout: ReadoutMap, rows: np.ndarray, block_atoms: int = 65536):
    """Yield (per-atom features, per-structure summed features) of seed ``seed`` over structures
    ``rows``, a block of consecutive structures at a time (memory flat)."""
    offsets, counts = latents["atom_offset"].values, latents["n_atoms"].values
    has_layers = "layer_energy" in latents
    for block in _structure_blocks(offsets, counts, rows, block_atoms):
        a, b = int(offsets[block[0]]), int(offsets[block[-1]] + counts[block[-1]])
        latent = np.asarray(latents["latent"].isel(seed=seed, atom=slice(a, b)).values, dtype=np.float64)
        layers = latents["layer_energy"].isel(seed=seed, atom=slice(a, b)).values if has_layers else None
        if readout.n_earlier and layers is None:
            raise ValueError("the latent files hold no layer_energy (extracted before LLPR was stored)")
        atom_features = readout.features(latent, layers)
        yield atom_features, structure_sums(atom_features, counts[block])


def fit_family_llpr(
    latents, fit: np.ndarray, calibration: np.ndarray, validation=None, energy_key: str = "REF_energy",
    validation_name: str = "", block_atoms: int = 65536,
) -> list[SeedLLPR] | None:
    """Each seed's LLPR, F^T F over the ``fit`` structures (boolean mask) of the family's training
    latents, alpha and varsigma calibrated on ``validation`` latents (an opened evaluation) when
    given, else on the ``calibration`` structures; uncalibrated (alpha = 1) without labelled
    energies or without the model's energies (``forces: false``). None when a seed's model is not
    supported (its readouts are not MACE's standard ones)."""
    seed_files = list(latents.attrs["seed_files"])
    n_latent = int(latents.sizes["feature"])
    readouts = [seed_readout(path, n_latent) for path in seed_files]
    if any(r is None for r in readouts):
        return None
    if validation is not None and "energy" in validation:
        labelled, rows, where = validation, np.arange(validation.sizes["structure"]), f"validation {validation_name}"
    elif "energy" in latents and calibration.any():
        labelled, rows, where = latents, np.flatnonzero(calibration), "training runs of the first folds (trained on)"
    else:
        labelled, rows, where = None, np.zeros(0, dtype=np.int64), "none"
    truth = (reference_energies(labelled["source_file"].values.astype(str), labelled["frame_index"].values,
                                rows, energy_key) if labelled is not None else np.zeros(0))
    known = np.isfinite(truth)
    out = []
    for s, readout in enumerate(readouts):
        accumulator = GramAccumulator(readout.width)
        for atom_features, sums in seed_features(latents, s, readout, np.flatnonzero(fit), block_atoms):
            accumulator.add(atom_features, sums)
        seed_llpr = accumulator.seed_llpr(readout)
        if "llpr_force_jacobian" in latents:
            seed_llpr.force_inverse = regularised_inverse(jacobian_gram(latents, s, np.flatnonzero(fit), block_atoms),
                                                          DEFAULT_LAMBDA)
        if known.sum() >= 2:
            sums = np.concatenate([block_sums for _, block_sums in
                                   seed_features(labelled, s, readout, rows[known], block_atoms)])
            errors = labelled["energy"].values[s, rows[known]] - truth[known]
            seed_llpr.alpha, seed_llpr.lam = calibrate(seed_llpr.gram, sums, errors)
            seed_llpr.structure_inverse = regularised_inverse(seed_llpr.gram, seed_llpr.lam)
            seed_llpr.calibrated_on, seed_llpr.n_calibration = where, int(known.sum())
        out.append(seed_llpr)
    if out and out[0].calibrated_on == "none":
        log.warning("LLPR uncalibrated (alpha = 1): no labelled energies (%r) with model energies (`forces: true`)",
                    energy_key)
    return out
