"""The comparison figures: mean Dice per class and method, and per-case Dice of each candidate against the baseline.

Figures are built with `matplotlib.figure.Figure` and rendered with the Agg canvas, never through pyplot, so
that no global backend is switched and nothing needs a display.
"""
from __future__ import annotations

import io
import textwrap
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120
# characters per line of a panel's title and axis labels (a 4.2-inch panel)
LABEL_WIDTH = 38
# slightly beyond [0, 1] so that markers and error bars at the limits stay visible
DICE_AXIS_LIMITS = (-0.02, 1.05)


def dice_per_class_figure(class_names: Sequence[str], mean_dice: Mapping[str, Sequence[float]],
                          std_dice: Mapping[str, Sequence[float]]) -> Figure:
    """Grouped bars: one group per class, one bar per method (in the mappings' order), std as error bars."""
    figure = Figure(figsize=(max(5.0, 2.0 + 0.5 * len(class_names) * len(mean_dice)), 4.5), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(len(class_names))
    width = 0.8 / max(1, len(mean_dice))
    for index, method in enumerate(mean_dice):
        offset = (index - (len(mean_dice) - 1) / 2) * width
        axes.bar(positions + offset, mean_dice[method], width, yerr=std_dice[method], capsize=3, label=method)
    axes.set_xticks(positions, list(class_names))
    # the headroom above 1 keeps the legend clear of the bars
    axes.set_ylim(0.0, 1.2)
    axes.set_yticks(np.linspace(0.0, 1.0, 6))
    axes.set_ylabel("Dice (mean ± std over cases)")
    axes.set_title("Dice per class")
    axes.legend(loc="upper center", ncol=min(len(mean_dice), 4), fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def paired_cases_figure(baseline: str,
                        pairs: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]) -> Figure:
    """One panel per candidate: per-case Dice of the baseline (x) against the candidate (y), one marker per
    case and class, coloured by class, with the diagonal y = x (above it the candidate is better).

    `pairs[candidate][class_name]` holds (baseline values, candidate values) for the cases both predicted.
    """
    panels = max(1, len(pairs))
    figure = Figure(figsize=(4.2 * panels, 4.4), dpi=DPI)
    FigureCanvasAgg(figure)
    if not pairs:
        axes = figure.add_subplot()
        axes.text(0.5, 0.5, f"only one method ({baseline}):\nno candidate to compare", ha="center", va="center")
        axes.set_axis_off()
        return figure
    for index, (candidate, per_class) in enumerate(pairs.items()):
        axes = figure.add_subplot(1, panels, index + 1)
        axes.plot(DICE_AXIS_LIMITS, DICE_AXIS_LIMITS, color="grey", linewidth=1, linestyle="--", label="y = x")
        for class_name, (baseline_dice, candidate_dice) in per_class.items():
            axes.scatter(baseline_dice, candidate_dice, s=18, alpha=0.75, label=class_name)
        axes.set_xlim(*DICE_AXIS_LIMITS)
        axes.set_ylim(*DICE_AXIS_LIMITS)
        axes.set_aspect("equal")
        # long method names wrap rather than run out of the image
        axes.set_xlabel(textwrap.fill(f"Dice, {baseline} (baseline)", LABEL_WIDTH))
        axes.set_ylabel(textwrap.fill(f"Dice, {candidate}", LABEL_WIDTH))
        axes.set_title(textwrap.fill(f"{candidate} vs {baseline}", LABEL_WIDTH), fontsize="medium")
        axes.legend(loc="lower right", fontsize="small")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def figure_to_png(figure: Figure) -> bytes:
    """The figure as PNG bytes (rendered in memory, so that a failure leaves no file behind)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()

