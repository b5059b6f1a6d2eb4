"""Loading MACE `.model` files and describing what their latents are.

`.model` files are pickled torch modules: loading one runs code from the file.
Only load models you trust.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from mace_ood.extract.readout import llpr_unsupported

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class ModelError(ValueError):
    """A model file that cannot be used; the message names the file."""


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file, computed once per process for a given (path, size, mtime)."""
    stat = os.stat(path)
    return _sha256_cached(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4096)
def _sha256_cached(path: str, size: int, mtime_ns: int, block_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def resolve_device(device: str) -> str:
    """`auto` becomes `cuda` when a GPU is visible, else `cpu`; `cuda` and `cuda:N` must be visible."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but torch sees no GPU (torch.cuda.is_available() is False)")
    return device


def invariant_columns(model: torch.nn.Module, layers: str = "last") -> list[int]:
    """Columns of ``node_feats`` holding the invariant (0e) channels.

    ``node_feats`` concatenates every interaction layer's product output; each layer's
    irreps are read from ``model.products[i].linear.irreps_out``. ``layers="last"`` keeps the
    last layer only (what the readout sees), ``"all"`` every layer's scalars.
    """
    import mace  # noqa: F401  (mace makes e3nn's constants loadable under torch>=2.6)
    from e3nn import o3

    per_layer: list[list[int]] = []
    offset = 0
    for product in model.products:
        irreps = o3.Irreps(str(product.linear.irreps_out))
        columns: list[int] = []
        for (_, irrep), block in zip(irreps, irreps.slices(), strict=True):
            if irrep.l == 0 and irrep.p == 1:
                columns.extend(range(offset + block.start, offset + block.stop))
        per_layer.append(columns)
        offset += irreps.dim
    if layers == "last":
        return per_layer[-1]
    return [c for columns in per_layer for c in columns]


@dataclass(frozen=True)
class ModelInfo:
    """What a family check needs to know about one seed."""

    path: str
    sha256: str
    r_max: float
    atomic_numbers: tuple[int, ...]
    num_interactions: int
    latent_width: int
    model_class: str
    heads: tuple[str, ...] = ("Default",)
    llpr_unsupported: str | None = None  # why LLPR cannot be computed for it, else None

    def as_dict(self) -> dict:
        return asdict(self)


def load_model(
    path: str | Path, device: str = "cpu", default_dtype: str = "float64", expected_sha256: str | None = None
) -> torch.nn.Module:
    """Load a MACE model in eval mode, on ``device``, in ``default_dtype``, gradients off.

    With ``expected_sha256``, the bytes read are hashed and a mismatch is refused before
    ``torch.load`` unpickles anything (the bytes checked are the bytes loaded).
    """
    import mace  # noqa: F401  (registers the classes the pickle refers to)

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    data = path.read_bytes()
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.lower():
            raise ModelError(
                f"{path}: SHA-256 is {actual}, but {expected_sha256.lower()} was planned; the file changed "
                "since the run was planned, not loading it"
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.load(io.BytesIO(data), map_location=device, weights_only=False)
    except Exception as exc:
        raise ModelError(f"{path}: not a loadable MACE model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "products") or not hasattr(model, "r_max"):
        raise ModelError(f"{path}: not a MACE model (got {type(model).__name__})")
    model = model.to(device=device, dtype=DTYPES[default_dtype]).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@lru_cache(maxsize=8)
def cached_model(path: str, device: str, default_dtype: str, sha256: str) -> torch.nn.Module:
    """One load per worker process per (file content, device, dtype); the content is verified."""
    return load_model(path, device, default_dtype, expected_sha256=sha256)


def model_heads(model: torch.nn.Module) -> list[str]:
    return [str(h) for h in (getattr(model, "heads", None) or ["Default"])]


def choose_head(heads: list[str], head: str | None, where: str) -> str:
    """The head to use: ``head`` if the model has it, else ``Default`` (any case), else the last."""
    if head is not None:
        if head not in heads:
            raise ModelError(f"{where}: has no head {head!r} (heads: {', '.join(heads)})")
        return head
    return next((h for h in heads if h.lower() == "default"), heads[-1])


def describe_model(path: str | Path, layers: str = "last") -> ModelInfo:
    model = load_model(path, "cpu", "float64")
    return ModelInfo(
        path=str(path),
        sha256=sha256_of(path),
        r_max=float(model.r_max),
        atomic_numbers=tuple(int(z) for z in model.atomic_numbers),
        num_interactions=int(model.num_interactions),
        latent_width=len(invariant_columns(model, layers)),
        model_class=type(model).__name__,
        heads=tuple(model_heads(model)),
        llpr_unsupported=llpr_unsupported(model),
    )


def check_family(family: str, infos: list[ModelInfo], head: str | None = None) -> None:
    """All seeds of a family must agree on r_max, elements and latent width and have the chosen
    head (one model is a family too: it gets every score but the committee's)."""
    first = infos[0]
    for info in infos[1:]:
        for field in ("r_max", "atomic_numbers", "latent_width"):
            if getattr(info, field) != getattr(first, field):
                raise ModelError(
                    f"family {family!r}: {Path(info.path).name} has {field}={getattr(info, field)} "
                    f"but {Path(first.path).name} has {getattr(first, field)}"
                )
    for info in infos:
        choose_head(list(info.heads), head, f"family {family!r}: {Path(info.path).name}")
    hashes = [info.sha256 for info in infos]
    if len(set(hashes)) < len(hashes):
        raise ModelError(f"family {family!r}: the same model file is listed twice (identical SHA-256)")
