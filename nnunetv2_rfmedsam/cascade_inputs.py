"""Images and the cascade's stage-1 predictions are checked before nnU-Net's predictor starts on any case.

nnU-Net's readers accept some bad inputs without a word, and its predictor fails late on others. The plugin wraps
the predictor's `_manage_input_and_output_lists` (installed with the first RFMedSAM2Network, as
whole_volume_prediction.py, and by stage 1's `build_network_architecture`); for a refiner and for stage 1
(nnUNetTrainerRFPrompt), a problem stops the run before any case is predicted, with one line naming the files:

- each case has one image file per channel of dataset.json (nnU-Net hands the network whatever files it finds);
- each image is whole: SimpleITK, nnU-Net's default reader, reads a NIfTI file cut short as an image, the voxels
  past the cut 0 (nifti_integrity.py);
- each image holds finite voxels only: nnU-Net's z-score normalisation spreads a single NaN or infinite voxel over
  the whole image, and SAM 2 would refine nothing but NaN. SimpleITK's NIfTI reader (ITK 5) turns NaN and infinity
  into 0 as it reads, so an image of NaN only would be predicted as an image of zeros: NIfTI files are checked as
  stored, whatever the plans' reader; other formats as the plans' reader reads them (files of integer voxels,
  which cannot hold NaN or infinity, are not read). A hippocampus case costs about 1 ms beside its prediction;
- for a refiner, each case's stage-1 prediction exists, is whole and readable, lies on its image's grid (size,
  spacing, origin, direction) and holds only dataset.json's labels. nnU-Net reads it in a preprocessing worker: a
  missing or unreadable one stops the run after the cases before it, with "Background workers died" as the last
  line; one of another grid (another dataset, a resampled or shifted file) is used as if it were on the image's;
  a label dataset.json does not define becomes background.
"""
from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk

from nnunetv2_rfmedsam.nifti_integrity import DamagedNifti, is_nifti, stored_voxels

_STOCK = "_rfmedsam2_unchecked_manage_input_and_output_lists"
_LISTED = 5  # how many cases a message names
# tolerances of a stage-1 prediction's grid against its image's: origin per axis (mm), direction cosines
_ORIGIN_MM = 1e-3
_DIRECTION = 1e-5
# pixel types that can hold NaN or infinity
_FLOAT_PIXELS = {sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64}


class CascadeInputError(ValueError):
    """Images or stage-1 predictions the plugin's networks cannot use; the message is one line."""


def check_channel_counts(image_files: list[list[str]], channel_names: dict) -> None:
    """Each case has one image file per channel of dataset.json's `channel_names`; CascadeInputError naming the
    cases that do not otherwise (nnU-Net would hand the network the wrong number of channels)."""
    problems = [f"{', '.join(os.path.basename(path) for path in files)} ({len(files)} file(s))"
                for files in image_files if len(files) != len(channel_names)]
    if problems:
        raise CascadeInputError(f"{len(problems)} of {len(image_files)} case(s) do not have one image file per "
                                f"channel of dataset.json ({len(channel_names)}: "
                                f"{', '.join(map(str, channel_names.values()))}): {_listed(problems)}; nothing was "
                                f"predicted")


def check_images(image_files: list[list[str]], reader) -> None:
    """Every case's images (one list of channel files per case) are whole and hold finite voxels only;
    CascadeInputError naming the damaged files and those with NaN or infinite voxels otherwise.

    NIfTI files are decompressed in full and their stored voxels checked (nifti_integrity.py), whatever the plans'
    reader: SimpleITK's reads a file cut short, and NaN or infinity as 0, without a word. Other files are read by
    `reader` (the plans' nnU-Net reader, as the predictor reads them), which raises on a file cut short; those
    whose header says integer voxels are not read."""
    problems = []
    for files in image_files:
        nifti = [path for path in files if is_nifti(path)]
        for path in nifti:
            try:
                voxels = stored_voxels(path)
            except DamagedNifti as error:
                problems.append(f"{path} {error}")
                continue
            problems += _non_finite(path, voxels)
        others = [path for path in files if path not in nifti]
        if not others or all(_integer_voxels(path) for path in others):
            continue
        try:
            channels, _ = reader.read_images(others)
        except Exception as error:  # readers raise what their library raises; all mean the files cannot be read
            problems.append(f"{', '.join(others)} cannot be read ({_first_line(error)})")
            continue
        for path, channel in zip(others, channels):
            problems += _non_finite(path, channel)
    if problems:
        raise CascadeInputError(f"{len(problems)} image(s) cannot be predicted from: {_listed(problems)}; nothing "
                                f"was predicted")


