"""The files a comparison reads: the cases of each folder, the labels to evaluate, and each label map as an integer
array with its geometry. Bad input is refused with `CompareError`, whose message names the file, case or method and
what is wrong.

Every folder holds nnU-Net-named NIfTI label maps, `<case>.nii.gz`; the ground-truth folder defines the cases.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import SimpleITK as sitk

from nnunetv2_rfmedsam.nifti_integrity import DamagedNifti, is_nifti, stored_voxels

FILE_ENDING = ".nii.gz"
GEOMETRY_RTOL = 1e-4
# origins near 0 mm and direction cosines near 0 need an absolute floor under the relative tolerance
GEOMETRY_ATOL = 1e-4


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


def list_cases(folder: str) -> dict[str, str]:
    """Case name -> file path of the `<case>.nii.gz` files in a folder."""
    return {name[:-len(FILE_ENDING)]: os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name.endswith(FILE_ENDING) and os.path.isfile(os.path.join(folder, name))}


def missing_cases(ground_truth: Mapping[str, str], predicted: Mapping[str, Mapping[str, str]],
                  strict: bool) -> dict[str, list[str]]:
    """Method -> the ground-truth cases it did not predict (a warning, or refused when `strict`); prediction files
    without a ground truth are named in a warning."""
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


def check_stored(path: str, what: str) -> None:
    """Refuse a NIfTI file cut short, with a corrupt gzip stream, or holding NaN or infinite voxels: SimpleITK
    reads the first two as an image padded with zeros and NaN as 0 (nifti_integrity.py)."""
    if not is_nifti(path):
        return
    try:
        voxels = stored_voxels(path)
    except DamagedNifti as error:
        raise CompareError(f"{what} {path} {error}") from None
    if voxels.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(voxels)))
        if bad:
            raise CompareError(f"{what} {path}: {bad} of {voxels.size} voxels are not finite (NaN or infinite)")


def check_case_images(images_dir: str, cases: list[str]) -> None:
    """The images under the contour figures (`<case>_0000.nii.gz`), checked as stored before any case is compared;
    a missing one only leaves its figure without the image."""
    for case in cases:
        path = os.path.join(images_dir, f"{case}_0000{FILE_ENDING}")
        if os.path.isfile(path):
            check_stored(path, "image")


def read_label_map(path: str) -> tuple[np.ndarray, Geometry]:
    """A label map as an integer array (numpy axis order z, y, x) with its geometry."""
    check_stored(path, "label map")
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as error:
        raise CompareError(f"cannot read {path}: {sitk_error_reason(error)}") from None
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


def check_label_ids(array: np.ndarray, path: str, labels: tuple[int, ...], labels_origin: str) -> None:
    """Refuse a label map holding an id outside `labels` and background; `labels_origin` says where they came from."""
    unknown = sorted(set(int(v) for v in np.unique(array)) - {0, *labels})
    if unknown:
        raise CompareError(f"{path} contains label(s) {', '.join(map(str, unknown))}, not among "
                           f"{labels_origin}: {', '.join(map(str, labels))} (and background 0)")


def sitk_error_reason(error: RuntimeError) -> str:
    """The cause in a SimpleITK error, on one line."""
    # SimpleITK's messages span lines and start with the C++ source location; the cause follows 'ERROR: '
    message = str(error).strip()
    reason = message.split("ERROR: ", 1)[-1]
    return " ".join(reason.split())


def _rounded(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in values)
