"""Conformal p-values: the ``ood`` flag, and the size-aware, veto-free ``combined`` score.

The flag's guarantee comes from one step. The training set's G runs (:mod:`mace_ood.runs`) are
its independent units, every training structure is scored out of fold
(:mod:`mace_ood.score.reference`), and a structure's p-value for the ranking score R is

    p = (1 + sum over runs of the run's share of structures with R >= r) / (G + 1)

(:func:`group_pvalue`); ``ood`` is ``p <= alpha``. A frame of a new run and one frame drawn from
each training run are exchangeable when the runs are drawn alike, and p is the average of their
rank p-value over those draws, so the false-flag rate on new in-distribution runs is at most
floor(alpha (G + 1)) / (G + 1) (Vovk et al., *Algorithmic Learning in a Random World*, 2005;
cross-conformal scores: Barber et al. 2021). When alpha < 1 / (G + 1) no p-value can reach
alpha; the flag is then "above every frame of every run", at most 1 / (G + 1), and the run says
so (:func:`effective_alpha`, :func:`delivered_rate`).

Everything else here only decides *what* R is, so it cannot break the guarantee:

- A per-structure max over n atoms grows with n. For a ``<score>_max`` component the structure's
  statistic is the Sidak-adjusted p-value of its most unusual atom against the calibration
  *atoms*, 1 - (1 - p_atom)^n: a bigger cell of the training material is not more surprising.
- Beyond the largest calibration value an exponential tail (its scale fitted to the top
  ``TAIL_FRACTION`` of the pool) continues the p-value, so far-out structures stay ranked instead
  of tying at 1 / (N + 1); inside the pool the p-value is the count.
- ``combined`` = -log10 of the smallest component p-value: one-sided, so a component far below
  its calibration median (zero force deviation on a perfect strained cell) cannot cancel another
  component's exceedance.

A training structure is scored like a new one: its own run is left out of every pool it is
compared with, so its MD neighbours do not make it look ordinary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TAIL_FRACTION = 0.1  # the share of the pool the exponential tail is fitted to
MIN_TAIL = 5  # fewer pool values than 2 * MIN_TAIL: no tail, the empirical p-value only


def group_pvalue(values: np.ndarray, calibration: np.ndarray, calibration_groups: np.ndarray,
                 own_at_or_above: np.ndarray | None = None, own_count: np.ndarray | None = None) -> np.ndarray:
    """The conformal p-value with each of the G calibration groups (runs) counted once:

        p(x) = (1 + sum_g #{i in g: c_i >= x} / n_g) / (G + 1).

    A new run's structure and one frame drawn at random from each of G runs are exchangeable, and p
    is the average over those draws of their rank p-value, so it is valid at the group level: its
    smallest value is 1 / (G + 1), however many frames the runs hold. A row that is itself a
    calibration structure (``own_*`` from :func:`group_own_counts`) leaves its group out: the sum
    runs over the other G - 1 groups and the denominator is G. NaN for a NaN value or no group."""
    calibration = np.asarray(calibration, dtype=float)
    keep = np.isfinite(calibration)
    calibration = calibration[keep]
    values = np.asarray(values, dtype=float)
    if calibration.size == 0:
        return np.full(values.shape, np.nan)
    _, codes, sizes = np.unique(np.asarray(calibration_groups, dtype=object)[keep].astype(str),
                                return_inverse=True, return_counts=True)
    n_groups = len(sizes)
    order = np.argsort(calibration, kind="stable")
    ordered, weights = calibration[order], 1.0 / sizes[codes[order]]
    weight_at_or_above = np.concatenate([np.cumsum(weights[::-1])[::-1], [0.0]])
    mass = weight_at_or_above[np.searchsorted(ordered, values, side="left")]
    groups = np.full(values.shape, float(n_groups))
    if own_at_or_above is not None:
        own_count = np.asarray(own_count, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            mass = mass - np.where(own_count > 0, np.asarray(own_at_or_above, dtype=float) / own_count, 0.0)
        groups = groups - (own_count > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(groups > 0, (1.0 + np.maximum(mass, 0.0)) / (groups + 1.0), np.nan)
    return np.where(np.isnan(values), np.nan, p)


def at_or_above_in_group(
    member_values: np.ndarray, member_groups: np.ndarray, query_values: np.ndarray, query_groups: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per query: how many members of its group (integer codes) have a value >= its value, and the
    group's size. One sort and three binary searches (a loop over groups was O(groups x members):
    minutes at 300,000 training structures)."""
    member_values, query_values = np.asarray(member_values, dtype=float), np.asarray(query_values, dtype=float)
    member_groups, query_groups = np.asarray(member_groups, dtype=np.int64), np.asarray(query_groups, dtype=np.int64)
    _, rank = np.unique(np.concatenate([member_values, query_values]), return_inverse=True)
    levels = int(rank.max()) + 2 if rank.size else 2  # NaN ranks last: counted as at or above, as a sort put it
    member_key = np.sort(member_groups * levels + rank[: len(member_values)])
    query_key = query_groups * levels + rank[len(member_values) :]
    group_end = np.searchsorted(member_key, (query_groups + 1) * levels, side="left")
    group_start = np.searchsorted(member_key, query_groups * levels, side="left")
    first_at_or_above = np.searchsorted(member_key, query_key, side="left")
    return group_end - first_at_or_above, group_end - group_start


def group_own_counts(values: np.ndarray, groups: np.ndarray, mine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the rows ``mine`` (calibration structures), how many calibration values of their own group
    (``groups``, over the rows ``mine``) are >= their own value, and the group's size; 0 elsewhere."""
    values = np.asarray(values, dtype=float)
    at_or_above, count = np.zeros(len(values)), np.zeros(len(values))
    mine = np.asarray(mine, dtype=bool) & np.isfinite(values)
    if mine.any():
        _, codes = np.unique(np.asarray(groups, dtype=object)[mine].astype(str), return_inverse=True)
        at_or_above[mine], count[mine] = at_or_above_in_group(values[mine], codes, values[mine], codes)
    return at_or_above, count


def effective_alpha(alpha: float, n_calibration: int) -> float:
    """The level the flag is tested at: ``alpha``, or 1 / (n + 1) when n (calibration groups) is too
    small to reach it."""
    return max(alpha, 1.0 / (n_calibration + 1)) if n_calibration > 0 else float("nan")


def delivered_rate(alpha: float, n_calibration: int) -> float:
    """The false-flag rate the flag delivers on in-distribution data: floor(a (n+1)) / (n+1), a the
    effective alpha."""
    if n_calibration <= 0:
        return float("nan")
    a = effective_alpha(alpha, n_calibration)
    return math.floor(a * (n_calibration + 1) + 1e-9) / (n_calibration + 1)


def group_threshold(calibration: np.ndarray, calibration_groups: np.ndarray, alpha: float) -> float:
    """The score a structure must exceed to be flagged by :func:`group_pvalue` at ``alpha`` (the
    effective alpha over the groups): the smallest calibration value above which at most
    alpha (G + 1) - 1 groups' worth of calibration structures lie."""
    calibration = np.asarray(calibration, dtype=float)
    keep = np.isfinite(calibration)
    if not keep.any():
        return float("nan")
    values = np.unique(calibration[keep])
    n_groups = len(set(np.asarray(calibration_groups, dtype=object)[keep].astype(str).tolist()))
    level = effective_alpha(alpha, n_groups)
    above = group_pvalue(np.nextafter(values, np.inf), calibration, calibration_groups)
    return float(values[np.argmax(above <= level + 1e-12)])


@dataclass
class Pool:
    """Sorted calibration values (atoms or structures) a component's p-values are taken against,
    and the exponential tail beyond the largest one, m: p(x) = exp(-(x - m) / beta) / (N + 1), beta
    the mean excess over u of the top ``TAIL_FRACTION`` (u the value below them)."""

    values: np.ndarray
    tail_start: float = np.nan
    tail_scale: float = np.nan

    @classmethod
    def of(cls, values: np.ndarray) -> Pool:
        values = np.sort(np.asarray(values, dtype=float)[np.isfinite(values)])
        n = values.size
        if n < 2 * MIN_TAIL:
            return cls(values)
        k = max(MIN_TAIL, math.ceil(TAIL_FRACTION * n))
        start = values[n - k - 1]
        scale = float(np.mean(values[n - k :] - start))
        return cls(values, float(start), scale) if scale > 0 else cls(values)

    def log_pvalue(self, x: np.ndarray, own_at_or_above: np.ndarray | None = None,
                   own_count: np.ndarray | None = None) -> np.ndarray:
        """log p per value: (1 + #{pool >= x}) / (N + 1), a row's own pool entries (``own_*``) left
        out, and below it the exponential tail where that is smaller. NaN for NaN."""
        x = np.asarray(x, dtype=float)
        n = self.values.size
        if n == 0:
            return np.full(x.shape, np.nan)
        at_or_above = (n - np.searchsorted(self.values, x, side="left")).astype(float)
        size = np.full(x.shape, float(n))
        if own_at_or_above is not None:
            at_or_above = at_or_above - np.asarray(own_at_or_above, dtype=float)
            size = size - np.asarray(own_count, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            # a calibration structure whose own group is the whole pool has nothing to be compared with
            log_p = np.where(size > 0, np.log1p(at_or_above) - np.log1p(size), np.nan)
            if np.isfinite(self.tail_scale):
                # only beyond the largest value: inside the pool the count is the valid p-value, and a
                # tail below it there would make big cells (whose Sidak reaches far into it) too surprising
                top = self.values[-1]
                log_p = np.where(x > top, -np.log1p(size) - (x - top) / self.tail_scale, log_p)
        return np.where(np.isnan(x), np.nan, log_p)


def sidak_log_pvalue(log_p_atom: np.ndarray, n_atoms: np.ndarray) -> np.ndarray:
    """log of 1 - (1 - p)^n: the p-value of the smallest of n atom p-values (exact for independent
    atoms, conservative for positively correlated ones), stable for tiny p."""
    log_p = np.asarray(log_p_atom, dtype=float)
    n = np.asarray(n_atoms, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        p = np.exp(log_p)
        exact = np.log(-np.expm1(n * np.log1p(-np.minimum(p, 1.0))))
        small = np.log(n) + log_p  # 1 - (1 - p)^n = n p (1 + O(n p))
    return np.where(np.isnan(log_p), np.nan, np.where(n * p < 1e-8, small, np.minimum(exact, 0.0)))


def combined_from_log_pvalues(log_pvalues: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``combined`` = -log10 min_c p_c over the components, and the name of that component per row
    (NaN components are ignored; all NaN gives NaN and '')."""
    if not log_pvalues:
        raise ValueError("the combined score needs at least one component score")
    names = list(log_pvalues)
    stacked = np.stack([np.asarray(log_pvalues[name], dtype=float) for name in names])
    filled = np.where(np.isnan(stacked), np.inf, stacked)
    which = np.argmin(filled, axis=0)
    smallest = np.take_along_axis(filled, which[None], axis=0)[0]
    combined = np.where(np.isinf(smallest) & (smallest > 0), np.nan, -smallest / math.log(10))
    driver = np.where(np.isnan(combined), "", np.asarray(names, dtype=object)[which])
    return combined, driver
