"""The select stage: which structures of one evaluation go to DFT, in pick order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from mace_ood.config import SelectConfig
from mace_ood.select.diverse import nearest, select_diverse
from mace_ood.select.top import select_top


@dataclass
class Selection:
    """The picks (rows of the table, in pick order, with ``selected``, ``group_size``,
    ``nearest_training_id`` and ``nearest_training_distance``) and what to tell the user."""

    rows: pd.DataFrame
    n_candidates: int
    strategy: str
    note: str


def select_structures(
    table: pd.DataFrame,
    select: SelectConfig,
    descriptors: np.ndarray | None = None,
    training_descriptors: np.ndarray | None = None,
    training_ids: np.ndarray | None = None,
    reference: bool = False,
) -> Selection:
    """Pick up to ``select.top_k`` rows of ``table`` (ranked, with ``ood``).

    ``descriptors`` are row-aligned with ``table``. The ``diverse`` strategy needs them; on the
    family's own training set (``reference``) there is nothing new to be diverse about, so the
    top by score is taken.
    """
    score, k = select.score, select.top_k
    trusted = np.ones(len(table), dtype=bool)
    if select.trust_max is not None:
        trusted = ~(table[score].to_numpy() > select.trust_max)
    if select.trust_max_force_rmse is not None and "predicted_force_rmse" in table.columns:
        trusted &= ~(table["predicted_force_rmse"].to_numpy() > select.trust_max_force_rmse)
    candidates = np.flatnonzero(table["ood"].to_numpy() & trusted)
    strategy = "top" if select.strategy == "top" or reference or descriptors is None else "diverse"
    note = ""
    if strategy == "top":
        rows = select_top(table[trusted], k).copy()
        rows["group_size"] = np.nan
        index = table.index.get_indexer(rows.index)
    else:
        picks = select_diverse(
            descriptors[candidates], table[score].to_numpy()[candidates], k, training_descriptors,
            select.score_weight, select.density_weight,
        )
        index = candidates[picks.order]
        group = list(picks.group_size)
        if len(index) < k:
            note = (f"only {len(candidates)} of the {k} wanted structures are above the OOD threshold; "
                    f"the rest are filled by score and marked ood=False")
            taken = set(index)
            fill = [i for i in np.argsort(-np.nan_to_num(table[score].to_numpy(), nan=-np.inf), kind="stable")
                    if i not in taken and trusted[i]][: k - len(index)]
            index = np.concatenate([index, np.asarray(fill, dtype=np.int64)])
            group += [1] * len(fill)
        rows = table.iloc[index].copy()
        rows["group_size"] = group
    rows["selected"] = np.arange(1, len(rows) + 1)
    rows["nearest_training_id"] = ""
    rows["nearest_training_distance"] = np.nan
    if descriptors is not None and training_descriptors is not None and len(training_descriptors) and len(rows):
        which, distance = nearest(
            np.asarray(descriptors[index], dtype=np.float32), np.asarray(training_descriptors, dtype=np.float32)
        )
        rows["nearest_training_id"] = np.asarray(training_ids)[which]
        rows["nearest_training_distance"] = distance
    return Selection(rows=rows, n_candidates=len(candidates), strategy=strategy, note=note)
