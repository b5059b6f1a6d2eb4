"""Shared CLI options: every option once, as an ``Annotated`` type; choices are the config's Literals
(typer turns a ``Literal`` into a click choice, so ``--help`` lists the valid values).

Multi-word options take both spellings (``--batch_size`` and ``--batch-size``): mace users
type underscores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mace_ood.config import DefaultDtype, ScoreName


def spellings(name: str) -> tuple[str, ...]:
    """``--name_with_parts`` and ``--name-with-parts`` (one spelling when there is one word)."""
    dashed, underscored = f"--{name.replace('_', '-')}", f"--{name.replace('-', '_')}"
    return (underscored, dashed) if dashed != underscored else (dashed,)


ConfigArg = Annotated[Path, typer.Argument(help="YAML run configuration.", show_default=False)]
RunDirArg = Annotated[Path, typer.Argument(help="A finished run's output_dir.", show_default=False)]
OutputDir = Annotated[Path | None, typer.Option(*spellings("output_dir"), help="Override `output_dir`.")]
DeviceOption = Annotated[
    str | None, typer.Option(*spellings("device"), help="auto | cpu | cuda | cuda:N (overrides the config).")
]
DefaultDtypeOption = Annotated[
    DefaultDtype | None, typer.Option(*spellings("default_dtype"), help="Overrides the config's dtype.")
]
BatchSize = Annotated[int | None, typer.Option(*spellings("batch_size"), help="Structures per forward pass.")]
TopK = Annotated[int | None, typer.Option(*spellings("top_k"), help="Structures selected per evaluation.")]
Score = Annotated[ScoreName | None, typer.Option(*spellings("score"), help="Ranking score (overrides select.score).")]
Refresh = Annotated[bool, typer.Option("--refresh", help="Recompute all latents (no reuse, resume or copies).")]
NBootstrap = Annotated[int, typer.Option(*spellings("n_bootstrap"), help="Bootstrap resamples for the 95% intervals.")]
ForcesKey = Annotated[str, typer.Option(*spellings("forces_key"), help="atoms.arrays key of the reference forces.")]
Labels = Annotated[
    Path | None, typer.Option("--labels", help="CSV of structure_id,is_ood: per-structure OOD labels for evaluate.")
]
DeploymentName = Annotated[str, typer.Option("--name", help="Deployment name.")]
Cron = Annotated[str | None, typer.Option("--cron", help='Schedule, e.g. "0 3 * * *" for 03:00 daily.')]
Workdir = Annotated[Path, typer.Option("--workdir", help="Where the demo data, config and run go.")]
CacheDir = Annotated[
    Path | None, typer.Option(*spellings("cache_dir"), help="Trained demo models are cached here (default ~/.cache/mace-ood).")
]
Retrain = Annotated[bool, typer.Option("--retrain", help="Train the demo models again even if cached.")]
