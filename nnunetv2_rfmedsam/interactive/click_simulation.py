"""Simulated corrective clicks: Dice against the number of clicks (SAM-Med2D / SAM-Med3D style evaluation).

Per case and foreground class, from a clean session state (the image is encoded once per case):
- click 0, the start: one box, the ground truth's bounding box on the slice where the class is largest, then
  propagate (`box`); or the stage-1 prediction itself (`stage1`), the automatic result a person would start
  correcting, so that click 0 scores what stage 1 scores. Where stage 1 found nothing of the class, the start is
  empty;
- clicks 1..N: the largest 3-D connected error region of the class (false negatives and false positives are
  separate regions, 6-connected) gets one click at its interior point, the maximum of its Euclidean distance
  transform (in mm), positive in a false negative and negative in a false positive, on the slice containing
  that point. From a box, the session propagates it; from stage 1, it is a correction as the viewer makes one
  (corrections.py): the clicked slice takes the session's result, seeded with the stage-1 mask, and the
  other slices keep theirs. The class may take other classes' voxels (each class is scored alone).
The Dice of the class is recorded after the start and after every click; once a class has no error left, its
Dice stays. Classes absent from a case's ground truth are skipped for that case.

Outputs: OUT/clicks.json {"mean_dice_by_clicks": {"0": ..}, "mean_dice_by_class": {class: {"0": ..}},
"cases": {case: {class: [dice_0, dice_1, ...]}}} and OUT/dice_vs_clicks.png.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage
from tqdm import tqdm

from nnunetv2_rfmedsam.atomic_files import write_atomically
from nnunetv2_rfmedsam.evaluation.compare import CompareError, read_label_map
from nnunetv2_rfmedsam.evaluation.metrics import dice_score
from nnunetv2_rfmedsam.evaluation.plots import DICE_AXIS_LIMITS, DPI, figure_to_png
from nnunetv2_rfmedsam.interactive.corrections import Click, Corrections
from nnunetv2_rfmedsam.interactive.session import InteractiveSession

START_MODES = ("box", "stage1")


class ClickEvaluationError(ValueError):
    """Bad input to the click evaluation; the message names the file or option."""


def start_box(target: np.ndarray) -> tuple[int, tuple[int, int, int, int]]:
    """(slice, (y0, x0, y1, x1)): the bounding box of `target` (D, H, W) on the slice where it is largest, widened
    to at least two voxels per side within the image (a box needs a nonzero area)."""
    slice_index = int(np.argmax(target.sum(axis=(1, 2))))
    ys, xs = np.nonzero(target[slice_index])
    height, width = target.shape[1:]
    (y0, y1), (x0, x1) = (_widen(ys.min(), ys.max(), height), _widen(xs.min(), xs.max(), width))
    return slice_index, (y0, x0, y1, x1)


def _widen(low: int, high: int, size: int) -> tuple[int, int]:
    if high > low:
        return int(low), int(high)
    return (int(low), int(low) + 1) if low + 1 < size else (int(low) - 1, int(low))


def next_click(prediction: np.ndarray, target: np.ndarray, spacing) -> tuple[int, int, int, int] | None:
    """(slice, y, x, label) at the interior point of the largest connected error region, label 1 for a false
    negative and 0 for a false positive; None without errors."""
    best = None
    for errors, label in ((target & ~prediction, 1), (prediction & ~target, 0)):
        regions, count = ndimage.label(errors)
        if count == 0:
            continue
        sizes = np.bincount(regions.ravel())[1:]
        largest = int(np.argmax(sizes)) + 1
        if best is None or sizes[largest - 1] > best[0]:
            best = (sizes[largest - 1], regions == largest, label)
    if best is None:
        return None
    _, region, label = best
    # pad so that the image border counts as the region's boundary
    distance = ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    z, y, x = np.unravel_index(int(np.argmax(distance)), region.shape)
    return int(z), int(y), int(x), label


def simulate_class(session: InteractiveSession, class_id: int, target: np.ndarray, start: str,
                   stage1: np.ndarray | None, clicks: int, spacing) -> list[float]:
    """Dice of `class_id` after the start and after each of `clicks` corrective clicks (see the module docstring);
    the session has its image set; its prompts are reset first."""
    session.reset()
    corrections = None
    if start == "box":
        slice_index, box = start_box(target)
        session.add_box(class_id, slice_index, box)
        prediction = session.label_map() == class_id
    else:
        corrections = Corrections(session, stage1)
        prediction = stage1 == class_id
    scores = [dice_score(target, prediction)]
    for _ in range(clicks):
        click = next_click(prediction, target, spacing)
        if click is not None:
            z, y, x, label = click
            if corrections is None:
                session.add_points(class_id, z, [(y, x, label)])
                prediction = session.label_map() == class_id
            else:
                prediction = corrections.refine(class_id, clicks=[Click(z, y, x, bool(label))], overwrite=True) \
                    == class_id
        scores.append(dice_score(target, prediction))
    return scores


def list_cases(images_dir: Path, labels_dir: Path, file_ending: str, num_channels: int) -> dict[str, list[Path]]:
    """{case: [channel files]} for every `<case>_XXXX<ending>` group in images_dir; each needs its label file."""
    if not images_dir.is_dir():
        raise ClickEvaluationError(f"-i {images_dir}: no such folder")
    if not labels_dir.is_dir():
        raise ClickEvaluationError(f"--gt {labels_dir}: no such folder")
    cases = sorted({p.name[:-len(file_ending) - 5] for p in images_dir.glob(f"*_0000{file_ending}")})
    if not cases:
        raise ClickEvaluationError(f"-i {images_dir}: no images named <case>_0000{file_ending}")
    files = {}
    for case in cases:
        channels = [images_dir / f"{case}_{c:04d}{file_ending}" for c in range(num_channels)]
        missing = [str(p) for p in channels if not p.is_file()] + \
            ([] if (labels_dir / f"{case}{file_ending}").is_file() else [str(labels_dir / f"{case}{file_ending}")])
        if missing:
            raise ClickEvaluationError(f"case {case}: missing {', '.join(missing)}")
        files[case] = channels
    return files


def read_case_labels(path: Path, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A case's label map (ground truth or stage-1 prediction), on the image's grid."""
    if not path.is_file():
        raise ClickEvaluationError(f"{what} {path}: no such file")
    try:
        labels, _ = read_label_map(str(path))
    except CompareError as error:
        raise ClickEvaluationError(f"{what}: {error}") from None
    if labels.shape != tuple(shape):
        raise ClickEvaluationError(f"{what} {path}: shape {labels.shape} differs from the image's {tuple(shape)}")
    return labels


