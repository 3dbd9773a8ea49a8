"""Per-case, per-class segmentation metrics in physical units (millimetres).

For one foreground class with reference mask R and predicted mask P:

* **Dice** = 2 |R ∩ P| / (|R| + |P|), from voxel counts.
* **Normalised surface Dice** (NSD, Nikolov et al. 2021) at a tolerance of τ mm: the fraction of the surface
  voxels of both masks that lie within τ of the other mask's surface,
  (|{s ∈ ∂R : d(s, ∂P) ≤ τ}| + |{s ∈ ∂P : d(s, ∂R) ≤ τ}|) / (|∂R| + |∂P|).
  Surface voxels are counted (as MONAI's `compute_surface_dice` does without sub-voxels), not surfel areas
  as in DeepMind's `surface-distance` package.
* **HD95**: the 95th percentile (numpy's linear interpolation) of the union of both directed surface-distance
  sets, {d(s, ∂P) : s ∈ ∂R} ∪ {d(s, ∂R) : s ∈ ∂P}. This is medpy's `hd95`; MONAI's
  `compute_hausdorff_distance(percentile=95)` takes instead the larger of the two directed 95th percentiles,
  which differs when one direction has the far outliers.

A surface voxel is a mask voxel with at least one face neighbour (6-connectivity in 3D) outside the mask
(`scipy.ndimage.binary_erosion`); outside the image counts as background, so a mask touching the image
border has a surface there. d(s, ∂X) is the Euclidean distance between voxel centres, from
`scipy.ndimage.distance_transform_edt` with `sampling` = the voxel spacing in numpy array axis order
(SimpleITK's `GetSpacing()` is x, y, z while `GetArrayFromImage` is z, y, x: reverse it).

**Empty masks** (the class is absent from the reference, the prediction or both):

* both empty: Dice 1, NSD 1, HD95 NaN (undefined: there is no surface to measure);
* exactly one empty: Dice 0, NSD 0, HD95 NaN (undefined: a distance to nothing).

`nnUNetv2_evaluate_folder` gives Dice NaN when both are empty (and leaves the case out of its mean); here a
correctly predicted absence scores 1. Every Dice that nnU-Net defines is identical to the one computed here,
so means differ from nnU-Net's only for classes that some reference and prediction both omit.

**Default tolerance: 1.0 mm** (`DEFAULT_TOLERANCE_MM`). At the ~1 mm resolution of brain MRI (such as the
hippocampus data) this forgives a boundary that is off by one voxel — the order of disagreement between
human raters on such structures — and nothing more. It is a length, not a voxel count, so results at
different resolutions stay comparable; for coarse data (e.g. 5 mm CT slices) pass a larger tolerance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

DEFAULT_TOLERANCE_MM = 1.0
HD_PERCENTILE = 95


@dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one class in one case; hd95 is NaN when undefined (a mask is empty)."""
    dice: float
    nsd: float
    hd95: float


def dice_score(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Dice of two boolean masks: 1 when both are empty, 0 when only one is."""
    total = int(np.count_nonzero(reference)) + int(np.count_nonzero(prediction))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(reference & prediction)) / total


def class_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float],
                  tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> ClassMetrics:
    """Dice, NSD and HD95 of two boolean masks of the same shape; spacing in array axis order (mm)."""
    if reference.shape != prediction.shape:
        raise ValueError(f"mask shapes differ: {reference.shape} vs {prediction.shape}")
    if len(spacing) != reference.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {reference.ndim}D mask")
    reference, prediction = reference.astype(bool, copy=False), prediction.astype(bool, copy=False)
    reference_count, prediction_count = int(reference.sum()), int(prediction.sum())
    if reference_count == 0 and prediction_count == 0:
        return ClassMetrics(dice=1.0, nsd=1.0, hd95=math.nan)
    if reference_count == 0 or prediction_count == 0:
        return ClassMetrics(dice=0.0, nsd=0.0, hd95=math.nan)
    dice = dice_score(reference, prediction)
    # distances to the nearest surface voxel do not change outside the objects' bounding box, and on large
    # CT volumes the distance transform of the whole image would dominate the run time
    crop = _bounding_box(reference | prediction)
    distances = np.concatenate(_directed_surface_distances(reference[crop], prediction[crop], spacing))
    nsd = float(np.count_nonzero(distances <= tolerance_mm)) / distances.size
    return ClassMetrics(dice=dice, nsd=nsd, hd95=float(np.percentile(distances, HD_PERCENTILE)))


def case_metrics(reference: np.ndarray, prediction: np.ndarray, labels: Sequence[int], spacing: Sequence[float],
                 tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> dict[int, ClassMetrics]:
    """`class_metrics` of every label in `labels` for two label maps of the same shape."""
    return {label: class_metrics(reference == label, prediction == label, spacing, tolerance_mm)
            for label in labels}


def surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask (the image border counts as outside)."""
    structure = generate_binary_structure(mask.ndim, 1)
    return mask & ~binary_erosion(mask, structure=structure, border_value=0)


def _directed_surface_distances(reference: np.ndarray, prediction: np.ndarray,
                                spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of one mask to the other mask's surface, both directions."""
    reference_surface, prediction_surface = surface(reference), surface(prediction)
    to_prediction_surface = distance_transform_edt(~prediction_surface, sampling=spacing)
    to_reference_surface = distance_transform_edt(~reference_surface, sampling=spacing)
    return to_prediction_surface[reference_surface], to_reference_surface[prediction_surface]


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The box around the mask's voxels, one voxel larger on each side so that erosion sees background."""
    box = []
    for axis in range(mask.ndim):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(occupied[0] - 1, 0), min(occupied[-1] + 2, mask.shape[axis])))
    return tuple(box)
