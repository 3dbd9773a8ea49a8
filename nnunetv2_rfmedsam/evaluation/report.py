"""The text outputs of a comparison, rendered from its results (results.py): metrics.json, report.md (per-method
summaries, the paired comparison, links to the figures, the missing cases) and cases.csv (one row per method, case
and class).
"""
from __future__ import annotations

import csv
import io
import json
from typing import Mapping

from nnunetv2_rfmedsam.evaluation.case_evaluation import METRICS
from nnunetv2_rfmedsam.evaluation.case_figures import CaseToShow
from nnunetv2_rfmedsam.evaluation.results import FOREGROUND_MEAN


def render_metrics_json(result: dict) -> str:
    """metrics.json: the results, indented; `result` must be JSON-safe (results.json_safe)."""
    return json.dumps(result, indent=2, allow_nan=False) + "\n"


def render_report(result: dict, label_names: Mapping[int, str],
                  contours: Mapping[str, tuple[CaseToShow, bytes]] | None = None) -> str:
    """report.md: per-method summaries, the paired comparison, the figures and the missing cases."""
    settings = result["settings"]
    methods, baseline = list(result["methods"]), settings["baseline"]
    labels = [str(label) for label in label_names]
    headers = [name if name == label else f"{name} ({label})" for label, name in zip(labels, label_names.values())]
    lines = ["# Segmentation comparison", "",
             f"Ground truth: `{settings['ground_truth']}`. Baseline: **{baseline}**. "
             f"NSD tolerance: {settings['tolerance_mm']:g} mm.", ""]
    lines += _table(["Method", "Folder"], [[m, f"`{settings['predictions'][m]}`"] for m in methods])
    titles = {"dice": "Dice", "nsd": f"Normalised surface Dice ({settings['tolerance_mm']:g} mm)",
              "hd95": "HD95 (mm)"}
    for metric in METRICS:
        lines += ["", f"## {titles[metric]}: mean ± std (median) over cases", ""]
        rows = [[method] + [_summary_cell(result["methods"][method]["per_class"][label][metric]) for label in labels]
                + [_number(result["methods"][method]["foreground_mean"][metric])] for method in methods]
        lines += _table(["Method"] + headers + ["Foreground mean"], rows)
    lines += ["", "HD95 is undefined (left out of its summaries) where the reference or the prediction is empty. "
                  "Cases per class, with the number of undefined HD95 in brackets:", ""]
    lines += _table(["Method"] + headers,
                    [[method] + [f"{c['n_cases']} ({c['hd95_undefined']})" for c in
                                 (result["methods"][method]["per_class"][label] for label in labels)]
                     for method in methods])

    lines += ["", f"## Paired comparison with {baseline}: Dice, candidate − baseline", ""]
    if result["paired"]:
        rows = [[method, header, str(p["n_cases"]), _number(p["dice_diff_mean"], signed=True),
                 f"[{_number(p['ci95'][0], signed=True)}, {_number(p['ci95'][1], signed=True)}]",
                 _number(p["wilcoxon_p"]), f"{p['wins']} / {p['ties']} / {p['losses']}"]
                for method, per_class in result["paired"].items()
                for header, p in zip(headers + ["Foreground mean (per case)"],
                                     (per_class[label] for label in labels + [FOREGROUND_MEAN]))]
        lines += _table(["Method", "Class", "Cases", "Mean difference", "95% CI (bootstrap)", "Wilcoxon p",
                         "Wins / ties / losses"], rows)
        lines += ["", f"Cases both methods predicted; percentile bootstrap over cases "
                      f"({settings['bootstrap']['resamples']} resamples, seed {settings['bootstrap']['seed']}); "
                      f"two-sided Wilcoxon signed-rank test (n/a with fewer than 2 cases, 1 when every case ties); "
                      f"a tie is |difference| < 1e-8."]
    else:
        lines.append(f"Only one method: nothing to compare with {baseline}.")

    lines += ["", "## Figures", "", "![Dice per class](dice_per_class.png)", "",
              "![Per-case Dice against the baseline](paired_cases.png)"]
    if contours:
        lines += ["", "### Cases to look at", "", "Each on the slice where the methods differ most: the ground truth "
                  "in white, every method's class boundaries in its colour."]
        for name, (shown, _) in contours.items():
            lines += ["", f"**{shown.case}**: {'; '.join(shown.reasons)}", "", f"![{shown.case}]({name})"]

    lines += ["", "## Missing cases", ""]
    missing = {method: cases for method, cases in result["missing"].items() if cases}
    if missing:
        lines += [f"- **{method}** ({len(cases)}): {', '.join(cases)}" for method, cases in missing.items()]
    else:
        lines.append("None: every method predicted every ground-truth case.")
    return "\n".join(lines) + "\n"


def render_cases_csv(result: dict, label_names: Mapping[int, str]) -> str:
    """cases.csv: one row per method, case and class; an undefined value is an empty cell."""
    names = {str(label): name for label, name in label_names.items()}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "case", "label", "label_name", *METRICS])
    for record in result["cases"]:
        writer.writerow([record["method"], record["case"], record["label"], names[record["label"]],
                         *("" if record[m] is None else repr(record[m]) for m in METRICS)])
    return buffer.getvalue()


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _summary_cell(summary: dict) -> str:
    if summary["mean"] is None:
        return "n/a"
    return f"{_number(summary['mean'])} ± {_number(summary['std'])} ({_number(summary['median'])})"


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
