"""Summaries of per-case metric values, and paired comparisons of two methods over the same cases.

Conventions:

* **Summaries** (`summarize`) ignore NaN (an undefined HD95): nanmean, nanmedian and the population standard
  deviation (ddof=0, numpy's default); with no defined value at all, each is NaN.
* **Paired differences** are candidate minus baseline, one per case that both methods predicted.
* **Confidence interval** (`bootstrap_ci`): percentile bootstrap of the mean difference, resampling cases with
  replacement, `BOOTSTRAP_RESAMPLES` = 10000 resamples from a fixed seed (`BOOTSTRAP_SEED`), so a rerun gives
  the same interval. No case gives (NaN, NaN); one case gives its difference twice.
* **Ties**: a difference with |d| < `TIE_TOLERANCE` = 1e-8 is a tie; it counts neither as a win nor a loss
  and is set to exactly 0 before the Wilcoxon test, so that the test and the counts agree.
* **Wilcoxon signed-rank test** (`wilcoxon_p`, two-sided, `scipy.stats.wilcoxon`, zero differences dropped
  as in scipy's default 'wilcox' method): fewer than 2 cases gives NaN (no test is possible); all
  differences zero gives p = 1.0 (no evidence of any difference), without calling scipy, which warns there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import wilcoxon

TIE_TOLERANCE = 1e-8
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
# resamples drawn at once: bounds the index array to ~8 MB per 1000 cases
_BOOTSTRAP_CHUNK = 1000


@dataclass(frozen=True)
class PairedComparison:
    """A candidate against the baseline on the cases both predicted (differences are candidate - baseline)."""
    n_cases: int
    mean_difference: float
    ci95: tuple[float, float]
    wilcoxon_p: float
    wins: int
    ties: int
    losses: int


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation (ddof=0) and median, ignoring NaN; NaN when nothing is defined."""
    finite = np.asarray(values, dtype=float)
    finite = finite[~np.isnan(finite)]
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "median": float(np.median(finite))}


def bootstrap_ci(differences: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of `differences` (resampling cases)."""
    values = np.asarray(differences, dtype=float)
    if values.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.concatenate([
        values[rng.integers(0, values.size, size=(min(_BOOTSTRAP_CHUNK, resamples - start), values.size))].mean(axis=1)
        for start in range(0, resamples, _BOOTSTRAP_CHUNK)])
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value; NaN for fewer than 2 cases, 1.0 when all differences are ties."""
    values = _zero_ties(differences)
    if values.size < 2:
        return math.nan
    if not np.any(values):
        return 1.0
    return float(wilcoxon(values).pvalue)


def wins_ties_losses(differences: Sequence[float]) -> tuple[int, int, int]:
    """Cases where the candidate is better, equal (|d| < TIE_TOLERANCE) and worse."""
    values = _zero_ties(differences)
    return int(np.sum(values > 0)), int(np.sum(values == 0)), int(np.sum(values < 0))


def paired_comparison(candidate: Sequence[float], baseline: Sequence[float]) -> PairedComparison:
    """Compare per-case values of a candidate with the baseline's values for the same cases, in order."""
    candidate_values, baseline_values = np.asarray(candidate, dtype=float), np.asarray(baseline, dtype=float)
    if candidate_values.shape != baseline_values.shape:
        raise ValueError(f"paired values differ in number: {candidate_values.size} vs {baseline_values.size}")
    differences = candidate_values - baseline_values
    wins, ties, losses = wins_ties_losses(differences)
    return PairedComparison(
        n_cases=int(differences.size),
        mean_difference=float(differences.mean()) if differences.size else math.nan,
        ci95=bootstrap_ci(differences), wilcoxon_p=wilcoxon_p(differences), wins=wins, ties=ties, losses=losses)


def _zero_ties(differences: Sequence[float]) -> np.ndarray:
    values = np.asarray(differences, dtype=float).copy()
    values[np.abs(values) < TIE_TOLERANCE] = 0.0
    return values
