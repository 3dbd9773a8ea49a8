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
"""
from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import warnings
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, TypeVar

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunetv2_rfmedsam.atomic_files import write_atomically
from nnunetv2_rfmedsam.evaluation.case_figures import (CaseToShow, case_figure, cases_to_show, figure_file_name,
                                                      most_different_slice)
from nnunetv2_rfmedsam.evaluation.metrics import DEFAULT_TOLERANCE_MM, case_metrics
from nnunetv2_rfmedsam.evaluation.plots import dice_per_class_figure, figure_to_png, paired_cases_figure
from nnunetv2_rfmedsam.evaluation.statistics import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE,
                                                     paired_comparison, summarize)

FILE_ENDING = ".nii.gz"
GEOMETRY_RTOL = 1e-4
# origins near 0 mm and direction cosines near 0 need an absolute floor under the relative tolerance
GEOMETRY_ATOL = 1e-4
METRICS = ("dice", "nsd", "hd95")
# the key, beside the labels, of the paired comparison of each case's mean Dice over the classes
FOREGROUND_MEAN = "foreground_mean"
OUTPUT_FILES = ("metrics.json", "report.md", "cases.csv", "dice_per_class.png", "paired_cases.png")

_Task = TypeVar("_Task")
_Result = TypeVar("_Result")


class CompareError(Exception):
    """Bad input; the message names the file, case or method and what is wrong."""


@dataclass(frozen=True)
class Geometry:
    """The physical grid of an image, as SimpleITK reports it (x, y, z order)."""
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def difference(self, other: "Geometry") -> str | None:
        """'what differs: self vs other' for the first differing property, or None when they match."""
        if self.size != other.size:
            return f"size {self.size} vs {other.size}"
        for name in ("spacing", "origin", "direction"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if not np.allclose(mine, theirs, rtol=GEOMETRY_RTOL, atol=GEOMETRY_ATOL):
                return f"{name} {_rounded(mine)} vs {_rounded(theirs)}"
        return None


@dataclass(frozen=True)
class CaseTask:
    """One case: its ground truth and the prediction of every method that has one."""
    case: str
    ground_truth: str
    predictions: dict[str, str]
    labels: tuple[int, ...]
    labels_origin: str
    tolerance_mm: float


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
    missing = _missing_cases(ground_truth, predicted, strict)

    if labels_json is not None:
        label_names = load_label_names(labels_json)
        labels_origin = f"the labels of {labels_json}"
    else:
        found = _run_cases(ground_truth_label_ids, sorted(ground_truth.values()), num_processes,
                           "reading ground-truth labels")
        label_names = {label: str(label) for label in sorted(set().union(*found))}
        labels_origin = "the labels found in the ground truth (give a dataset.json to evaluate others)"
        if not label_names:
            raise CompareError(f"no foreground label to evaluate: the ground truth in {gt_dir} is all background")

    tasks = [CaseTask(case, path, {m: predicted[m][case] for m in methods if case in predicted[m]},
                      tuple(label_names), labels_origin, tolerance_mm)
             for case, path in sorted(ground_truth.items())]
    records = [record for case_records in _run_cases(evaluate_case, tasks, num_processes, "comparing cases")
               for record in case_records]

    result = _json_safe(assemble_results(records, methods, label_names, missing, gt_dir, tolerance_mm))
    contours = render_case_figures(result, ground_truth, predicted, label_names, images_dir)
    outputs = {
        "metrics.json": (json.dumps(result, indent=2, allow_nan=False) + "\n").encode(),
        "report.md": render_report(result, label_names, contours).encode(),
        "cases.csv": render_cases_csv(result, label_names).encode(),
        **render_figures(result, label_names),
        **{name: png for name, (_, png) in contours.items()},
    }
    os.makedirs(out_dir, exist_ok=True)
    for name in (*OUTPUT_FILES, *contours):
        write_atomically(os.path.join(out_dir, name), outputs[name])
    return result


def render_case_figures(result: dict, ground_truth: Mapping[str, str], predicted: Mapping[str, Mapping[str, str]],
                        label_names: Mapping[int, str], images_dir: str | None) -> dict[str, tuple[CaseToShow, bytes]]:
    """contours_<case>.png of the cases to look at (case_figures.py), as PNG bytes with the case they show."""
    labels = [str(label) for label in label_names]
    values = _values_by_method_label_case(result["cases"])
    methods = list(result["methods"])
    per_case = {method: {case: _nanmean([values[(method, label)][case]["dice"] for label in labels])
                         for case in set.intersection(*(set(values.get((method, label), {})) for label in labels))}
                for method in methods}
    figures = {}
    for shown in cases_to_show(per_case, result["settings"]["baseline"]):
        reference, geometry = read_label_map(ground_truth[shown.case])
        arrays = {method: read_label_map(predicted[method][shown.case])[0] for method in methods
                  if shown.case in predicted[method]}
        index = most_different_slice(reference, list(arrays.values()))
        image = _case_image(images_dir, shown.case, reference.shape)
        spacing_x, spacing_y = geometry.spacing[0], geometry.spacing[1]
        figure = case_figure(shown.case, index, None if image is None else image[index], reference[index],
                             {m: a[index] for m, a in arrays.items()}, list(label_names), shown.reasons,
                             aspect=spacing_y / spacing_x)
        figures[figure_file_name(shown.case)] = (shown, figure_to_png(figure))
    return figures


def _case_image(images_dir: str | None, case: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The case's first image channel (z, y, x), or None (with a warning where it is missing or mismatched)."""
    if images_dir is None:
        return None
    path = os.path.join(images_dir, f"{case}_0000{FILE_ENDING}")
    try:
        image = sitk.GetArrayFromImage(sitk.ReadImage(path)).astype(np.float32)
    except RuntimeError as error:
        warnings.warn(f"contour figure of case {case} without its image: cannot read {path}: {_sitk_reason(error)}",
                      stacklevel=3)
        return None
    if image.shape != tuple(shape):
        warnings.warn(f"contour figure of case {case} without its image: {path} has shape {image.shape}, the "
                      f"ground truth {tuple(shape)}", stacklevel=3)
        return None
    return image


