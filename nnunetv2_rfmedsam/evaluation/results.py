"""The results of a comparison, as metrics.json holds them: the settings, each method's summaries per class, the
paired comparison of each candidate with the baseline (per class, and of each case's mean Dice over the classes),
the missing cases and the per-case records.

The summaries and paired statistics are those of `nnunetv2_rfmedsam.evaluation.statistics`. A method's values cover
the cases it predicted; a pair covers the cases both methods predicted.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Mapping

import numpy as np

from nnunetv2_rfmedsam.evaluation.case_evaluation import METRICS
from nnunetv2_rfmedsam.evaluation.statistics import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE,
                                                     paired_comparison, summarize)

# the key, beside the labels, of the paired comparison of each case's mean Dice over the classes
FOREGROUND_MEAN = "foreground_mean"


def assemble_results(records: list[dict], methods: Mapping[str, str], label_names: Mapping[int, str],
                     missing: Mapping[str, list[str]], gt_dir: str, tolerance_mm: float) -> dict:
    """The metrics.json content: settings, per-method summaries, paired comparisons, missing and per-case values."""
    labels = [str(label) for label in label_names]
    values = values_by_method_label_case(records)
    summaries = {}
    for method in methods:
        per_class = {}
        for label in labels:
            cases = values.get((method, label), {})
            per_class[label] = {metric: summarize([v[metric] for v in cases.values()]) for metric in METRICS}
            per_class[label]["n_cases"] = len(cases)
            per_class[label]["hd95_undefined"] = sum(math.isnan(v["hd95"]) for v in cases.values())
        summaries[method] = {"per_class": per_class, "foreground_mean": {
            metric: nanmean([per_class[label][metric]["mean"] for label in labels]) for metric in METRICS}}

    baseline, *candidates = methods
    paired = {}
    for method in candidates:
        paired[method] = {}
        for label in labels:
            baseline_dice, candidate_dice = paired_dice(values, baseline, method, label)
            paired[method][label] = _paired_record(paired_comparison(candidate_dice, baseline_dice))
        # per case, the mean Dice over the classes: the method's overall difference, with its own interval
        common = sorted(set.intersection(*(set(values.get((m, label), {})) for m in (baseline, method)
                                           for label in labels)))
        means = [[nanmean([values[(m, label)][case]["dice"] for label in labels]) for case in common]
                 for m in (baseline, method)]
        paired[method][FOREGROUND_MEAN] = _paired_record(paired_comparison(means[1], means[0]))
    return {
        "settings": {"ground_truth": os.path.abspath(gt_dir),
                     "predictions": {m: os.path.abspath(folder) for m, folder in methods.items()},
                     "baseline": baseline, "tolerance_mm": tolerance_mm,
                     "labels": {str(label): name for label, name in label_names.items()},
                     "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
                                   "confidence": CONFIDENCE}},
        "methods": summaries,
        "paired": paired,
        "missing": {method: list(missing[method]) for method in methods},
        "cases": records,
    }


def json_safe(value):
    """NaN and infinities become None (JSON has no NaN); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def values_by_method_label_case(records: Iterable[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """(method, label) -> case -> that case's record."""
    values: dict[tuple[str, str], dict[str, dict]] = {}
    for record in records:
        values.setdefault((record["method"], record["label"]), {})[record["case"]] = record
    return values


def paired_dice(values: Mapping[tuple[str, str], Mapping[str, dict]], baseline: str, candidate: str,
                label: str) -> tuple[list[float], list[float]]:
    """Dice of the baseline and of the candidate on the cases both predicted, in case order."""
    baseline_cases, candidate_cases = values.get((baseline, label), {}), values.get((candidate, label), {})
    common = sorted(set(baseline_cases) & set(candidate_cases))
    return [baseline_cases[c]["dice"] for c in common], [candidate_cases[c]["dice"] for c in common]


def nanmean(values: list[float]) -> float:
    """The mean of the defined (non-NaN) values; NaN when there is none."""
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def _paired_record(comparison) -> dict:
    return {"n_cases": comparison.n_cases, "dice_diff_mean": comparison.mean_difference,
            "ci95": list(comparison.ci95), "wilcoxon_p": comparison.wilcoxon_p,
            "wins": comparison.wins, "ties": comparison.ties, "losses": comparison.losses}
