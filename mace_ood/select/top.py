"""The ``top`` strategy: the K structures ranked highest by one score."""

from __future__ import annotations

import pandas as pd


def select_top(table: pd.DataFrame, top_k: int) -> pd.DataFrame:
    """The ``top_k`` rows of lowest ``rank`` (1 = most out of distribution), in rank order."""
    return table.nsmallest(top_k, "rank")