def list_cases(folder: str) -> dict[str, str]:
    """Case name -> file path of the `<case>.nii.gz` files in a folder."""
    return {name[:-len(FILE_ENDING)]: os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name.endswith(FILE_ENDING) and os.path.isfile(os.path.join(folder, name))}


def load_label_names(labels_json: str) -> dict[int, str]:
    """Foreground label id -> name from an nnU-Net dataset.json ({"labels": {"background": 0, "A": 1, ...}})."""
    try:
        with open(labels_json) as file:
            labels = json.load(file)["labels"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CompareError(f"cannot read the labels of {labels_json}: {error!r}") from None
    names: dict[int, str] = {}
    for name, value in labels.items():
        # region-based datasets give lists of labels, and an 'ignore' label masks voxels out of the reference:
        # both need metrics of their own, so they are refused rather than silently scored as plain classes
        if name == "ignore":
            raise CompareError(f"{labels_json}: the 'ignore' label is not supported")
        if isinstance(value, bool) or not isinstance(value, int):
            raise CompareError(f"{labels_json}: label {name!r} is {value!r}; only integer labels are supported "
                               f"(not region-based datasets)")
        if value != 0:
            names[value] = name
    if not names:
        raise CompareError(f"{labels_json} defines no foreground label")
    return dict(sorted(names.items()))


def read_label_map(path: str) -> tuple[np.ndarray, Geometry]:
    """A label map as an integer array (numpy axis order z, y, x) with its geometry."""
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as error:
        raise CompareError(f"cannot read {path}: {_sitk_reason(error)}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CompareError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                           f"a label map has one")
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise CompareError(f"{path} holds non-integer values; it is not a label map")
        array = array.astype(np.int64)
    geometry = Geometry(size=tuple(image.GetSize()), spacing=tuple(image.GetSpacing()),
                        origin=tuple(image.GetOrigin()), direction=tuple(image.GetDirection()))
    return array, geometry


def ground_truth_label_ids(path: str) -> set[int]:
    """The nonzero label ids in one ground-truth file."""
    array, _ = read_label_map(path)
    return {int(value) for value in np.unique(array) if value != 0}


def evaluate_case(task: CaseTask) -> list[dict]:
    """Per-class metric records of every method for one case, after checking labels and geometry."""
    reference, reference_geometry = read_label_map(task.ground_truth)
    _check_label_ids(reference, task.ground_truth, task.labels, task.labels_origin)
    # SimpleITK's spacing is x, y, z; the arrays are z, y, x
    spacing = reference_geometry.spacing[::-1]
    records = []
    for method, path in task.predictions.items():
        prediction, geometry = read_label_map(path)
        difference = geometry.difference(reference_geometry)
        if difference is not None:
            raise CompareError(f"case {task.case}, method {method}: the prediction's geometry differs from the "
                               f"ground truth's: {difference} ({path} vs {task.ground_truth})")
        _check_label_ids(prediction, path, task.labels, task.labels_origin)
        for label, metrics in case_metrics(reference, prediction, task.labels, spacing, task.tolerance_mm).items():
            records.append({"method": method, "case": task.case, "label": str(label),
                            "dice": metrics.dice, "nsd": metrics.nsd, "hd95": metrics.hd95})
    return records


def assemble_results(records: list[dict], methods: Mapping[str, str], label_names: Mapping[int, str],
                     missing: Mapping[str, list[str]], gt_dir: str, tolerance_mm: float) -> dict:
    """The metrics.json content: settings, per-method summaries, paired comparisons, missing and per-case values."""
    labels = [str(label) for label in label_names]
    values = _values_by_method_label_case(records)
    summaries = {}
    for method in methods:
        per_class = {}
        for label in labels:
            cases = values.get((method, label), {})
            per_class[label] = {metric: summarize([v[metric] for v in cases.values()]) for metric in METRICS}
            per_class[label]["n_cases"] = len(cases)
            per_class[label]["hd95_undefined"] = sum(math.isnan(v["hd95"]) for v in cases.values())
        summaries[method] = {"per_class": per_class, "foreground_mean": {
            metric: _nanmean([per_class[label][metric]["mean"] for label in labels]) for metric in METRICS}}

    baseline, *candidates = methods
    paired = {}
    for method in candidates:
        paired[method] = {}
        for label in labels:
            baseline_dice, candidate_dice = _paired_dice(values, baseline, method, label)
            paired[method][label] = _paired_record(paired_comparison(candidate_dice, baseline_dice))
        # per case, the mean Dice over the classes: the method's overall difference, with its own interval
        common = sorted(set.intersection(*(set(values.get((m, label), {})) for m in (baseline, method)
                                           for label in labels)))
        means = [[_nanmean([values[(m, label)][case]["dice"] for label in labels]) for case in common]
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


def render_figures(result: dict, label_names: Mapping[int, str]) -> dict[str, bytes]:
    """dice_per_class.png and paired_cases.png, as PNG bytes."""
    labels, class_names = [str(label) for label in label_names], list(label_names.values())
    methods, baseline = list(result["methods"]), result["settings"]["baseline"]

    def dice_summary(method: str, statistic: str) -> list[float]:
        values = (result["methods"][method]["per_class"][label]["dice"][statistic] for label in labels)
        return [math.nan if value is None else value for value in values]

    bars = dice_per_class_figure(class_names, {m: dice_summary(m, "mean") for m in methods},
                                 {m: dice_summary(m, "std") for m in methods})
    values = _values_by_method_label_case(result["cases"])
    pairs = {method: {name: _paired_dice(values, baseline, method, label) for label, name in zip(labels, class_names)}
             for method in methods[1:]}
    return {"dice_per_class.png": figure_to_png(bars),
            "paired_cases.png": figure_to_png(paired_cases_figure(baseline, pairs))}


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


def _missing_cases(ground_truth: Mapping[str, str], predicted: Mapping[str, Mapping[str, str]],
                   strict: bool) -> dict[str, list[str]]:
    missing = {method: sorted(set(ground_truth) - set(cases)) for method, cases in predicted.items()}
    incomplete = {method: cases for method, cases in missing.items() if cases}
    if incomplete:
        listing = "; ".join(f"method {method} lacks {len(cases)} case(s): {', '.join(cases)}"
                            for method, cases in incomplete.items())
        if strict:
            raise CompareError(f"missing predictions (strict): {listing}")
        warnings.warn(f"missing predictions, left out of those methods' statistics: {listing}", stacklevel=3)
    for method, cases in predicted.items():
        extra = sorted(set(cases) - set(ground_truth))
        if extra:
            warnings.warn(f"method {method}: predictions without a ground truth are ignored: {', '.join(extra)}",
                          stacklevel=3)
    return missing


def _check_label_ids(array: np.ndarray, path: str, labels: tuple[int, ...], labels_origin: str) -> None:
    unknown = sorted(set(int(v) for v in np.unique(array)) - {0, *labels})
    if unknown:
        raise CompareError(f"{path} contains label(s) {', '.join(map(str, unknown))}, not among "
                           f"{labels_origin}: {', '.join(map(str, labels))} (and background 0)")


def _run_cases(function: Callable[[_Task], _Result], tasks: list[_Task], num_processes: int,
               description: str) -> list[_Result]:
    """`function` over `tasks` with a progress bar, in worker processes when num_processes > 1; results in
    task order. The first error stops the run."""
    if num_processes == 1 or len(tasks) <= 1:
        # the context manager closes the bar before an error propagates, so the bar does not print after it
        with tqdm(total=len(tasks), desc=description, unit="case") as progress:
            results = []
            for task in tasks:
                results.append(function(task))
                progress.update()
            return results
    # spawn, as nnU-Net does: forking a caller that already runs threads (torch, a GUI) can deadlock
    with ProcessPoolExecutor(max_workers=min(num_processes, len(tasks)),
                             mp_context=multiprocessing.get_context("spawn")) as executor:
        futures = [executor.submit(function, task) for task in tasks]
        with tqdm(total=len(tasks), desc=description, unit="case") as progress:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                progress.update(len(done))
                for future in done:
                    if future.exception() is not None:
                        executor.shutdown(cancel_futures=True)
                        raise future.exception()
        return [future.result() for future in futures]


def _values_by_method_label_case(records: Iterable[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    values: dict[tuple[str, str], dict[str, dict]] = {}
    for record in records:
        values.setdefault((record["method"], record["label"]), {})[record["case"]] = record
    return values


def _paired_record(comparison) -> dict:
    return {"n_cases": comparison.n_cases, "dice_diff_mean": comparison.mean_difference,
            "ci95": list(comparison.ci95), "wilcoxon_p": comparison.wilcoxon_p,
            "wins": comparison.wins, "ties": comparison.ties, "losses": comparison.losses}


def _paired_dice(values: Mapping[tuple[str, str], Mapping[str, dict]], baseline: str, candidate: str,
                 label: str) -> tuple[list[float], list[float]]:
    """Dice of the baseline and of the candidate on the cases both predicted, in case order."""
    baseline_cases, candidate_cases = values.get((baseline, label), {}), values.get((candidate, label), {})
    common = sorted(set(baseline_cases) & set(candidate_cases))
    return [baseline_cases[c]["dice"] for c in common], [candidate_cases[c]["dice"] for c in common]


def _nanmean(values: list[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def _json_safe(value):
    """NaN and infinities become None (JSON has no NaN); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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


def _rounded(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in values)


def _sitk_reason(error: RuntimeError) -> str:
    # SimpleITK's messages span lines and start with the C++ source location; the cause follows 'ERROR: '
    message = str(error).strip()
    reason = message.split("ERROR: ", 1)[-1]
    return " ".join(reason.split())