def check_stage1_predictions(image_files: list[list[str]], stage1_files: list[str], folder: str,
                             labels: list[int]) -> None:
    """Each case's stage-1 prediction (one per list of image files) exists, is whole and readable, lies on the
    grid of the case's first image (size, spacing, origin, direction) and holds only the dataset's `labels`;
    CascadeInputError naming the problems otherwise (one per case)."""
    problems = []
    for images, stage1 in zip(image_files, stage1_files):
        problem = _stage1_problem(stage1, images[0], labels)
        if problem:
            problems.append(f"{os.path.basename(stage1)} {problem}")
    if problems:
        raise CascadeInputError(f"-prev_stage_predictions {folder}: {len(problems)} of {len(stage1_files)} case(s) "
                                f"have no usable stage-1 prediction: {_listed(problems)}. Predict the images with "
                                f"stage 1 first (nnUNetv2_predict -c 3d_fullres -tr nnUNetTrainerRFPrompt ...) into "
                                f"that folder; nothing was predicted")


def install() -> None:
    """Check the inputs of refiners and of stage 1 before nnU-Net's predictor starts (see the module's text)."""
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
    refiner = find_refiner(self.network) is not None
    if refiner or is_stage1_trainer(self.trainer_name):
        check_channel_counts(images, self.dataset_json["channel_names"])
        check_images(images, self.plans_manager.image_reader_writer_class())
    if refiner and folder_with_segs_from_prev_stage is not None:
        check_stage1_predictions(images, stage1_files, folder_with_segs_from_prev_stage,
                                 self.label_manager.all_labels)
    return images, outputs, stage1_files


def is_stage1_trainer(trainer_name: str | None) -> bool:
    """Whether `trainer_name` is nnUNetTrainerRFPrompt or a subclass (imported already where a predictor built its
    network)."""
    from nnunetv2_rfmedsam.trainers.prompt_trainer import nnUNetTrainerRFPrompt
    pending = [nnUNetTrainerRFPrompt]
    while pending:
        trainer = pending.pop()
        if trainer.__name__ == trainer_name:
            return True
        pending += trainer.__subclasses__()
    return False


def _stage1_problem(stage1: str, image_file: str, labels: list[int]) -> str | None:
    """What makes `stage1` unusable as the stage-1 prediction for `image_file`, or None."""
    if not os.path.isfile(stage1):
        return "does not exist"
    if is_nifti(stage1):
        try:
            stored_voxels(stage1)
        except DamagedNifti as error:
            return str(error)
    try:
        prediction, image = _header(stage1), _header(image_file)
    except RuntimeError as error:
        return f"cannot be read ({_first_line(error)})"
    its_image = f"its image {os.path.basename(image_file)}"
    if prediction.GetSize() != image.GetSize():
        return f"has size {prediction.GetSize()}, {its_image} {image.GetSize()}"
    if not np.allclose(prediction.GetSpacing(), image.GetSpacing(), rtol=1e-3, atol=1e-5):
        return f"has spacing {_rounded(prediction.GetSpacing())}, {its_image} {_rounded(image.GetSpacing())}"
    if not np.allclose(prediction.GetOrigin(), image.GetOrigin(), rtol=0, atol=_ORIGIN_MM):
        distance = float(np.linalg.norm(np.subtract(prediction.GetOrigin(), image.GetOrigin())))
        return (f"has origin {_rounded(prediction.GetOrigin())}, {its_image} {_rounded(image.GetOrigin())} "
                f"({distance:.4g} mm away)")
    if not np.allclose(prediction.GetDirection(), image.GetDirection(), rtol=0, atol=_DIRECTION):
        return f"has direction {_rounded(prediction.GetDirection())}, {its_image} {_rounded(image.GetDirection())}"
    foreign = sorted(set(_label_values(stage1).tolist()) - set(labels))
    if foreign:
        return (f"holds label(s) {', '.join(f'{value:g}' for value in foreign)} that dataset.json does not define "
                f"(labels {', '.join(map(str, labels))})")
    return None


def _label_values(path: str) -> np.ndarray:
    """The distinct voxel values of a label map, as nnU-Net's readers read them."""
    voxels = sitk.GetArrayFromImage(sitk.ReadImage(path)).ravel()
    if voxels.dtype.kind == "u" and voxels.max(initial=0) < 2 ** 16:
        return np.flatnonzero(np.bincount(voxels))  # linear, where np.unique sorts (a CT's label map: 80 M voxels)
    return np.unique(voxels)


def _non_finite(path: str, voxels: np.ndarray) -> list[str]:
    if voxels.dtype.kind != "f":
        return []
    bad = voxels.size - int(np.count_nonzero(np.isfinite(voxels)))
    return [f"{path} has {bad} of {voxels.size} voxels not finite (NaN or infinite), which nnU-Net's normalisation "
            f"would spread over every voxel"] if bad else []


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
