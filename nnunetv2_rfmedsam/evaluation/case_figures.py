"""Pictures of the cases to look at: for each candidate, its largest loss and largest gain against the baseline and
its median case (by the case's mean Dice over classes), one figure per case on the slice where the methods differ
most, with the image (when given), the ground truth and every method's contours in distinct colours.

The slice axis is the arrays' first (SimpleITK's z); in-plane the aspect follows the image's spacing.
"""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from nnunetv2_rfmedsam.evaluation.plots import DPI

GROUND_TRUTH_COLOUR = "#ffffff"
# distinct on a grey image, colour-blind friendly first (Okabe-Ito), the baseline first
METHOD_COLOURS = ("#e69f00", "#56b4e9", "#009e73", "#f0e442", "#cc79a7", "#d55e00", "#0072b2")
TITLE_WIDTH = 60


@dataclass(frozen=True)
class CaseToShow:
    case: str
    reasons: tuple[str, ...]  # e.g. "largest gain of X (+0.123)"


def cases_to_show(per_case_mean_dice: Mapping[str, Mapping[str, float]], baseline: str) -> list[CaseToShow]:
    """For each candidate: the case of its largest loss, of its largest gain and its median case against the
    baseline (by the per-case mean Dice). `per_case_mean_dice[method][case]`; cases both predicted only. A case
    chosen for several reasons is shown once."""
    chosen: dict[str, list[str]] = {}
    for method, values in per_case_mean_dice.items():
        if method == baseline:
            continue
        common = sorted(set(values) & set(per_case_mean_dice[baseline]))
        if not common:
            continue
        differences = {case: values[case] - per_case_mean_dice[baseline][case] for case in common}
        ranked = sorted(common, key=lambda case: (differences[case], case))
        picks = {"largest loss": ranked[0], "median case": ranked[(len(ranked) - 1) // 2],
                 "largest gain": ranked[-1]}
        for reason, case in picks.items():
            chosen.setdefault(case, []).append(f"{reason} of {method} ({differences[case]:+.3f})")
    return [CaseToShow(case, tuple(reasons)) for case, reasons in chosen.items()]


def most_different_slice(reference: np.ndarray, predictions: Sequence[np.ndarray]) -> int:
    """The slice (first axis) where the predictions disagree with each other on most voxels; where they all
    agree, the one where they disagree most with the reference; else the one with most reference foreground."""
    def per_slice(mask: np.ndarray) -> np.ndarray:
        return mask.reshape(mask.shape[0], -1).sum(axis=1)

    if len(predictions) > 1:
        between = sum(per_slice(p != predictions[0]) for p in predictions[1:])
        if between.any():
            return int(np.argmax(between))
    errors = sum(per_slice(p != reference) for p in predictions)
    if np.any(errors):
        return int(np.argmax(errors))
    return int(np.argmax(per_slice(reference > 0)))


def case_figure(case: str, slice_index: int, image: np.ndarray | None, reference: np.ndarray,
                predictions: Mapping[str, np.ndarray], labels: Sequence[int], reasons: Sequence[str],
                aspect: float = 1.0) -> Figure:
    """One slice (2D arrays): the image in grey, the ground truth's and every method's class boundaries."""
    height, width = reference.shape
    scale = 5.0 / max(height, width * aspect)
    # the legend below the image, inside the figure (constrained layout makes room for it)
    figure = Figure(figsize=(max(5.0, width * scale * aspect + 0.6), height * scale + 1.6 + 0.25 * len(predictions)),
                    dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    background = image if image is not None else np.zeros_like(reference, dtype=float)
    low, high = np.percentile(background, [0.5, 99.5]) if image is not None else (0.0, 1.0)
    axes.imshow(background, cmap="gray", vmin=low, vmax=high if high > low else low + 1, aspect=aspect,
                interpolation="nearest")
    # earlier methods wider, so that identical boundaries show as nested lines; the ground truth dashed on top
    count = len(predictions)
    layers = [(method, prediction, METHOD_COLOURS[index % len(METHOD_COLOURS)], "solid", 1.2 + 1.1 * (count - 1 - index))
              for index, (method, prediction) in enumerate(predictions.items())]
    layers.append(("ground truth", reference, GROUND_TRUTH_COLOUR, "dashed", 1.4))
    handles = []
    for name, label_map, colour, style, linewidth in layers:
        for label in labels:
            mask = (label_map == label).astype(float)
            if mask.any() and not mask.all():
                axes.contour(mask, levels=[0.5], colors=[colour], linewidths=linewidth, linestyles=style)
        handles.append(Line2D([], [], color=colour if colour != GROUND_TRUTH_COLOUR else "black", linewidth=linewidth,
                              linestyle=style, label=textwrap.shorten(name, TITLE_WIDTH)))
    axes.set_xticks([])
    axes.set_yticks([])
    title = f"{case}, slice {slice_index}" + ("" if image is not None else " (no image given)")
    axes.set_title("\n".join([title] + [textwrap.fill(r, TITLE_WIDTH) for r in reasons]), fontsize="small")
    figure.legend(handles=handles, loc="outside lower center", ncol=1, fontsize="small", frameon=False)
    return figure


def figure_file_name(case: str) -> str:
    """contours_<case>.png, with anything but letters, digits, '-', '_' and '.' replaced."""
    return f"contours_{re.sub(r'[^A-Za-z0-9._-]', '_', case)}.png"
