"""The planner that adds the `3d_rfmedsam2` configuration to nnU-Net's default plans."""
from __future__ import annotations

import copy
import dataclasses
import sys

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunetv2_rfmedsam.dataset_support import check_dataset_supported
from nnunetv2_rfmedsam.model.frames import intensity_windows_for
from nnunetv2_rfmedsam.planners.training_memory import GIB, TrainingMemoryEstimate, estimate_training_memory
from nnunetv2_rfmedsam.settings import (NETWORK_CLASS, PLANS_IDENTIFIER, STAGE1_CONFIGURATION,
                                        STAGE2_CONFIGURATION, SAM2Settings)

# the most patches per step (nnU-Net's 3D default); the planner lowers it where the memory target needs it
STAGE2_BATCH_SIZE = 2
# The GPU memory (GB) stage 2 is planned for where -gpu_memory_target is not given: 24 GB, the largest consumer
# cards (RTX 3090/4090) and the common workstation ones, so that default plans train there and on anything larger
# (nnU-Net's own 8 GB default, which stage 1 keeps, holds SAM 2 at input 1024 for a single slice pair at most).
# SAM 2 at 1024 keeps ~1.8 GB of activations per slice image and ~0.5 GB per object and slice, plus its memory
# reads (planners/training_memory.py): at 1024, 24 GB holds one patch of 7 or 8 slices with one object per step.
STAGE2_GPU_MEMORY_TARGET_GB = 24.0
# memory attention trains only between slices: a patch of one slice would leave it out
MIN_SLICES_PER_PATCH = 2
# what the user can fix on the command line instead of the planner choosing it
PLANNED_CHOICES = ("batch_size", "slices_per_patch", "objects_per_step")


@dataclasses.dataclass(frozen=True)
class Stage2Fit:
    """What the planner chose for a training step of stage 2, and its memory estimate."""

    settings: SAM2Settings
    batch_size: int
    estimate: TrainingMemoryEstimate
    fits: bool


def fit_training_memory(settings: SAM2Settings, num_classes: int, patch_grid: tuple[int, int], target_gb: float,
                        batch_size: int = STAGE2_BATCH_SIZE, fixed=()) -> Stage2Fit:
    """The batch size, slices per patch and objects per step whose estimated training memory fits `target_gb`;
    `fixed` names those the user chose (PLANNED_CHOICES), which stay as given.

    Kept longest: slices per patch, how many of SAM 2's memory slots (7) a step trains, what the refiner is about;
    then the batch, whose second patch only averages the gradient over more cases (and costs a slice image per
    slice, the largest term); lowered first: the objects per step, since SAM 2 tracks objects independently
    (nothing attends across them), so a step on fewer classes trains the same network with the others' losses left
    out, and other steps draw them. So: for the most slices, then the largest batch, as many objects as fit (at
    least one). Where nothing fits, the smallest step (fixed choices as given), with `fits` False."""
    fixed = set(fixed)
    unknown = fixed - set(PLANNED_CHOICES)
    if unknown:
        raise ValueError(f"fixed choices {sorted(unknown)} are not among {PLANNED_CHOICES}")
    slice_options = [settings.slices_per_patch] if "slices_per_patch" in fixed else \
        list(range(settings.slices_per_patch, min(MIN_SLICES_PER_PATCH, settings.slices_per_patch) - 1, -1))
    batch_options = [batch_size] if "batch_size" in fixed else list(range(batch_size, 0, -1))
    most_objects = num_classes if settings.objects_per_step is None else min(settings.objects_per_step, num_classes)
    object_options = [most_objects] if "objects_per_step" in fixed else list(range(most_objects, 0, -1))

    def planned(slices, batch, objects):
        chosen = dataclasses.replace(settings, slices_per_patch=slices,
                                     objects_per_step=settings.objects_per_step if "objects_per_step" in fixed
                                     else (None if objects >= num_classes else objects))
        return chosen, estimate_training_memory(chosen, batch, num_classes, patch_grid)

    for slices in slice_options:
        for batch in batch_options:
            for objects in object_options:
                chosen, estimate = planned(slices, batch, objects)
                if estimate.total <= target_gb * GIB:
                    return Stage2Fit(chosen, batch, estimate, True)
    chosen, estimate = planned(slice_options[-1], batch_options[-1], object_options[-1])
    return Stage2Fit(chosen, batch_options[-1], estimate, False)


