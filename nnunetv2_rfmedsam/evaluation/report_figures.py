"""The figures of a comparison, rendered from its results (results.py) as PNG bytes: dice_per_class.png and
paired_cases.png (plots.py), and contours_<case>.png of the cases to look at (case_figures.py), on the cases' images
when given (nnU-Net's `<case>_0000.nii.gz`).
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Mapping

import numpy as np
import SimpleITK as sitk

from nnunetv2_rfmedsam.evaluation.case_figures import (CaseToShow, case_figure, cases_to_show, figure_file_name,
                                                      most_different_slice)
from nnunetv2_rfmedsam.evaluation.case_files import FILE_ENDING, read_label_map, sitk_error_reason
from nnunetv2_rfmedsam.evaluation.plots import dice_per_class_figure, figure_to_png, paired_cases_figure
from nnunetv2_rfmedsam.evaluation.results import nanmean, paired_dice, values_by_method_label_case


def render_figures(result: dict, label_names: Mapping[int, str]) -> dict[str, bytes]:
    """dice_per_class.png and paired_cases.png, as PNG bytes."""
    labels, class_names = [str(label) for label in label_names], list(label_names.values())
    methods, baseline = list(result["methods"]), result["settings"]["baseline"]

    def dice_summary(method: str, statistic: str) -> list[float]:
        values = (result["methods"][method]["per_class"][label]["dice"][statistic] for label in labels)
        return [math.nan if value is None else value for value in values]

    bars = dice_per_class_figure(class_names, {m: dice_summary(m, "mean") for m in methods},
                                 {m: dice_summary(m, "std") for m in methods})
    values = values_by_method_label_case(result["cases"])
    pairs = {method: {name: paired_dice(values, baseline, method, label) for label, name in zip(labels, class_names)}
             for method in methods[1:]}
    return {"dice_per_class.png": figure_to_png(bars),
            "paired_cases.png": figure_to_png(paired_cases_figure(baseline, pairs))}


def render_case_figures(result: dict, ground_truth: Mapping[str, str], predicted: Mapping[str, Mapping[str, str]],
                        label_names: Mapping[int, str], images_dir: str | None) -> dict[str, tuple[CaseToShow, bytes]]:
    """contours_<case>.png of the cases to look at (case_figures.py), as PNG bytes with the case they show."""
    labels = [str(label) for label in label_names]
    values = values_by_method_label_case(result["cases"])
    methods = list(result["methods"])
    per_case = {method: {case: nanmean([values[(method, label)][case]["dice"] for label in labels])
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
        warnings.warn(f"contour figure of case {case} without its image: cannot read {path}: "
                      f"{sitk_error_reason(error)}", stacklevel=3)
        return None
    if image.shape != tuple(shape):
        warnings.warn(f"contour figure of case {case} without its image: {path} has shape {image.shape}, the "
                      f"ground truth {tuple(shape)}", stacklevel=3)
        return None
    return image
