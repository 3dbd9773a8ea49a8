"""The planner that adds the `3d_rfmedsam2` configuration to nnU-Net's default plans."""
from __future__ import annotations

import copy
import dataclasses

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunetv2_rfmedsam.dataset_support import check_dataset_supported
from nnunetv2_rfmedsam.model.frames import intensity_windows_for
from nnunetv2_rfmedsam.settings import (NETWORK_CLASS, PLANS_IDENTIFIER, STAGE1_CONFIGURATION,
                                        STAGE2_CONFIGURATION, SAM2Settings)

# SAM 2 runs once per slice and object: two patches per step keep a 1024 input within a GPU's memory
STAGE2_BATCH_SIZE = 2


def rfmedsam2_configuration(stage1: dict, settings: SAM2Settings,
                            foreground_intensity_properties_per_channel: dict) -> dict:
    """`3d_rfmedsam2`: stage 1's preprocessed data, whole slices, and the SAM 2 network.

    `foreground_intensity_properties_per_channel`: the plans' entry of that name (the fingerprint's). Settings
    without `intensity_windows` get the defaults of model/frames.py for stage 1's normalisation schemes,
    which 3d_rfmedsam2 shares, since it reuses stage 1's preprocessed data."""
    if settings.intensity_windows is None:
        windows = intensity_windows_for(stage1["normalization_schemes"], foreground_intensity_properties_per_channel)
        settings = dataclasses.replace(settings, intensity_windows=windows)
    elif len(settings.intensity_windows) != len(stage1["normalization_schemes"]):
        raise ValueError(f"intensity_windows: {len(settings.intensity_windows)} windows for "
                         f"{len(stage1['normalization_schemes'])} image channels; give one [low, high] per channel")
    config = copy.deepcopy(stage1)
    config.pop("next_stage", None)
    # axis 0 is the slice axis: nnU-Net's transpose puts the coarsest-spaced axis first. In-plane, a patch
    # covers the median slice (SAM 2 sees whole slices) and at least stage 1's in-plane patch.
    in_plane = [max(int(p), int(m)) for p, m in zip(stage1["patch_size"][1:],
                                                     stage1["median_image_size_in_voxels"][1:])]
    config.update({
        "previous_stage": STAGE1_CONFIGURATION,
        "patch_size": [settings.slices_per_patch] + in_plane,
        "batch_size": STAGE2_BATCH_SIZE,
        "architecture": {
            "network_class_name": NETWORK_CLASS,
            "arch_kwargs": settings.to_plans(),
            "_kw_requires_import": [],
        },
    })
    return config


class RFMedSAM2PlansMixin:
    """Put before any nnU-Net experiment planner: its plans gain `3d_rfmedsam2` after `3d_fullres`.

    Every configuration the base planner makes is kept unchanged, so a stock nnUNetTrainer trained from
    these plans is the baseline.
    """

    def __init__(self, *args, sam2_settings: SAM2Settings | None = None, plans_name: str = PLANS_IDENTIFIER,
                 **kwargs):
        super().__init__(*args, plans_name=plans_name, **kwargs)
        if getattr(self, "dataset_json", None) is not None:  # nnU-Net's planners read it in __init__
            check_dataset_supported(self.dataset_json, f"{self.raw_dataset_folder}/dataset.json")
        self.sam2_settings = sam2_settings if sam2_settings is not None else SAM2Settings()

    def save_plans(self, plans):
        add_rfmedsam2_stage(plans, self.sam2_settings)
        super().save_plans(plans)


def add_rfmedsam2_stage(plans: dict, settings: SAM2Settings) -> None:
    """Add `3d_rfmedsam2` as the next stage of `3d_fullres`, for `3d_fullres` alone.

    nnU-Net's `3d_cascade_fullres` inherits from `3d_fullres` (`inherits_from`) and would inherit its
    `next_stage` too: its trainings would export predictions for a stage they do not feed. It gets its own
    `next_stage: None`."""
    configurations = plans["configurations"]
    if STAGE1_CONFIGURATION not in configurations:
        raise RuntimeError(
            f"{plans['dataset_name']}: nnU-Net planned no {STAGE1_CONFIGURATION} configuration (a 2D dataset?); "
            f"RFMedSAM 2 needs it as its first stage")
    configurations[STAGE2_CONFIGURATION] = rfmedsam2_configuration(
        configurations[STAGE1_CONFIGURATION], settings, plans["foreground_intensity_properties_per_channel"])
    configurations[STAGE1_CONFIGURATION]["next_stage"] = STAGE2_CONFIGURATION
    for configuration in configurations.values():
        if configuration.get("inherits_from") == STAGE1_CONFIGURATION and "next_stage" not in configuration:
            configuration["next_stage"] = None


class nnUNetPlannerRFMedSAM2(RFMedSAM2PlansMixin, ExperimentPlanner):
    """nnU-Net's default planner plus the `3d_rfmedsam2` configuration (plans `nnUNetRFMedSAM2Plans`)."""