def evaluate_clicks(session: InteractiveSession, images_dir, labels_dir, start: str, clicks: int, output_dir,
                    prev_stage_predictions=None, progress: bool = True) -> dict:
    """Run the simulation on every case; write clicks.json and dice_vs_clicks.png to output_dir; return the
    summary written to clicks.json."""
    if start not in START_MODES:
        raise ClickEvaluationError(f"--start {start!r}: use one of {', '.join(START_MODES)}")
    if start == "stage1" and prev_stage_predictions is None:
        raise ClickEvaluationError("--start stage1 needs --prev_stage_predictions (a folder of stage-1 predictions "
                                   "<case>.nii.gz, e.g. from nnUNetv2_predict with the 3d_fullres model)")
    if start == "stage1" and not Path(prev_stage_predictions).is_dir():
        raise ClickEvaluationError(f"--prev_stage_predictions {prev_stage_predictions}: no such folder")
    if not isinstance(clicks, int) or clicks < 0:
        raise ClickEvaluationError(f"--clicks {clicks!r}: use a number of clicks >= 0")
    ending = session.dataset_json["file_ending"]
    cases = list_cases(Path(images_dir), Path(labels_dir), ending, len(session.dataset_json["channel_names"]))
    results: dict[str, dict[str, list[float]]] = {}
    for case, channels in tqdm(cases.items(), desc="click simulation", unit="case", disable=not progress):
        session.set_image(channels)
        shape = session.image.original_shape
        truth = read_case_labels(Path(labels_dir) / f"{case}{ending}", shape, "label")
        stage1 = None if start == "box" else \
            read_case_labels(Path(prev_stage_predictions) / f"{case}{ending}", shape, "stage-1 prediction")
        spacing = session.image.properties["spacing"]
        results[case] = {str(c): simulate_class(session, c, truth == c, start, stage1, clicks, spacing)
                         for c in sorted(session.class_names) if (truth == c).any()}
    summary = summarise(results, clicks)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(str(output_dir / "clicks.json"), json.dumps(summary, indent=1).encode())
    names = {str(c): name for c, name in session.class_names.items()}
    write_atomically(str(output_dir / "dice_vs_clicks.png"), figure_to_png(dice_vs_clicks_figure(summary, names)))
    return summary


def summarise(results: dict[str, dict[str, list[float]]], clicks: int) -> dict:
    curves = [curve for per_class in results.values() for curve in per_class.values()]
    classes = sorted({c for per_class in results.values() for c in per_class}, key=int)

    def mean_by_clicks(selected):
        return {str(n): float(np.mean([curve[n] for curve in selected])) if selected else None
                for n in range(clicks + 1)}

    return {"mean_dice_by_clicks": mean_by_clicks(curves),
            "mean_dice_by_class": {c: mean_by_clicks([r[c] for r in results.values() if c in r]) for c in classes},
            "cases": results}


def dice_vs_clicks_figure(summary: dict, class_names: dict[str, str]) -> Figure:
    """Mean Dice against the number of clicks: one line per class and one for all classes."""
    figure = Figure(figsize=(6, 4), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for class_id, means in summary["mean_dice_by_class"].items():
        axes.plot([int(n) for n in means], list(means.values()), marker="o",
                  label=f"{class_id} {class_names.get(class_id, '')}".strip())
    overall = summary["mean_dice_by_clicks"]
    axes.plot([int(n) for n in overall], list(overall.values()), marker="s", color="black", linewidth=2,
              label="all classes")
    axes.set_xlabel("corrective clicks")
    axes.set_ylabel("mean Dice")
    axes.set_ylim(*DICE_AXIS_LIMITS)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure
