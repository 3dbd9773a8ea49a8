"""The viewer's automatic first pass: stage 1, then the cascade, on one image, in this process.

Both stages go through nnU-Net's own `nnUNetPredictor` (`predict_single_npy_array`, with the image read by the
plans' reader), as `nnUNetv2_predict` and `-prev_stage_predictions` run them: the same preprocessing, test-time
mirroring, fold ensemble, whole-volume refinement and export to the image's grid. Then an InteractiveSession of
stage 2 encodes the image once, so that corrections reuse SAM 2's features.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nnunetv2_rfmedsam.interactive import InteractiveError, InteractiveSession
from nnunetv2_rfmedsam.interactive.volume import refuse_damaged_nifti, refuse_non_finite
from nnunetv2_rfmedsam.registration import EXT_TRAINER_FOLDER
from nnunetv2_rfmedsam.settings import STAGE1_CONFIGURATION, STAGE1_TRAINER

# report(done, total, message): progress of the whole pass, called from the thread that runs it
Report = Callable[[int, int, str], None]
FINAL_CHECKPOINT = "checkpoint_final.pth"
STEPS = 100  # progress units: stage 1 takes 0-30, the cascade 30-90, the session's encoding 90-100


@dataclass(frozen=True)
class ModelChoice:
    """What the automatic pass runs: trained model folders, their folds, stage 2's checkpoint (stage 1 uses its
    checkpoint_final.pth, as `-chk` applies to one nnUNetv2_predict command), the device."""

    stage2_folder: Path
    stage1_folder: Path
    stage1_folds: tuple[str, ...]
    stage2_folds: tuple[str, ...]
    checkpoint: str = FINAL_CHECKPOINT
    device: str = "cpu"

    @classmethod
    def beside(cls, stage2_folder, folds=None, checkpoint: str = FINAL_CHECKPOINT,
               device: str = "cpu") -> "ModelChoice":
        """Stage 1 from the folder beside stage 2's (nnUNetTrainerRFPrompt, the same plans, 3d_fullres). Folds: for
        stage 1 those it has finished training (as nnUNetv2_rfmedsam_inference_commands picks them), for stage 2
        `folds` or else the same."""
        from nnunetv2_rfmedsam.cli.inference_commands import trained_folds
        stage2_folder = Path(stage2_folder)
        stage1_folder = stage1_folder_beside(stage2_folder)
        stage1_folds = tuple(trained_folds(stage1_folder))
        stage2_folds = tuple(folds) if folds else tuple(trained_folds(stage2_folder))
        return cls(stage2_folder, stage1_folder, stage1_folds, stage2_folds, checkpoint, device)


def stage1_folder_beside(stage2_folder: Path) -> Path:
    """<trainer>__<plans>__<configuration> of stage 2 -> nnUNetTrainerRFPrompt__<plans>__3d_fullres beside it."""
    parts = Path(stage2_folder).name.split("__")
    if len(parts) != 3:
        raise InteractiveError(f"model folder {stage2_folder}: not named <trainer>__<plans>__<configuration> as "
                               f"nnU-Net names its model folders")
    return Path(stage2_folder).parent / f"{STAGE1_TRAINER}__{parts[1]}__{STAGE1_CONFIGURATION}"


@dataclass
class AutomaticResult:
    stage1: np.ndarray                 # (D, H, W) stage 1's label map on the image's grid
    stage1_probabilities: np.ndarray   # (K + 1, D, H, W) its probabilities
    cascade: np.ndarray                # (D, H, W) the cascade's label map
    session: InteractiveSession        # stage 2's session, the image encoded
    seconds: dict[str, float] = field(default_factory=dict)


def run_automatic_pass(image_path, models: ModelChoice, report: Report | None = None) -> AutomaticResult:
    """Stage 1 and the cascade on the image file, then the interactive session; `report` gets the progress."""
    report = report or (lambda done, total, message: None)
    image_path = Path(image_path)
    if not image_path.is_file():
        raise InteractiveError(f"image {image_path}: no such file")
    # every file is checked before the first stage runs
    for folder, folds, checkpoint_name in ((models.stage1_folder, models.stage1_folds, FINAL_CHECKPOINT),
                                           (models.stage2_folder, models.stage2_folds, models.checkpoint)):
        if not (folder / "plans.json").is_file():
            raise InteractiveError(f"model folder {folder}: no plans.json (is it a trained nnU-Net model folder?)")
        for fold in folds:
            if not (checkpoint := folder / f"fold_{fold}" / checkpoint_name).is_file():
                raise InteractiveError(f"model folder {folder}: no checkpoint {checkpoint}")
    # nnU-Net finds the plugin's trainers (named in the checkpoints) only through this variable
    if EXT_TRAINER_FOLDER not in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep):
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(
            p for p in (EXT_TRAINER_FOLDER, os.environ.get("nnUNet_extTrainer")) if p)
    seconds = {}

    report(0, STEPS, "stage 1: loading the prompt UNet")
    start = time.perf_counter()
    stage1_predictor = _predictor(models.stage1_folder, models.stage1_folds, FINAL_CHECKPOINT, models.device)
    image, properties = _read(stage1_predictor, image_path)
    report(5, STEPS, "stage 1: predicting (sliding window, test-time mirroring)")
    stage1, probabilities = stage1_predictor.predict_single_npy_array(image, properties, None, None, True)
    seconds["stage 1"] = time.perf_counter() - start

    report(30, STEPS, "cascade: loading SAM 2 with adapters")
    start = time.perf_counter()
    cascade_predictor = _predictor(models.stage2_folder, models.stage2_folds, models.checkpoint, models.device)
    cascade_predictor.slice_progress_callback = lambda done, total: report(
        30 + 60 * done // max(total, 1), STEPS, f"cascade: slice {done} of {total} (every test-time mirror)")
    cascade = cascade_predictor.predict_single_npy_array(image, properties, stage1[None].astype(np.int16), None, False)
    seconds["cascade"] = time.perf_counter() - start

    report(90, STEPS, "corrections: encoding every slice with SAM 2 once")
    start = time.perf_counter()
    session = InteractiveSession.from_model_folder(models.stage2_folder, models.stage2_folds[0], models.checkpoint,
                                                   models.device)
    session.set_image(image_path)
    seconds["session"] = time.perf_counter() - start
    report(STEPS, STEPS, "done")
    return AutomaticResult(stage1.astype(np.uint8), probabilities.astype(np.float32), cascade.astype(np.uint8),
                           session, seconds)


def _predictor(folder: Path, folds: tuple[str, ...], checkpoint_name: str, device_name: str):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InteractiveError(f"device {device_name}: no CUDA device is available")
    predictor = nnUNetPredictor(device=device, perform_everything_on_device=device.type == "cuda",
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(
        str(folder), tuple(int(f) if f.isdigit() else f for f in folds), checkpoint_name)
    return predictor


def _read(predictor, image_path: Path) -> tuple[np.ndarray, dict]:
    """The image as nnU-Net's predictor reads it (the plans' reader), for a single-channel model."""
    channels = predictor.dataset_json["channel_names"]
    if len(channels) != 1:
        raise InteractiveError(f"model folder: the model takes {len(channels)} channels "
                               f"({', '.join(channels.values())}); the viewer opens single-channel images")
    refuse_damaged_nifti(Path(image_path))
    reader = predictor.plans_manager.image_reader_writer_class()
    try:
        image, properties = reader.read_images([str(image_path)])
    except Exception as error:  # readers raise what their library raises; all mean the file cannot be read
        raise InteractiveError(f"image {image_path}: cannot be read ({' '.join(str(error).split())[:200]})") from None
    refuse_non_finite(image, f"image {image_path}")
    return image, properties
