"""The cascade's stage-1 predictions are checked before nnU-Net's predictor starts on any case.

nnU-Net reads each case's `-prev_stage_predictions` file in a preprocessing worker: a missing or unreadable one
stops the run after the cases before it, with "Background workers died" as the last line and the file named
only in the worker's traceback; a prediction of another size or spacing than its image (another dataset, a
resampled file) is not noticed at all. So the plugin wraps the predictor's `_manage_input_and_output_lists`
(installed with the first RFMedSAM2Network, as whole_volume_prediction.py): for a refiner, every case's stage-1
prediction must exist, be readable, and have its image's size and spacing, or nothing is predicted and one line
names the folder and the cases.
"""
from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk

_STOCK = "_rfmedsam2_unchecked_manage_input_and_output_lists"
_LISTED = 5  # how many cases a message names


class CascadeInputError(ValueError):
    """Stage-1 predictions the cascade cannot use; the message is one line."""


def check_stage1_predictions(image_files: list[list[str]], stage1_files: list[str], folder: str) -> None:
    """Each case's stage-1 prediction (one per list of image files) exists, is readable and has the size and
    spacing of the case's first image; CascadeInputError naming the problems otherwise."""
    problems = []
    for images, stage1 in zip(image_files, stage1_files):
        case = os.path.basename(stage1)
        if not os.path.isfile(stage1):
            problems.append(f"{case} does not exist")
            continue
        try:
            prediction, image = _header(stage1), _header(images[0])
        except RuntimeError as error:
            problems.append(f"{case} cannot be read ({_first_line(error)})")
            continue
        if prediction.GetSize() != image.GetSize():
            problems.append(f"{case} has size {prediction.GetSize()}, its image {os.path.basename(images[0])} "
                            f"{image.GetSize()}")
        elif not np.allclose(prediction.GetSpacing(), image.GetSpacing(), rtol=1e-3, atol=1e-5):
            problems.append(f"{case} has spacing {_rounded(prediction.GetSpacing())}, its image "
                            f"{_rounded(image.GetSpacing())}")
    if problems:
        shown = "; ".join(problems[:_LISTED]) + (f"; and {len(problems) - _LISTED} more" if len(problems) > _LISTED
                                                 else "")
        raise CascadeInputError(f"-prev_stage_predictions {folder}: {len(problems)} of {len(stage1_files)} case(s) "
                                f"have no usable stage-1 prediction: {shown}. Predict the images with stage 1 first "
                                f"(nnUNetv2_predict -c 3d_fullres -tr nnUNetTrainerRFPrompt ...) into that folder; "
                                f"nothing was predicted")


def install() -> None:
    """Check the stage-1 predictions of refiners before nnU-Net's predictor starts (see the module's text)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    if hasattr(nnUNetPredictor, _STOCK):
        return
    setattr(nnUNetPredictor, _STOCK, nnUNetPredictor._manage_input_and_output_lists)
    nnUNetPredictor._manage_input_and_output_lists = _checked_manage_input_and_output_lists


def _checked_manage_input_and_output_lists(self, list_of_lists_or_source_folder, output_folder_or_list,
                                           folder_with_segs_from_prev_stage=None, *args, **kwargs):
    images, outputs, stage1_files = getattr(self, _STOCK)(list_of_lists_or_source_folder, output_folder_or_list,
                                                          folder_with_segs_from_prev_stage, *args, **kwargs)
    from nnunetv2_rfmedsam.whole_volume_prediction import find_refiner
    if folder_with_segs_from_prev_stage is not None and find_refiner(self.network) is not None:
        check_stage1_predictions(images, stage1_files, folder_with_segs_from_prev_stage)
    return images, outputs, stage1_files


def _header(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "ERROR" in line), lines[-1] if lines else type(error).__name__)


def _rounded(values) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)
