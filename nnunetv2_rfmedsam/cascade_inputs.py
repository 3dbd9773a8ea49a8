"""The cascade's stage-1 predictions and images are checked before nnU-Net's predictor starts on any case.

nnU-Net reads each case's `-prev_stage_predictions` file in a preprocessing worker: a missing or unreadable one
stops the run after the cases before it, with "Background workers died" as the last line and the file named
only in the worker's traceback; a prediction of another size or spacing than its image (another dataset, a
resampled file) is not noticed at all. So the plugin wraps the predictor's `_manage_input_and_output_lists`
(installed with the first RFMedSAM2Network, as whole_volume_prediction.py): for a refiner, every case's stage-1
prediction must exist, be readable, and have its image's size and spacing, or nothing is predicted and one line
names the folder and the cases. Its images must hold finite voxels only: nnU-Net's z-score normalisation spreads a
single NaN or infinite voxel over the whole image, and SAM 2 would refine nothing but NaN. They are read with the
plans' reader, as the predictor reads them (SimpleITK's NIfTI reader, ITK 5, turns NaN and infinity into 0 as it
reads; nibabel and other formats keep them). Reading an image costs little beside predicting it (a hippocampus
case: 9 ms, 3 ms of them for its header); files of integer voxels, which cannot hold NaN or infinity (most CT), are
not read.
"""
from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk

_STOCK = "_rfmedsam2_unchecked_manage_input_and_output_lists"
_LISTED = 5  # how many cases a message names
# pixel types that can hold NaN or infinity
_FLOAT_PIXELS = {sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64}


class CascadeInputError(ValueError):
    """Stage-1 predictions or images the cascade cannot use; the message is one line."""


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
        raise CascadeInputError(f"-prev_stage_predictions {folder}: {len(problems)} of {len(stage1_files)} case(s) "
                                f"have no usable stage-1 prediction: {_listed(problems)}. Predict the images with "
                                f"stage 1 first (nnUNetv2_predict -c 3d_fullres -tr nnUNetTrainerRFPrompt ...) into "
                                f"that folder; nothing was predicted")


def check_images_finite(image_files: list[list[str]], reader) -> None:
    """Every case's images (one list of channel files per case), read by `reader` (the plans' nnU-Net reader, as the
    predictor reads them), hold finite voxels only; CascadeInputError naming the files with NaN or infinite voxels
    otherwise. Files whose header says integer voxels are not read."""
    problems = []
    for files in image_files:
        if all(_integer_voxels(path) for path in files):
            continue
        try:
            channels, _ = reader.read_images(files)
        except Exception as error:  # readers raise what their library raises; all mean the files cannot be read
            problems.append(f"{', '.join(files)} cannot be read ({_first_line(error)})")
            continue
        for path, channel in zip(files, channels):
            bad = channel.size - int(np.count_nonzero(np.isfinite(channel)))
            if bad:
                problems.append(f"{path} has {bad} of {channel.size} voxels not finite (NaN or infinite)")
    if problems:
        raise CascadeInputError(f"{len(problems)} image(s) the cascade cannot use: {_listed(problems)}. nnU-Net's "
                                f"normalisation would carry them into every voxel; nothing was predicted")


def install() -> None:
    """Check the stage-1 predictions and images of refiners before nnU-Net's predictor starts (see the module's
    text)."""
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
        check_images_finite(images, self.plans_manager.image_reader_writer_class())
    return images, outputs, stage1_files


def _header(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def _integer_voxels(path: str) -> bool:
    """Whether the file's header says its voxels are integers (which cannot be NaN or infinite)."""
    try:
        return _header(path).GetPixelID() not in _FLOAT_PIXELS
    except RuntimeError:  # not a format SimpleITK reads: the reader will tell
        return False


def _listed(problems: list[str]) -> str:
    more = len(problems) - _LISTED
    return "; ".join(problems[:_LISTED]) + (f"; and {more} more" if more > 0 else "")


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "ERROR" in line), lines[-1] if lines else type(error).__name__)


def _rounded(values) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)
