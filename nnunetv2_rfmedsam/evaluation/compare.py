"""Compare folders of segmentation predictions against ground truth (`compare_folders`).

Every folder holds nnU-Net-named NIfTI label maps, `<case>.nii.gz`. The ground-truth folder defines the cases;
each prediction folder is one method, the first one being the baseline that the others are compared with.
The metrics and their conventions (empty masks, NSD tolerance, HD95 definition) are those of
`nnunetv2_rfmedsam.evaluation.metrics`; the summaries and paired statistics those of
`nnunetv2_rfmedsam.evaluation.statistics`.

Labels: with a dataset.json, its labels except background; without one, the nonzero values found in the
ground truth. A label id outside them, in a ground-truth or a prediction file, is refused.

Missing cases: a ground-truth case that a method did not predict is named in a warning and listed in
metrics.json "missing"; it is left out of that method's summaries and of its paired comparison (pairs use
the cases both methods predicted). `strict=True` refuses missing cases instead. Prediction files without a
ground truth are ignored, with a warning.

Refused (`CompareError`, naming the file, case or method and what is wrong): a missing folder, an empty
ground-truth folder, an unreadable file, a non-integer or out-of-range label map, and a prediction whose
geometry (size, spacing, origin, direction; floats within a relative 1e-4) differs from its ground truth.
Every file is read and checked before anything is written, and each output replaces its file atomically
(written to a temporary file in the output folder, then renamed), so an error leaves the output folder as
it was.

Outputs in the output folder: metrics.json, report.md, cases.csv, dice_per_class.png, paired_cases.png, and
contours_<case>.png for the cases to look at (each candidate's largest loss and gain against the baseline and its
median case; see case_figures.py), on the images of `images_dir` (nnU-Net's `<case>_0000.nii.gz`) when given.
report.md links them.

The steps live in their own modules: case_files.py reads and checks the files, case_evaluation.py computes each
case's metrics, results.py assembles metrics.json, report.py and report_figures.py render the outputs.
"""
from __future__ import annotations

import math
import os
from typing import Mapping

from nnunetv2_rfmedsam.atomic_files import write_atomically
from nnunetv2_rfmedsam.evaluation.case_evaluation import CaseTask, evaluate_case, run_over_cases
from nnunetv2_rfmedsam.evaluation.case_files import (FILE_ENDING, CompareError, check_case_images,
                                                     ground_truth_label_ids, list_cases, load_label_names,
                                                     missing_cases, read_label_map)
from nnunetv2_rfmedsam.evaluation.metrics import DEFAULT_TOLERANCE_MM
from nnunetv2_rfmedsam.evaluation.report import render_cases_csv, render_metrics_json, render_report
from nnunetv2_rfmedsam.evaluation.report_figures import render_case_figures, render_figures
from nnunetv2_rfmedsam.evaluation.results import FOREGROUND_MEAN, assemble_results, json_safe

# the names other modules import from here (the command, the held-out evaluation, the click simulation)
__all__ = ["CompareError", "FOREGROUND_MEAN", "OUTPUT_FILES", "compare_folders", "read_label_map"]

OUTPUT_FILES = ("metrics.json", "report.md", "cases.csv", "dice_per_class.png", "paired_cases.png")


def compare_folders(gt_dir: str, preds: Mapping[str, str], out_dir: str, labels_json: str | None = None,
                    tolerance_mm: float = DEFAULT_TOLERANCE_MM, num_processes: int = 1,
                    strict: bool = False, images_dir: str | None = None) -> dict:
    """Evaluate every method's predictions against the ground truth and write the comparison to `out_dir`.

    `preds` maps method names to prediction folders, in order; the first method is the baseline.
    `num_processes` > 1 evaluates cases in that many worker processes; 1 evaluates them in this process.
    `images_dir`: the images (`<case>_0000.nii.gz`) under the contour figures; without it they show contours alone.
    Returns the content of metrics.json (undefined values as None).
    """
    methods = _check_arguments(gt_dir, preds, out_dir, tolerance_mm, num_processes)
    ground_truth = list_cases(gt_dir)
    if not ground_truth:
        raise CompareError(f"ground-truth folder {gt_dir} holds no {FILE_ENDING} cases")
    predicted = {method: list_cases(folder) for method, folder in methods.items()}
    missing = missing_cases(ground_truth, predicted, strict)
    if images_dir is not None:
        check_case_images(images_dir, sorted(ground_truth))

    if labels_json is not None:
        label_names = load_label_names(labels_json)
        labels_origin = f"the labels of {labels_json}"
    else:
        found = run_over_cases(ground_truth_label_ids, sorted(ground_truth.values()), num_processes,
                               "reading ground-truth labels")
        label_names = {label: str(label) for label in sorted(set().union(*found))}
        labels_origin = "the labels found in the ground truth (give a dataset.json to evaluate others)"
        if not label_names:
            raise CompareError(f"no foreground label to evaluate: the ground truth in {gt_dir} is all background")

    tasks = [CaseTask(case, path, {m: predicted[m][case] for m in methods if case in predicted[m]},
                      tuple(label_names), labels_origin, tolerance_mm)
             for case, path in sorted(ground_truth.items())]
    records = [record for case_records in run_over_cases(evaluate_case, tasks, num_processes, "comparing cases")
               for record in case_records]

    result = json_safe(assemble_results(records, methods, label_names, missing, gt_dir, tolerance_mm))
    contours = render_case_figures(result, ground_truth, predicted, label_names, images_dir)
    outputs = {
        "metrics.json": render_metrics_json(result).encode(),
        "report.md": render_report(result, label_names, contours).encode(),
        "cases.csv": render_cases_csv(result, label_names).encode(),
        **render_figures(result, label_names),
        **{name: png for name, (_, png) in contours.items()},
    }
    os.makedirs(out_dir, exist_ok=True)
    for name in (*OUTPUT_FILES, *contours):
        write_atomically(os.path.join(out_dir, name), outputs[name])
    return result


def _check_arguments(gt_dir: str, preds: Mapping[str, str], out_dir: str, tolerance_mm: float,
                     num_processes: int) -> dict[str, str]:
    if not os.path.isdir(gt_dir):
        raise CompareError(f"ground-truth folder {gt_dir} does not exist")
    if not preds:
        raise CompareError("no prediction folder given")
    for method, folder in preds.items():
        if not method:
            raise CompareError(f"prediction folder {folder} has an empty method name")
        if not os.path.isdir(folder):
            raise CompareError(f"prediction folder of method {method}, {folder}, does not exist")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CompareError(f"output folder {out_dir} exists and is not a folder")
    if not (math.isfinite(tolerance_mm) and tolerance_mm > 0):
        raise CompareError(f"the NSD tolerance must be a positive number of mm, not {tolerance_mm}")
    if num_processes < 1:
        raise CompareError(f"the number of processes must be at least 1, not {num_processes}")
    return dict(preds)
