"""Structure ids come from file labels: short, unique, and built in O(files)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mace_ood.structures import file_labels


def quadratic_labels(files: list[str]) -> dict[str, str]:
    """The b37067b implementation (list.count in a loop), kept as the reference."""
    stems = [Path(f).stem for f in files]
    clashing = {s for s in stems if stems.count(s) > 1}
    if not clashing:
        return dict(zip(files, stems, strict=True))
    common = Path(os.path.commonpath([os.path.dirname(f) for f in files]))

    def longer(path: str, keep_suffix: bool) -> str:
        relative = Path(path).relative_to(common)
        return str(relative if keep_suffix else relative.with_suffix("")).replace(os.sep, "__")

    labels = {f: (longer(f, False) if s in clashing else s) for f, s in zip(files, stems, strict=True)}
    values = list(labels.values())
    return {f: longer(f, True) if values.count(label) > 1 else label for f, label in labels.items()}


def test_labels_equal_the_reference_and_are_unique():
    rng = np.random.default_rng(0)
    files = sorted({
        f"/data/{rng.choice(['md', 'relax', 'md/hot'])}/{rng.choice(['a', 'b', 'c', 'cell_' + str(i)])}"
        f".{rng.choice(['xyz', 'cif'])}"
        for i in range(300)
    })
    labels = file_labels(files)
    assert labels == quadratic_labels(files)
    assert len(set(labels.values())) == len(files)
    assert file_labels(["/x/a.xyz", "/x/b.xyz"]) == {"/x/a.xyz": "a", "/x/b.xyz": "b"}
    assert file_labels(["/x/p/a.xyz", "/x/q/a.xyz"]) == {"/x/p/a.xyz": "p__a", "/x/q/a.xyz": "q__a"}