def rfmedsam2_configuration(stage1: dict, settings: SAM2Settings,
                            foreground_intensity_properties_per_channel: dict, num_classes: int | None = None,
                            gpu_memory_target_gb: float = STAGE2_GPU_MEMORY_TARGET_GB,
                            batch_size: int = STAGE2_BATCH_SIZE, fixed=()) -> dict:
    """`3d_rfmedsam2`: stage 1's preprocessed data, whole slices, and the SAM 2 network.

    `foreground_intensity_properties_per_channel`: the plans' entry of that name (the fingerprint's). Settings
    without `intensity_windows` get the defaults of model/frames.py for stage 1's normalisation schemes,
    which 3d_rfmedsam2 shares, since it reuses stage 1's preprocessed data. Batch size, slices per patch and
    objects per step are lowered from the given ones to fit `gpu_memory_target_gb` with `num_classes` foreground
    classes (None, for plans assembled without a dataset.json: one), except those named in `fixed`
    (`fit_training_memory`); the estimate is recorded in the configuration."""
    num_classes = 1 if num_classes is None else num_classes
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
    fit = fit_training_memory(settings, num_classes, tuple(in_plane), gpu_memory_target_gb, batch_size, fixed)
    if not fit.fits:
        objects = fit.settings.objects_per_step or num_classes
        print(f"warning: {STAGE2_CONFIGURATION}: the smallest training step the settings allow (batch "
              f"{fit.batch_size}, {fit.settings.slices_per_patch} slices, {objects} of {num_classes} classes per "
              f"step) needs an estimated {fit.estimate.total / GIB:.1f} GB, more than the GPU memory target of "
              f"{gpu_memory_target_gb:g} GB; planned anyway", file=sys.stderr)
    config.update({
        "previous_stage": STAGE1_CONFIGURATION,
        "patch_size": [fit.settings.slices_per_patch] + in_plane,
        "batch_size": fit.batch_size,
        "architecture": {
            "network_class_name": NETWORK_CLASS,
            "arch_kwargs": fit.settings.to_plans(),
            "_kw_requires_import": [],
        },
        # an upper bound of one training step's GPU memory in GB, by part, and the target it was planned for
        "training_memory_estimate_gb": fit.estimate.to_plans(),
        "gpu_memory_target_gb": gpu_memory_target_gb,
    })
    return config


class RFMedSAM2PlansMixin:
    """Put before any nnU-Net experiment planner: its plans gain `3d_rfmedsam2` after `3d_fullres`.

    Every configuration the base planner makes is kept unchanged, so a stock nnUNetTrainer trained from
    these plans is the baseline.
    """

    def __init__(self, *args, sam2_settings: SAM2Settings | None = None, plans_name: str = PLANS_IDENTIFIER,
                 gpu_memory_target_in_gb: float | None = None, stage2_batch_size: int = STAGE2_BATCH_SIZE,
                 stage2_fixed=(), **kwargs):
        """`gpu_memory_target_in_gb`: nnU-Net's target for its own configurations, and stage 2's; not given, each
        keeps its default (the base planner's, STAGE2_GPU_MEMORY_TARGET_GB). `stage2_fixed`: the PLANNED_CHOICES
        the user gave (`stage2_batch_size` and the settings' values), which the planner does not lower."""
        if gpu_memory_target_in_gb is not None:
            kwargs["gpu_memory_target_in_gb"] = gpu_memory_target_in_gb
        super().__init__(*args, plans_name=plans_name, **kwargs)
        if getattr(self, "dataset_json", None) is not None:  # nnU-Net's planners read it in __init__
            check_dataset_supported(self.dataset_json, f"{self.raw_dataset_folder}/dataset.json")
        self.sam2_settings = sam2_settings if sam2_settings is not None else SAM2Settings()
        self.stage2_memory_target_gb = gpu_memory_target_in_gb or STAGE2_GPU_MEMORY_TARGET_GB
        self.stage2_batch_size = stage2_batch_size
        self.stage2_fixed = tuple(stage2_fixed)

    def save_plans(self, plans):
        dataset_json = getattr(self, "dataset_json", None)
        add_rfmedsam2_stage(plans, self.sam2_settings, foreground_classes(dataset_json) if dataset_json else None,
                            self.stage2_memory_target_gb, self.stage2_batch_size, self.stage2_fixed)
        super().save_plans(plans)


def foreground_classes(dataset_json: dict) -> int:
    """The number of foreground classes nnU-Net trains on (its ignore label apart)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    return LabelManager(dataset_json["labels"], regions_class_order=None).num_segmentation_heads - 1


def add_rfmedsam2_stage(plans: dict, settings: SAM2Settings, num_classes: int | None = None,
                        gpu_memory_target_gb: float = STAGE2_GPU_MEMORY_TARGET_GB,
                        batch_size: int = STAGE2_BATCH_SIZE, fixed=()) -> None:
    """Add `3d_rfmedsam2` as the next stage of `3d_fullres`, for `3d_fullres` alone, planned for `num_classes`
    foreground classes and the GPU memory target (`rfmedsam2_configuration`).

    nnU-Net's `3d_cascade_fullres` inherits from `3d_fullres` (`inherits_from`) and would inherit its
    `next_stage` too: its trainings would export predictions for a stage they do not feed. It gets its own
    `next_stage: None`."""
    configurations = plans["configurations"]
    if STAGE1_CONFIGURATION not in configurations:
        raise RuntimeError(
            f"{plans['dataset_name']}: nnU-Net planned no {STAGE1_CONFIGURATION} configuration (a 2D dataset?); "
            f"RFMedSAM 2 needs it as its first stage")
    configurations[STAGE2_CONFIGURATION] = rfmedsam2_configuration(
        configurations[STAGE1_CONFIGURATION], settings, plans["foreground_intensity_properties_per_channel"],
        num_classes, gpu_memory_target_gb, batch_size, fixed)
    configurations[STAGE1_CONFIGURATION]["next_stage"] = STAGE2_CONFIGURATION
    for configuration in configurations.values():
        if configuration.get("inherits_from") == STAGE1_CONFIGURATION and "next_stage" not in configuration:
            configuration["next_stage"] = None


class nnUNetPlannerRFMedSAM2(RFMedSAM2PlansMixin, ExperimentPlanner):
    """nnU-Net's default planner plus the `3d_rfmedsam2` configuration (plans `nnUNetRFMedSAM2Plans`)."""
